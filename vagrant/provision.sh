#!/bin/sh
# Provision a VM target: install iomux from the rsync'd working tree and run one
# echo server per backend. POSIX sh: it runs on Debian (dash) and FreeBSD (sh).
#
#   provision.sh SRC BACKENDS
#     SRC       the synced working tree (holds iomux/)
#     BACKENDS  "auto:7000,select:7001,..." backend:guest-port pairs
#   provision.sh --print-unit
#     the echo servers' systemd template unit, as Debian's path writes it: the
#     box recipe (vagrant/box/build.sh) installs the same file, so that a first
#     provisioning finds it in place and needs no daemon-reload (3.5 s of a
#     13.6 s first provisioning under emulation)
#
# Idempotent: the last line is always "iomux-provision: changed=N ..." and a
# second run with the same tree and ports reports changed=0 and touches
# nothing (tests/harness/test_vagrant.py checks that line). A run that leaves
# a backend's server not listening fails with an error line instead.
#
# For tests (tests/harness/test_provision.py runs FreeBSD's path here against
# stub commands): IOMUX_PROVISION_ROOT is a directory standing for / and
# IOMUX_PROVISION_HOST the servers' address (default 0.0.0.0).
set -eu

SRC=${1:-/vagrant}
BACKENDS=${2:-auto:7000}
ROOT=${IOMUX_PROVISION_ROOT:-}
HOST=${IOMUX_PROVISION_HOST:-0.0.0.0}
PREFIX=$ROOT/opt/iomux
BIN=$ROOT/usr/local/bin
MARK=$PREFIX/.provisioned
# How long an old server may take to drain and exit, and a new one to start
# listening, in tenths of a second: under emulation a Python start alone takes
# a second or more, and a drain up to --drain-timeout (2 s).
WAIT_TENTHS=${IOMUX_PROVISION_WAIT:-300}
changed=0

unit_body() {
    printf '%s\n' "[Unit]
Description=iomux echo server, backend %i
After=network.target

[Service]
EnvironmentFile=$ROOT/etc/iomux/echo-%i.env
ExecStart=/usr/local/bin/iomux serve --backend %i --host $HOST --port \${PORT} --quiet
DynamicUser=yes
Restart=on-failure

[Install]
WantedBy=multi-user.target"
}
if [ "$SRC" = --print-unit ]; then unit_body; exit 0; fi

[ -d "$SRC/iomux" ] || { echo "iomux-provision: error: $SRC/iomux not found (rsync'd tree missing)" >&2; exit 1; }

find_python() {
    for p in python3 python3.11 /usr/local/bin/python3.11; do
        if command -v "$p" >/dev/null 2>&1; then command -v "$p"; return 0; fi
    done
    return 1
}

if ! PY=$(find_python); then
    if [ "$(uname -s)" = FreeBSD ]; then
        # pkg's release-versus-latest mismatch: a box built on an older point
        # release refuses the repository's packages ("Newer FreeBSD version for
        # package ...") until told to ignore the OS version. bootstrap -f
        # reinstalls pkg itself from the repository the box is configured for.
        export ASSUME_ALWAYS_YES=yes IGNORE_OSVERSION=yes
        pkg bootstrap -f >/dev/null
        pkg update -f >/dev/null
        pkg install -y python311 >/dev/null
        changed=$((changed + 1))
    fi
    PY=$(find_python) || { echo "iomux-provision: error: no python3 in the guest" >&2; exit 1; }
fi

# wait_gone PID: poll until PID has exited (FreeBSD's and GNU's sleep take
# tenths); fails once WAIT_TENTHS have passed.
wait_gone() {
    tries=0
    while kill -0 "$1" 2>/dev/null; do
        [ "$tries" -lt "$WAIT_TENTHS" ] || return 1
        sleep 0.1
        tries=$((tries + 1))
    done
}

# listening PORT...: wait, within WAIT_TENTHS, until every port accepts a TCP
# connection on this host; otherwise print the first port that does not, and
# fail. One interpreter start for all the ports.
listening() {
    "$PY" -c '
import socket, sys, time
deadline = time.monotonic() + int(sys.argv[1]) / 10
for port in sys.argv[2:]:
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(port)), 1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                print(port)
                sys.exit(1)
            time.sleep(0.1)
' "$WAIT_TENTHS" "$@"
}

sha() { if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -c1-16; else sha256 -q | cut -c1-16; fi; }

# The state we want, as one hash: the package's sources, the ports, the interpreter.
want=$( (cd "$SRC" && find iomux -name '*.py' | LC_ALL=C sort | xargs cat; echo "$BACKENDS $PY $HOST") | sha)

