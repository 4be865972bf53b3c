"""The ``docker`` kind: its driver (``driver``), the target images it runs
(``images``, with ``python -m harness.drivers.docker.images build``) and where
their base images come from."""
