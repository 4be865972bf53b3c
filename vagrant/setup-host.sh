#!/usr/bin/env bash
# Install and start what the Vagrant VM target needs on a Debian 12 host, or stop it.
#
#   vagrant/setup-host.sh start   install (apt-get, only what is missing), configure, start daemons
#   vagrant/setup-host.sh stop    stop the daemons this script started (pid files under $STATE)
#   vagrant/setup-host.sh status  one line per daemon
#
# Idempotent: a second `start` installs nothing, rewrites nothing and starts
# nothing that is already running.
#
# Facts about these machines that the choices below follow:
# - There is no systemd as PID 1, so virtlogd and libvirtd are started by hand
#   with -d (daemonise) and stopped through their pid files.
# - libvirt in system mode probes /dev/kvm as root, then fails to use it as the
#   libvirt-qemu user; every call then took about 50 s. We keep qemu:///system
#   and set qemu.conf's user/group to root. Why not qemu:///session as a
#   non-root user (the safer choice on a workstation)? The harness and CI run
#   as root here, vagrant keeps its boxes per user (~/.vagrant.d), and a session
#   daemon is spawned per user by the client, so session mode would mean running
#   the whole harness as a second user. The guest cannot reach anything anyway:
#   its only NIC is QEMU user-mode networking with restrict=on, forwarding two
#   ports on 127.0.0.1. On a workstation, prefer qemu:///session
#   (LIBVIRT_DEFAULT_URI=qemu:///session) and skip this script's qemu.conf edit.
set -euo pipefail

STATE=${IOMUX_VAGRANT_STATE:-/var/tmp/iomux-vagrant}
QEMU_CONF=/etc/libvirt/qemu.conf
PKGS=(qemu-system-x86 qemu-utils vagrant vagrant-libvirt libvirt-daemon-system
      libvirt-clients debootstrap parted grub-pc-bin grub2-common dosfstools
      e2fsprogs fdisk kpartx rsync openssh-client)

log() { printf '[setup-host] %s\n' "$*"; }
die() { printf 'setup-host: error: %s\n' "$*" >&2; exit 1; }

alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_pkgs() {
  local missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then log "packages: all present"; return; fi
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101: the packages' postinst must not try to start services
  # (there is no init system to start them with); we start them below.
  local prc=/usr/sbin/policy-rc.d made_prc=""
  if [[ ! -e $prc ]]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod +x "$prc"; made_prc=1; fi
  # Other engineers' or CI steps may hold the dpkg lock: wait for it rather than fail.
  local wait=(-o DPkg::Lock::Timeout=600)
  local rc=0
  apt-get "${wait[@]}" update -qq && apt-get "${wait[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  if [[ -n $made_prc ]]; then rm -f "$prc"; fi
  ((rc == 0)) || die "apt-get install failed (exit $rc): ${missing[*]}"
}

configure_qemu() {
  # Only rewrite when the setting is not there yet, so a second run changes nothing.
  if ! grep -qE '^user = "root"' "$QEMU_CONF"; then
    log "qemu.conf: user/group = root (see the header for why)"
    printf '\n# iomux: run qemu as root; avoids the /dev/kvm probe mismatch (vagrant/setup-host.sh)\nuser = "root"\ngroup = "root"\n' >>"$QEMU_CONF"
  fi
}

start_daemons() {
  mkdir -p "$STATE" /run/libvirt /var/run/libvirt
  if alive /run/virtlogd.pid; then log "virtlogd: already running"; else
    log "starting virtlogd"; virtlogd -d -p /run/virtlogd.pid
    echo started >"$STATE/virtlogd.ours"
  fi
  if alive /run/libvirtd.pid; then log "libvirtd: already running"; else
    log "starting libvirtd"; libvirtd -d -p /run/libvirtd.pid
    echo started >"$STATE/libvirtd.ours"
  fi
  for _ in $(seq 1 30); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 1
  done
  virsh -c qemu:///system version >/dev/null 2>&1 || die "libvirtd does not answer on qemu:///system"
  vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt || die "vagrant-libvirt plugin is not visible to vagrant"
  log "ready: $(vagrant --version), libvirt $(virsh -c qemu:///system version --daemon 2>/dev/null | awk '/daemon/ {print $NF}')"
}

stop_one() {
  local name=$1 pidf=/run/$1.pid
  [[ -e "$STATE/$name.ours" ]] || { log "$name: not started by us, left alone"; return; }
  if alive "$pidf"; then
    local pid; pid=$(cat "$pidf"); log "stopping $name (pid $pid)"; kill "$pid"
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$STATE/$name.ours"
}

case "${1:-}" in
  start)
    [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts libvirtd)"
    install_pkgs; configure_qemu; start_daemons ;;
  stop) stop_one libvirtd; stop_one virtlogd ;;
  status)
    for d in virtlogd libvirtd; do
      if alive /run/$d.pid; then echo "$d running pid $(cat /run/$d.pid)"; else echo "$d stopped"; fi
    done ;;
  *) die "usage: $0 start|stop|status" ;;
esac
