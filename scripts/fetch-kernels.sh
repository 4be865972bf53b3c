#!/usr/bin/env bash
# The kernels of the gvisor and uml target kinds (targets.toml), from Debian's
# archive, pinned by version:
#
#   scripts/fetch-kernels.sh install   install/fetch whatever is missing
#   scripts/fetch-kernels.sh --check   say what is missing; exit 1 if anything is
#
# Debian 12's runsc and user-mode-linux are installed with apt-get, pinned.
# Debian 13's builds are fetched as .deb files with apt-get download (a private
# sources list for trixie, private lists and cache: nothing of the host's apt
# state changes) and unpacked with dpkg-deb -x into $IOMUX_KERNELS_DIR
# (default /var/cache/iomux/kernels/<package>-<version>/), never installed over
# the host's packages. harness/drivers/kernel_builds.py reads the same names.
#
# Idempotent: one line per thing installed; a run with nothing to do says so in
# one line. Exit 0 on success, non-zero with a one-line reason on failure.
set -euo pipefail

# Keep in step with targets.toml's [target.kernel_build] pins (paths: EXECUTABLES in
# harness/drivers/kernel_builds.py).
BOOKWORM_PKGS=("runsc=0.0~20221219.0-2+b3" "user-mode-linux=6.1um4+b13")
# Debian 13's linux.uml needs glibc 2.38+ (this host has 2.36): Debian 13's libc6 is
# unpacked beside it. It cannot run as "ld.so linux.uml": UML sizes its memory
# from where brk starts, which is then after ld.so ("Too few physical memory!").
# So a copy, linux.uml.ld-trixie, names Debian 13's loader as its interpreter
# (through LD_LINK, a path short enough to be patched into PT_INTERP in place,
# layout unchanged) and runs with LD_LIBRARY_PATH set to that libc6. The guest
# loads no kernel module, so no modules package.
TRIXIE_PKGS=("runsc=0.0~20240729.0-4+b7" "user-mode-linux=6.12um1+b22" "libc6=2.41-12+deb13u5")
MIRROR="${IOMUX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KERNELS_DIR="${IOMUX_KERNELS_DIR:-/var/cache/iomux/kernels}"
LD_LINK=/var/cache/iomux/ld-trixie   # at most 27 bytes: PT_INTERP of linux.uml
export DEBIAN_FRONTEND=noninteractive

die() { echo "fetch-kernels: $*" >&2; exit 1; }

mode="${1:-}"
case "$mode" in
  install|--check) ;;
  *) die "usage: $0 install | --check" ;;
esac

installed_version() { dpkg-query -W -f='${Status} ${Version}\n' "$1" 2>/dev/null \
                        | awk '$3 == "installed" {print $4}'; }
unpacked_dir() { echo "$KERNELS_DIR/$1-$2"; }   # name, version (kept verbatim)
# The unpacked tree is complete only once its marker exists (written last).
unpacked() { [[ -f "$(unpacked_dir "$1" "$2")/.unpacked" ]]; }

missing=()
for spec in "${BOOKWORM_PKGS[@]}"; do
  name="${spec%%=*}" version="${spec#*=}"
  [[ "$(installed_version "$name")" == "$version" ]] || missing+=("apt:$spec")
done
for spec in "${TRIXIE_PKGS[@]}"; do
  name="${spec%%=*}" version="${spec#*=}"
  unpacked "$name" "$version" || missing+=("deb:$spec")
done

