#!/usr/bin/env bash
# Install and start what the Vagrant VM targets need on a Debian host, or stop it.
#
#   vagrant/setup-host.sh start   install (apt-get, only what is missing), configure, start daemons
#   vagrant/setup-host.sh stop    stop the daemons that `start` started (its state file)
#   vagrant/setup-host.sh status  one line per daemon
#
# The set-up itself lives in scripts/setup-engines.sh (one script for every kind, which
# `make test-all-os` runs); this is its vagrant part, with a state file of its own so
# that a `stop` here stops only what a `start` here started.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${IOMUX_VAGRANT_STATE:-/var/tmp/iomux-vagrant}/setup-engines.state
case "${1:-}" in
  start|stop|status) exec "$here/../scripts/setup-engines.sh" "$1" --state "$state" vagrant ;;
  *) printf 'setup-host: error: usage: %s start|stop|status\n' "$0" >&2; exit 1 ;;
esac
