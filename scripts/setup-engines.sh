#!/usr/bin/env bash
# Make sure of the engines the selected targets need, and stop the daemons we started.
#
#   scripts/setup-engines.sh start  [KIND...]   install what is missing, start the daemons
#   scripts/setup-engines.sh --check [KIND...]  change nothing; say what is missing and the
#                                               command that would fix it (exit 1 if any)
#   scripts/setup-engines.sh stop               stop only what the state file says we started
#   scripts/setup-engines.sh status [KIND...]   one line per engine
#
# KIND is a target kind of targets.toml (local docker vagrant gvisor uml), "browser"
# (chromium, for the report's browser test), "lint" (shellcheck, for make check) or
# "bench" (perf and valgrind, for bench/counts.py and its tests). Without KIND: the kinds of the targets
# that $TARGETS selects (all of targets.toml when it is empty).
#
# What each kind needs (Debian package names):
#   every kind  strace (the registration probe counts system calls with it)
#   docker      docker.io and dockerd running; debootstrap (offline base images)
#   vagrant     qemu, libvirt, vagrant, vagrant-libvirt and the offline box's build
#               tools; virtlogd and libvirtd running (qemu.conf: user/group root);
#               genisoimage and xz for the FreeBSD box recipe (vagrant/box/freebsd.sh);
#               xmllint, which libvirt's virt-xml-validate runs (it does not depend on it)
#   gvisor, uml scripts/fetch-kernels.sh install (pinned kernels from Debian's archive); and docker (their userland is the debian-12 image)
#   browser     chromium
#   lint        shellcheck
#   bench       linux-perf (perf stat: system calls per request), valgrind (callgrind:
#               instructions per request)
#
# It installs and starts only where it may: a Debian or Ubuntu machine, as root or with
# passwordless sudo, and IOMUX_SETUP is not 0. Elsewhere it changes nothing, says what is
# missing and which command would install or start it, and exits 0 (the harness then
# reports the targets it cannot run as "not run: <why>").
#
# One line per thing installed or started; a run with nothing to do says so in one line.
# apt-get update runs once, then one apt-get install of everything missing.
#
# State: every daemon `start` starts is appended to $IOMUX_SETUP_STATE (or --state FILE;
# default /var/tmp/iomux-setup/state) as "NAME PID". `stop` stops exactly those (a pid
# whose command is no longer NAME is left alone) and removes the file: a daemon that was
# already running, or that someone else started, is never stopped. dockerd makes its
# bridge ($IOMUX_DOCKER_BRIDGE, docker0) on its first start and leaves it when it
# stops: one that was not there before is recorded as "link NAME", and stop removes it
# once that dockerd is stopped.
#
# Facts about these machines that the choices below follow:
# - There may be no systemd as PID 1: daemons are started by hand in the background
#   (dockerd with its log in $IOMUX_SETUP_LOG_DIR, default /var/log; virtlogd and libvirtd
#   with -d and pid files) and stopped through their pids.
# - A package's postinst must not try to start its service (no init system to start it
#   with): a policy-rc.d that answers 101 is in place during the install.
# - libvirt in system mode probes /dev/kvm as root, then fails to use it as the
#   libvirt-qemu user; every call then took about 50 s. We keep qemu:///system and set
#   qemu.conf's user/group to root (the guest's only NIC is QEMU user-mode networking
#   with restrict=on; on a workstation prefer LIBVIRT_DEFAULT_URI=qemu:///session).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
STATE=${IOMUX_SETUP_STATE:-/var/tmp/iomux-setup/state}
#: Daemons a stop left up for kept targets (see stop_ours), one "NAME PID" a line.
LEFT_UP=${IOMUX_SETUP_LEFT_UP:-/var/tmp/iomux-setup/left-up}
LOG_DIR=${IOMUX_SETUP_LOG_DIR:-/var/log}
#: The bridge dockerd makes on its first start and leaves behind when it stops.
BRIDGE=${IOMUX_DOCKER_BRIDGE:-docker0}
QEMU_CONF=${IOMUX_QEMU_CONF:-/etc/libvirt/qemu.conf}
KERNELS=${IOMUX_FETCH_KERNELS:-$HERE/fetch-kernels.sh}
PY=${PY:-$REPO/.venv/bin/python}
WAIT_S=${IOMUX_SETUP_WAIT:-60}