# The name of the loader-patched copy of Debian 13's linux.uml, once it is made.
uml_trixie="" libc_trixie=""
for spec in "${TRIXIE_PKGS[@]}"; do
  case "$spec" in
    user-mode-linux=*) uml_trixie="$(unpacked_dir user-mode-linux "${spec#*=}")/usr/bin/linux.uml" ;;
    libc6=*) libc_trixie="$(unpacked_dir libc6 "${spec#*=}")/usr/lib/x86_64-linux-gnu" ;;
  esac
done
patched_ok() { [[ -x "$uml_trixie.ld-trixie" && "$(readlink "$LD_LINK")" == "$libc_trixie/ld-linux-x86-64.so.2" ]]; }
patched_ok || missing+=("patch:linux.uml.ld-trixie")

if [[ "$mode" == "--check" ]]; then
  if ((${#missing[@]})); then
    echo "fetch-kernels: missing ${missing[*]#*:} (run scripts/fetch-kernels.sh install)"
    exit 1
  fi
  echo "fetch-kernels: all kernels present"
  exit 0
fi

if ((${#missing[@]} == 0)); then
  echo "fetch-kernels: nothing to install, all kernels present"
  exit 0
fi

apt_updated=""
trixie_state=""
cleanup() { [[ -n "$trixie_state" ]] && rm -rf "$trixie_state"; }
trap cleanup EXIT

for item in "${missing[@]}"; do
  how="${item%%:*}" spec="${item#*:}"
  name="${spec%%=*}" version="${spec#*=}"
  [[ "$how" == patch ]] && continue  # after the unpacking, below
  if [[ "$how" == apt ]]; then
    if [[ -z "$apt_updated" ]]; then
      apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed"
      apt_updated=1
    fi
    apt-get install -y -qq --no-install-recommends "$spec" >/dev/null 2>&1 \
      || die "apt-get install $spec failed (is $version still in bookworm?)"
    echo "installed $name $version (apt-get, bookworm)"
    continue
  fi
  if [[ -z "$trixie_state" ]]; then
    trixie_state="$(mktemp -d /tmp/iomux-trixie-apt.XXXXXX)"
    mkdir -p "$trixie_state/lists/partial" "$trixie_state/cache/archives/partial"
    cat >"$trixie_state/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
SRC
    TRIXIE_APT=(-o "Dir::Etc::sourcelist=$trixie_state/sources.list"
                -o "Dir::Etc::sourceparts=-" -o "Dir::State::lists=$trixie_state/lists"
                -o "Dir::Cache=$trixie_state/cache" -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root"
                -o "APT::Get::List-Cleanup=0" -o "Acquire::Languages=none")
    apt-get "${TRIXIE_APT[@]}" update -qq >/dev/null 2>&1 \
      || die "apt-get update of a private trixie list from $MIRROR failed"
  fi
  (cd "$trixie_state" && apt-get "${TRIXIE_APT[@]}" download -qq "$spec" >/dev/null 2>&1) \
    || die "apt-get download $spec (trixie) failed (is $version still in trixie?)"
  deb=("$trixie_state"/"${name}"_*.deb)
  [[ -f "${deb[0]}" ]] || die "apt-get download $spec left no .deb"
  dest="$(unpacked_dir "$name" "$version")"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  dpkg-deb -x "${deb[0]}" "$dest.tmp" || die "dpkg-deb -x ${deb[0]##*/} failed"
  sha256sum "${deb[0]}" | awk -v f="${deb[0]##*/}" '{print $1 "  " f}' >"$dest.tmp/.deb.sha256"
  touch "$dest.tmp/.unpacked"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
  rm -f "${deb[0]}"
  echo "fetched $name $version (trixie .deb, unpacked in $dest)"
done

if ! patched_ok; then
  mkdir -p "$(dirname "$LD_LINK")"
  ln -sfn "$libc_trixie/ld-linux-x86-64.so.2" "$LD_LINK"
  python3 - "$uml_trixie" "$LD_LINK" <<'PY' || die "patching linux.uml's loader path failed"
import os, sys
src, link = sys.argv[1], sys.argv[2].encode()
old = b"/lib64/ld-linux-x86-64.so.2\0"
data = open(src, "rb").read()
if data.count(old) != 1 or len(link) >= len(old):
    sys.exit(f"{src}: PT_INTERP {old!r} not found once, or {link!r} too long")
tmp = src + ".ld-trixie.tmp"
with open(tmp, "wb") as fh:
    fh.write(data.replace(old, link.ljust(len(old), b"\0")))
os.chmod(tmp, 0o755)
os.replace(tmp, src + ".ld-trixie")
PY
  echo "made ${uml_trixie##*/}.ld-trixie (Debian 13's loader via $LD_LINK)"
fi