if [ "$(cat "$MARK" 2>/dev/null || true)" != "$want" ]; then
    # Standard library only: copying the package is the whole install, and it
    # needs no pip and no network (the guest has none).
    rm -rf "$PREFIX/lib.new"
    mkdir -p "$PREFIX/lib.new"
    cp -R "$SRC/iomux" "$PREFIX/lib.new/"
    find "$PREFIX/lib.new" -name __pycache__ -type d -exec rm -rf {} + 2>/dev/null || true
    # Byte-compiled here, as root, once: the suites start some 350 servers as an
    # unprivileged user, who cannot write $PREFIX/lib's __pycache__, and each of
    # them would compile the package from source again (a third of a server's
    # start-up instructions; seconds under emulation).
    "$PY" -m compileall -q "$PREFIX/lib.new/iomux" >/dev/null
    rm -rf "${PREFIX:?}/lib"
    mv "$PREFIX/lib.new" "$PREFIX/lib"
    # A .pth file in the interpreter's site directory: `python3 -m iomux` works
    # for every user, as `pip install` would make it (and the suites run it so).
    purelib=$ROOT$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$purelib" "$BIN"
    echo "$PREFIX/lib" >"$purelib/iomux.pth"
    printf '#!/bin/sh\nexec %s -m iomux "$@"\n' "$PY" >"$BIN/iomux"
    chmod 755 "$BIN/iomux"
    changed=$((changed + 1))
    restart=1
else
    restart=0
fi

# One echo server per backend, on 0.0.0.0 inside the guest: the only way in is
# the forwarded port on the host's 127.0.0.1. Under emulation every systemctl
# and every Python start costs a second or more, so the units are reloaded,
# queried and restarted in one call each, and only when something changed.
pairs=$(echo "$BACKENDS" | tr ',' ' ')
if command -v systemctl >/dev/null 2>&1; then
    unit=$ROOT/etc/systemd/system/iomux-echo@.service
    if [ "$(cat "$unit" 2>/dev/null || true)" != "$(unit_body)" ]; then
        mkdir -p "${unit%/*}"
        unit_body >"$unit"; systemctl daemon-reload; changed=$((changed + 1)); restart=1
    fi
    mkdir -p "$ROOT/etc/iomux"
    units="" todo=""
    for pair in $pairs; do
        backend=${pair%%:*} port=${pair##*:}
        units="$units iomux-echo@$backend.service"
        if [ "$(cat "$ROOT/etc/iomux/echo-$backend.env" 2>/dev/null || true)" != "PORT=$port" ]; then
            echo "PORT=$port" >"$ROOT/etc/iomux/echo-$backend.env"; changed=$((changed + 1))
            todo="$todo iomux-echo@$backend.service"
        fi
    done
    if [ "$restart" = 1 ]; then
        todo=$units
    else
        # shellcheck disable=SC2086 # one word per unit
        states=$(systemctl is-active $units || true)
        # shellcheck disable=SC2086 # one word per unit
        set -- $units
        for state in $states; do
            [ "$state" = active ] || case " $todo " in *" $1 "*) ;; *) todo="$todo $1" ;; esac
            shift
        done
    fi
    if [ -n "$todo" ]; then
        # What `systemctl enable` makes for WantedBy=multi-user.target, made
        # directly: under emulation systemctl enable took 2.8 s (it reloads the
        # manager), and the restart below starts the units now anyway.
        wants=$ROOT/etc/systemd/system/multi-user.target.wants
        mkdir -p "$wants"
        for u in $todo; do ln -sf /etc/systemd/system/iomux-echo@.service "$wants/$u"; done
        # shellcheck disable=SC2086
        systemctl restart $todo
        # A simple unit is "started" once forked, not once listening.
        ports=""
        for pair in $pairs; do ports="$ports ${pair##*:}"; done
        # shellcheck disable=SC2086 # one word per port
        if ! down=$(listening $ports); then
            echo "iomux-provision: error: nothing listens on guest port $down within $((WAIT_TENTHS / 10)) s" >&2
            exit 1
        fi
        changed=$((changed + 1))
    fi
else
    # FreeBSD: daemon(8) supervises and restarts each server. Its -P file holds
    # the supervisor's pid; SIGTERM to it stops the server and then daemon
    # itself, which removes the file. The old server must be gone before the
    # new one binds the port: a fixed pause is not enough under emulation.
    ports=""
    for pair in $pairs; do
        backend=${pair%%:*} port=${pair##*:}
        ports="$ports $port"
        pidf=$ROOT/var/run/iomux-echo-$backend.pid
        portf=$ROOT/var/run/iomux-echo-$backend.port
        if [ -s "$pidf" ] && { [ "$restart" = 1 ] || [ "$(cat "$portf" 2>/dev/null)" != "$port" ]; }; then
            old=$(cat "$pidf")
            kill "$old" 2>/dev/null || true
            if ! wait_gone "$old"; then
                echo "iomux-provision: error: the old $backend server (daemon pid $old) did not exit within $((WAIT_TENTHS / 10)) s" >&2
                exit 1
            fi
        fi
        if ! { [ -s "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; }; then
            mkdir -p "$ROOT/var/run"
            daemon -r -P "$pidf" -u nobody "$BIN/iomux" serve --backend "$backend" \
                --host "$HOST" --port "$port" --quiet
            echo "$port" >"$portf"
            changed=$((changed + 1))
        fi
    done
    # shellcheck disable=SC2086 # one word per port
    if ! down=$(listening $ports); then
        echo "iomux-provision: error: nothing listens on guest port $down within $((WAIT_TENTHS / 10)) s" >&2
        exit 1
    fi
fi

echo "$want" >"$MARK"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$PREFIX/lib/iomux/__init__.py")
echo "iomux-provision: python=$PY"
echo "iomux-provision: changed=$changed version=${version:-unknown} state=$want"