# Requirements as "package:command" (command: how to tell it is there without dpkg).
COMMON=(strace:strace)
DOCKER=(docker.io:dockerd debootstrap:debootstrap)
VAGRANT=(qemu-system-x86:qemu-system-x86_64 qemu-utils:qemu-img vagrant:vagrant
         vagrant-libvirt: libvirt-daemon-system:libvirtd libvirt-clients:virsh
         debootstrap:debootstrap parted:parted grub-pc-bin: grub2-common:grub-install
         dosfstools:mkfs.vfat e2fsprogs:mkfs.ext4 fdisk:sfdisk kpartx:kpartx rsync:rsync
         openssh-client:ssh genisoimage:genisoimage xz-utils:xz libxml2-utils:xmllint)
BROWSER=(chromium:chromium)
LINT=(shellcheck:shellcheck)
BENCH=(linux-perf:perf valgrind:valgrind)

# A line that cannot be written (its reader is gone: EPIPE, SIGPIPE ignored in
# stop) is dropped, not fatal under set -e.
say() { printf '[setup] %s\n' "$*" 2>/dev/null || true; }
die() { printf 'setup-engines: error: %s\n' "$*" >&2; exit 1; }

usage() { die "usage: $0 start|--check|stop|status [--state FILE] [KIND...]"; }

mode=${1:-}; shift || true
kinds=()
while (($#)); do
  case $1 in
    --state) STATE=${2:?--state needs a file}; shift 2 ;;
    --state=*) STATE=${1#--state=}; shift ;;
    local|docker|vagrant|gvisor|uml|browser|lint|bench) kinds+=("$1"); shift ;;
    *) die "unknown kind or option '$1' (kinds: local docker vagrant gvisor uml browser lint bench)" ;;
  esac
done
case $mode in start|--check|check|stop|status) ;; *) usage ;; esac
[[ $mode == check ]] && mode=--check

