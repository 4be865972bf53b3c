"""The ``vagrant`` kind: its driver (``driver``), a VM per target brought up with
vagrant/Vagrantfile and reached over SSH."""