if ((${#kinds[@]} == 0)) && [[ $mode != stop ]]; then
  # The kinds of the selected targets; every kind if the harness cannot say.
  if listed=$("$PY" -m harness.targets --kinds ${TARGETS:+--targets "$TARGETS"} 2>/dev/null); then
    read -r -a kinds <<<"$(echo "$listed" | tr '\n' ' ')"
  else
    kinds=(local docker vagrant gvisor uml)
  fi
fi
has_kind() { local k; for k in "${kinds[@]}"; do [[ $k == "$1" ]] && return 0; done; return 1; }
# gvisor and uml run over the debian-12 image's exported root (harness/drivers/userland.py),
# so they need the Docker engine too, even when no docker target is selected.
if { has_kind gvisor || has_kind uml; } && ! has_kind docker; then kinds+=(docker); fi

# -- may we change this machine? ---------------------------------------------------------
SUDO=()
why_not=""
if [[ ${IOMUX_SETUP:-1} == 0 ]]; then
  why_not="IOMUX_SETUP=0"
elif ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
  why_not="not a Debian or Ubuntu machine (no apt-get)"
elif [[ $(id -u) != 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    why_not="not root and no passwordless sudo"
  fi
fi
# What a person would type: sudo in front unless they are root.
hint_sudo=""; [[ $(id -u) == 0 ]] || hint_sudo="sudo "

# -- packages ----------------------------------------------------------------------------
have_pkg() {  # package command
  if [[ -n $2 ]] && command -v "$2" >/dev/null 2>&1; then return 0; fi
  command -v dpkg-query >/dev/null 2>&1 || return 1
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

wanted=("${COMMON[@]}")
has_kind docker && wanted+=("${DOCKER[@]}")
has_kind vagrant && wanted+=("${VAGRANT[@]}")
has_kind browser && wanted+=("${BROWSER[@]}")
has_kind lint && wanted+=("${LINT[@]}")
has_kind bench && wanted+=("${BENCH[@]}")
missing=()
for req in "${wanted[@]}"; do
  pkg=${req%%:*}
  [[ " ${missing[*]} " == *" $pkg "* ]] && continue
  have_pkg "$pkg" "${req#*:}" || missing+=("$pkg")
done

install_missing() {
  ((${#missing[@]})) || return 0
  export DEBIAN_FRONTEND=noninteractive
  local prc=/usr/sbin/policy-rc.d made_prc="" rc=0
  if [[ ! -e $prc ]]; then
    "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' >$prc && chmod +x $prc" && made_prc=1
  fi
  # Another apt-get (a person, CI, another checkout) may hold the dpkg lock: wait for it.
  local lock=(-o DPkg::Lock::Timeout=600)
  "${SUDO[@]}" apt-get "${lock[@]}" update -qq >/dev/null || rc=$?
  if ((rc == 0)); then
    for pkg in "${missing[@]}"; do say "installing $pkg"; done
    "${SUDO[@]}" apt-get "${lock[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
      >/dev/null || rc=$?
  fi
  [[ -z $made_prc ]] || "${SUDO[@]}" rm -f "$prc"
  ((rc == 0)) || die "apt-get failed (exit $rc) installing ${missing[*]}"
}

# -- daemons -----------------------------------------------------------------------------
docker_up() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }
libvirt_up() { command -v virsh >/dev/null 2>&1 && virsh -c qemu:///system version >/dev/null 2>&1; }
alive_pidfile() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

remember() {  # name pid
  mkdir -p "$(dirname "$STATE")"
  echo "$1 $2" >>"$STATE"
}

wait_for() {  # command args...: until it succeeds, at most $WAIT_S seconds
  local _
  for _ in $(seq 1 "$WAIT_S"); do "$@" && return 0; sleep 1; done
  return 1
}

start_dockerd() {
  local log=$LOG_DIR/iomux-dockerd.log
  [[ -w $LOG_DIR ]] || log=$REPO/reports/dockerd.log
  mkdir -p "$(dirname "$log")"
  # setsid: its own session, so a Ctrl-C at the terminal reaches make and the
  # harness (which stop it in order), not dockerd.
  # A bridge that was not here before is ours, to remove once dockerd has stopped
  # (recorded first, so that stop, going newest first, comes to it after dockerd).
  ip link show "$BRIDGE" >/dev/null 2>&1 || remember link "$BRIDGE"
  "${SUDO[@]}" setsid dockerd >>"$log" 2>&1 </dev/null &
  local pid=$!
  remember dockerd "$pid"
  say "starting dockerd (pid $pid, log $log)"
  wait_for docker_up || die "dockerd did not answer 'docker info' within ${WAIT_S}s; see $log"
}

configure_qemu() {
  [[ -e $QEMU_CONF ]] || return 0
  # Only when the setting is not there yet, so a second run changes nothing.
  grep -qE '^user = "root"' "$QEMU_CONF" && return 0
  say "qemu.conf: user/group = root (see this script's header for why)"
  printf '\n# iomux: run qemu as root; avoids the /dev/kvm probe mismatch (scripts/setup-engines.sh)\nuser = "root"\ngroup = "root"\n' \
    | "${SUDO[@]}" tee -a "$QEMU_CONF" >/dev/null
}

start_libvirt() {
  # virtlogd will not start without its log directory (libvirt-daemon-system's
  # postinst makes it; a purge of that package removes it, libvirtd stays).
  "${SUDO[@]}" mkdir -p /run/libvirt /var/log/libvirt/qemu
  local d
  for d in virtlogd libvirtd; do
    alive_pidfile "/run/$d.pid" && continue
    "${SUDO[@]}" "$d" -d -p "/run/$d.pid"
    wait_for alive_pidfile "/run/$d.pid" || die "$d did not start"
    remember "$d" "$(cat "/run/$d.pid")"
    say "starting $d (pid $(cat "/run/$d.pid"))"
  done
  wait_for libvirt_up || die "libvirtd does not answer on qemu:///system"
  vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt \
    || say "warning: the vagrant-libvirt plugin is not visible to vagrant"
}

# -- stop --------------------------------------------------------------------------------
# The kinds of the targets a run kept (--destroy=never|passing): the records of
# harness/kept_targets.py, one JSON file each with its "kind". A stopped dockerd
# stops its containers, so the next run could not take a kept one over: dockerd
# stays up while a kept docker target needs it. (A running libvirt domain outlives
# libvirtd, which the next run's set-up starts again: libvirtd is stopped as ever.)
kept_kinds() {
  local store=${IOMUX_KEPT_DIR:-/var/tmp/iomux-kept}
  [[ -d $store ]] || return 0
  { grep -ho '"kind": *"[a-z]*"' "$store"/*.json 2>/dev/null || true; } \
    | sed 's/.*"\([a-z]*\)"$/\1/' | sort -u
}

stop_ours() {
  local name pid comm _ kept link dockerd_left=0 links=()
  # The reader of our output may be gone already (a closed CI pipe or terminal, ended
  # by the same signal as the run): a say must not end the stop with SIGPIPE and
  # leave the daemons up (tests/harness/test_setup_engines.py).
  trap '' PIPE
  kept=$(kept_kinds)
  # A dockerd an earlier run left up for its kept targets is stopped by the first
  # run that finds none kept any more (a --destroy=always run took them).
  if [[ -s $LEFT_UP ]] && ! grep -qx docker <<<"$kept"; then
    cat "$LEFT_UP" >>"$STATE"
    rm -f "$LEFT_UP"
  fi
  [[ -s $STATE ]] || { rm -f "$STATE"; return 0; }
  # Newest first: libvirtd before virtlogd.
  while read -r name pid; do
    if [[ $name == link ]]; then  # "link NAME": a bridge our dockerd made
      if (( dockerd_left )); then echo "$name $pid" >>"$LEFT_UP"; else links+=("$pid"); fi
      continue
    fi
    [[ $pid =~ ^[0-9]+$ ]] || continue
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [[ -z $comm ]] || ! kill -0 "$pid" 2>/dev/null; then continue; fi
    if [[ $comm != "$name"* ]]; then
      say "$name (pid $pid) is gone; pid now belongs to $comm: left alone"; continue
    fi
    if [[ $name == dockerd ]] && grep -qx docker <<<"$kept"; then
      say "leaving dockerd up (pid $pid): kept docker targets need it (the run that" \
          "removes them, --destroy=always, stops it)"
      mkdir -p "$(dirname "$LEFT_UP")"
      echo "$name $pid" >>"$LEFT_UP"
      dockerd_left=1
      continue
    fi
    say "stopping $name (pid $pid)"
    "${SUDO[@]}" kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && "${SUDO[@]}" kill -KILL "$pid" 2>/dev/null
  done < <(tac "$STATE")
  # The dockerd that made them is stopped (or was gone already): its bridges go too.
  for link in "${links[@]}"; do
    ip link show "$link" >/dev/null 2>&1 || continue
    say "removing the $link bridge dockerd made"
    "${SUDO[@]}" ip link del "$link" || say "could not remove $link"
  done
  rm -f "$STATE"
}

# -- main --------------------------------------------------------------------------------
kernels_step() {  # install|--check
  has_kind gvisor || has_kind uml || return 0
  if [[ ! -x $KERNELS ]]; then
    say "gvisor/uml kernels: $KERNELS is not here; skipped"; return 0
  fi
  "$KERNELS" "$1" | sed 's/^/[setup] /'
  return "${PIPESTATUS[0]}"
}

report_only() {  # change nothing; say what would
  local reason=$1 rc=0
  if ((${#missing[@]})); then
    say "missing; would run: ${hint_sudo}apt-get install ${missing[*]}"; rc=1
  fi
  if has_kind docker && ! docker_up; then
    say "dockerd is not running; would run: ${hint_sudo}dockerd &"; rc=1
  fi
  if has_kind vagrant && ! libvirt_up; then
    say "libvirtd is not running; would run: ${hint_sudo}libvirtd -d (and virtlogd -d)"; rc=1
  fi
  kernels_step --check >/dev/null 2>&1 || {
    say "gvisor/uml kernels missing; would run: ${hint_sudo}scripts/fetch-kernels.sh install"; rc=1; }
  if ((rc == 0)); then
    say "${kinds[*]}: everything is here"
  elif [[ -n $reason ]]; then
    say "changed nothing ($reason); the targets that need it are reported not run"
  fi
  return $rc
}

case $mode in
  --check) report_only "" ;;
  status)
    if docker_up; then say "dockerd: running"; else say "dockerd: not running"; fi
    if libvirt_up; then say "libvirtd: running"; else say "libvirtd: not running"; fi
    if [[ -s $STATE ]]; then say "started by us: $(tr '\n' ' ' <"$STATE")"; fi ;;
  stop) stop_ours ;;
  start)
    if [[ -n $why_not ]]; then report_only "$why_not" || true; exit 0; fi
    did=0
    ((${#missing[@]})) && did=1
    install_missing
    # Each engine on its own (a subshell: its die ends only that step), so one that
    # fails is one line and the others are still set up; the exit status says so.
    failed=()
    if has_kind docker && ! docker_up; then
      did=1; (start_dockerd) || failed+=(docker)
    fi
    if has_kind vagrant; then
      configure_qemu
      libvirt_up || { did=1; (start_libvirt) || failed+=(vagrant); }
    fi
    if has_kind gvisor || has_kind uml; then
      if out=$(kernels_step install); then
        # Its "nothing to install" is said once, in the line below, with the rest.
        if [[ -n $out && $out != *"nothing to install"* ]]; then echo "$out"; did=1; fi
      else
        echo "$out"; say "scripts/fetch-kernels.sh install failed"; failed+=(gvisor/uml)
      fi
    fi
    if ((${#failed[@]})); then
      say "set-up of ${failed[*]} failed; their targets are reported not run"; exit 1
    fi
    ((did)) || say "${kinds[*]}: nothing to install, nothing to start"
    ;;
esac
