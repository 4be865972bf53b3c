#!/usr/bin/env bash
# Build a FreeBSD Vagrant box from the FreeBSD project's own VM image, and add it
# to vagrant as iomux/freebsd-<version> (targets.toml's freebsd-14, freebsd-15).
# The sibling of build.sh (the Debian box): same modes, same cache by recipe hash,
# same "one line and exit 1" on every error.
#
#   vagrant/box/freebsd.sh VERSION            build if the recipe or image changed, then `vagrant box add`
#   vagrant/box/freebsd.sh VERSION --check    exit 0 if the installed box matches, 1 if not
#   vagrant/box/freebsd.sh VERSION --force    rebuild even if cached
#
# Input: FreeBSD-VERSION-RELEASE-amd64-BASIC-CLOUDINIT-ufs.qcow2.xz and, beside it,
# CHECKSUM.SHA512-FreeBSD-VERSION-RELEASE-amd64, both from
# https://download.freebsd.org/releases/VM-IMAGES/VERSION-RELEASE/amd64/Latest/,
# in $IOMUX_IMAGES (default ~/.cache/iomux). A SHA-512 pinned in targets.toml
# (passed as IOMUX_FREEBSD_SHA512) stands in for the checksum file.
#
# Facts about the image that the recipe follows (release/tools/basic-cloudinit.conf
# and vmimage.subr in freebsd-src):
# - Only the BASIC-CLOUDINIT image enables nuageinit(7), sshd and DHCP; the plain
#   ...-ufs.qcow2.xz enables neither nuageinit nor sshd, and nothing on Linux can
#   safely write its UFS root to change that, so it is refused with one line.
# - nuageinit runs on the first boot (rc keyword "firstboot") and reads a NoCloud
#   seed: a cd9660 or msdosfs volume labelled "cidata" holding meta-data and
#   user-data. So the box carries the image untouched plus seed.iso, and the
#   box's Vagrantfile attaches seed.iso as a CD-ROM. No installer, no boot here.
# - The image also enables firstboot_freebsd_update, which patches the release
#   and reboots at the end of the first boot: a reboot under vagrant's first SSH
#   session. The seed turns it off, which also keeps the kernel the one the
#   target names (14.4-RELEASE, not whatever -pN is current).
#
# Output: $IOMUX_BOX_CACHE/freebsd-VERSION-HASH-libvirt.box (and -virtualbox.box
# where VBoxManage exists: the qcow2 converted to VMDK, wrapped by VBoxManage
# export into box.ovf). Each is built in a temporary directory and moved into
# place with one rename, so an error leaves no half-built box behind.
#
# Needs xz, qemu-img, genisoimage or xorriso, vagrant; no root.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)

log() { printf '[freebsd-box] %s\n' "$*"; }
die() { printf 'freebsd-box: error: %s\n' "$*" >&2; exit 1; }

VERSION=${1:-}
[[ $VERSION =~ ^[0-9]+\.[0-9]+$ ]] || die "usage: $0 VERSION [--check|--force] (VERSION like 14.4)"
mode=${2:-build}
case $mode in --check|--force|build) ;; *) die "usage: $0 VERSION [--check|--force]" ;; esac

BOX_NAME=${IOMUX_BOX_NAME:-iomux/freebsd-$VERSION}
CACHE=${IOMUX_BOX_CACHE:-$HOME/.cache/iomux/box}
IMAGES=${IOMUX_IMAGES:-$HOME/.cache/iomux}
IMAGE=FreeBSD-$VERSION-RELEASE-amd64-BASIC-CLOUDINIT-ufs.qcow2.xz
PLAIN=FreeBSD-$VERSION-RELEASE-amd64-ufs.qcow2.xz
SUMS=CHECKSUM.SHA512-FreeBSD-$VERSION-RELEASE-amd64
PINNED=${IOMUX_FREEBSD_SHA512:-}
MAJOR=${VERSION%%.*}

# -- the image and its checksum -----------------------------------------------------------

if [[ ! -s $IMAGES/$IMAGE ]]; then
  [[ -s $IMAGES/$PLAIN ]] && die "$IMAGES/$PLAIN has no nuageinit or sshd enabled; use $IMAGE"
  die "no FreeBSD $VERSION image: put $IMAGE and its CHECKSUM.SHA512 in $IMAGES, or set IOMUX_IMAGES"
fi

# The release's checksum file has BSD lines, "SHA512 (FILE) = HEX"; a GNU
# "HEX  FILE" line is accepted too, for a file made with sha512sum.
expected_sha512() {
  if [[ -n $PINNED ]]; then printf '%s\n' "${PINNED,,}"; return; fi
  [[ -s $IMAGES/$SUMS ]] || return 0
  awk -v f="$IMAGE" '
    $1 == "SHA512" && $2 == "(" f ")" && $3 == "=" { print tolower($4); exit }
    $2 == f || $2 == "*" f { print tolower($1); exit }' "$IMAGES/$SUMS"
}
WANT=$(expected_sha512)
[[ -n $WANT ]] || die "no SHA-512 for $IMAGE: put $SUMS beside it in $IMAGES, or pin sha512 in targets.toml"
[[ $WANT =~ ^[0-9a-f]{128}$ ]] || die "the SHA-512 for $IMAGE is not 128 hex digits: $WANT"

# The recipe: this script, the box's Vagrantfile, and which image it wraps.
recipe_hash() {
  { cat "$HERE/freebsd.sh" "$HERE/freebsd/Vagrantfile"; echo "$VERSION $WANT"; } | sha256sum | cut -c1-16
}
HASH=$(recipe_hash)

box_dir() {
  local home=${VAGRANT_HOME:-$HOME/.vagrant.d}
  printf '%s/boxes/%s/0/%s' "$home" "${BOX_NAME//\//-VAGRANTSLASH-}" "$1"
}
installed_hash() { cat "$(box_dir libvirt)/iomux-recipe.sha256" 2>/dev/null || true; }

if [[ $mode == --check ]]; then
  [[ $(installed_hash) == "$HASH" ]] && { echo "cached $HASH"; exit 0; }
  echo "stale (installed: $(installed_hash), recipe: $HASH)"; exit 1
fi

command -v vagrant >/dev/null || die "vagrant executable was not found (run vagrant/setup-host.sh start)"
if [[ $mode == build && $(installed_hash) == "$HASH" ]]; then
  log "box $BOX_NAME is up to date (recipe $HASH)"; exit 0
fi

PROVIDERS=(libvirt)
command -v VBoxManage >/dev/null && PROVIDERS+=(virtualbox)
box_file() { printf '%s/freebsd-%s-%s-%s.box' "$CACHE" "$VERSION" "$HASH" "$1"; }

if [[ $mode == --force || ! -s $(box_file libvirt) ]]; then
  for tool in xz qemu-img sha512sum; do
    command -v "$tool" >/dev/null || die "$tool was not found (apt-get install xz-utils qemu-utils coreutils)"
  done
  MKISO=$(command -v genisoimage || command -v xorriso || true)
  [[ -n $MKISO ]] || die "neither genisoimage nor xorriso was found (apt-get install genisoimage)"
  KEYS=()
  for k in /usr/share/vagrant/keys/vagrant.pub /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub* \
           /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub* /opt/vagrant/embedded/gems/vagrant-*/keys/vagrant.pub*; do
    [[ -s $k ]] && KEYS+=("$k")
  done
  ((${#KEYS[@]})) || die "vagrant's public insecure key (keys/vagrant.pub) was not found"

  start=$(date +%s)
  log "verifying $IMAGE (SHA-512)"
  got=$(sha512sum <"$IMAGES/$IMAGE" | cut -d' ' -f1)
  [[ $got == "$WANT" ]] || die "$IMAGE: SHA-512 mismatch (want ${WANT:0:16}..., got ${got:0:16}...): download it again"

  mkdir -p "$CACHE"
  WORK=$(mktemp -d "$CACHE/work.XXXXXX")
  VBOX_VM=""
  cleanup() {
    set +e
    [[ -n $VBOX_VM ]] && VBoxManage unregistervm "$VBOX_VM" --delete >/dev/null 2>&1
    rm -rf "$WORK"
  }
  trap cleanup EXIT

  log "unpacking the image"
  xz -dc "$IMAGES/$IMAGE" >"$WORK/box.img" || die "$IMAGE: xz could not unpack it"
  info=$(qemu-img info --output=json "$WORK/box.img") || die "$IMAGE: qemu-img cannot read the unpacked image"
  fmt=$(sed -n 's/.*"format": *"\([a-z0-9]*\)".*/\1/p' <<<"$info" | head -1)
  [[ $fmt == qcow2 ]] || die "$IMAGE: unpacked to a $fmt image, not qcow2"
  vbytes=$(sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p' <<<"$info" | head -1)
  # vagrant-libvirt sizes the VM's disk from virtual_size in whole GiB: round up,
  # never below the image (growfs takes the slack on first boot).
  vgib=$(( (vbytes + 1073741823) / 1073741824 ))

  log "NoCloud seed (cidata) for nuageinit"
  mkdir -p "$WORK/seed"
  cat >"$WORK/seed/meta-data" <<EOF
instance-id: iomux-freebsd-$VERSION-$HASH
local-hostname: iomux-freebsd$MAJOR
EOF
  # Keys documented in nuageinit(7) of freebsd-src main as of June 2025, before
  # 15.0 branched (releng/14.4's copy was not checked here): users[].name,
  # gecos, groups, shell, ssh_authorized_keys, sudo; packages; ssh_pwauth;
  # write_files. An older nuageinit (14.3's is reported to ignore packages and
  # write_files) would leave no sudo, and vagrant would stop at its first sudo. With "users" given and no "default" entry, the image's default
  # freebsd/freebsd password user is not created. sudo is not in the base system:
  # nuageinit installs it with pkg (nuageinit_post_net, after the network and
  # before sshd), then writes the sudo rule to sudoers.d. rsync is what vagrant's
  # rsync synced folder needs in the guest. Python is not here: vagrant/provision.sh
  # installs it with pkg. The host name in meta-data makes nuageinit create
  # /etc/rc.conf.d before write_files runs (write_files makes no directories).
  {
    echo "#cloud-config"
    echo "users:"
    echo "  - name: vagrant"
    echo "    gecos: Vagrant User"
    echo "    groups: wheel"
    echo "    shell: /bin/sh"
    echo "    sudo: \"ALL=(ALL) NOPASSWD: ALL\""
    echo "    ssh_authorized_keys:"
    cat "${KEYS[@]}" | awk 'NF && !seen[$0]++ { printf "      - \"%s\"\n", $0 }'
    echo "packages:"
    echo "  - sudo"
    echo "  - rsync"
    echo "ssh_pwauth: false"
    echo "write_files:"
    echo "  - path: /etc/rc.conf.d/firstboot_freebsd_update"
    echo "    content: |"
    echo "      firstboot_freebsd_update_enable=\"NO\""
  } >"$WORK/seed/user-data"
  # Rock Ridge keeps the lower-case names; the volume label is what nuageinit
  # finds, as /dev/iso9660/cidata.
  if [[ $(basename "$MKISO") == xorriso ]]; then
    xorriso -as mkisofs -quiet -o "$WORK/seed.iso" -V cidata -J -R "$WORK/seed/user-data" "$WORK/seed/meta-data" \
      >"$WORK/iso.log" 2>&1 || { cat "$WORK/iso.log" >&2; die "xorriso failed to build seed.iso"; }
  else
    genisoimage -quiet -o "$WORK/seed.iso" -V cidata -J -R "$WORK/seed/user-data" "$WORK/seed/meta-data" \
      >"$WORK/iso.log" 2>&1 || { cat "$WORK/iso.log" >&2; die "genisoimage failed to build seed.iso"; }
  fi
  echo "$HASH" >"$WORK/iomux-recipe.sha256"
  cp "$HERE/freebsd/Vagrantfile" "$WORK/Vagrantfile"

  log "libvirt box"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$vgib" >"$WORK/metadata.json"
  # Plain tar: the qcow2 is compressed already.
  tar -C "$WORK" -cf "$WORK/libvirt.box" metadata.json Vagrantfile box.img seed.iso iomux-recipe.sha256

  if [[ " ${PROVIDERS[*]} " == *" virtualbox "* ]]; then
    log "VirtualBox box (VMDK, box.ovf)"
    mkdir -p "$WORK/vbox" "$WORK/vb"
    qemu-img convert -O vmdk "$WORK/box.img" "$WORK/vbox/disk.vmdk"
    VBOX_VM=iomux-freebsd-box-$$
    VBoxManage createvm --name "$VBOX_VM" --ostype FreeBSD_64 --basefolder "$WORK/vbox" --register >/dev/null
    VBoxManage modifyvm "$VBOX_VM" --memory 1024 --cpus 2 --nic1 nat >/dev/null
    # The box's Vagrantfile attaches seed.iso at port 1 of this controller.
    VBoxManage storagectl "$VBOX_VM" --name SATA --add sata --portcount 2 >/dev/null
    VBoxManage storageattach "$VBOX_VM" --storagectl SATA --port 0 --device 0 --type hdd \
      --medium "$WORK/vbox/disk.vmdk" >/dev/null
    mac=$(VBoxManage showvminfo "$VBOX_VM" --machinereadable | sed -n 's/^macaddress1="\(.*\)"/\1/p')
    VBoxManage export "$VBOX_VM" --output "$WORK/vb/box.ovf" >/dev/null
    VBoxManage unregistervm "$VBOX_VM" --delete >/dev/null; VBOX_VM=""
    echo '{"provider": "virtualbox"}' >"$WORK/vb/metadata.json"
    { cat "$WORK/Vagrantfile"; printf '\nVagrant.configure("2") { |c| c.vm.base_mac = "%s" }\n' "$mac"; } \
      >"$WORK/vb/Vagrantfile"
    cp "$WORK/seed.iso" "$WORK/iomux-recipe.sha256" "$WORK/vb/"
    (cd "$WORK/vb" && tar -cf "$WORK/virtualbox.box" ./*)
  fi

  # Into place, each with one rename on the same file system; older boxes of
  # this version go only once the new ones are there.
  for p in "${PROVIDERS[@]}"; do mv "$WORK/$p.box" "$(box_file "$p").part"; done
  for p in "${PROVIDERS[@]}"; do mv "$(box_file "$p").part" "$(box_file "$p")"; done
  for old in "$CACHE"/freebsd-"$VERSION"-*.box; do
    [[ $old == *-"$HASH"-*.box ]] || rm -f "$old"
  done
  log "built $(box_file libvirt) in $(( $(date +%s) - start )) s, $(du -m "$(box_file libvirt)" | cut -f1) MB"
fi

for p in "${PROVIDERS[@]}"; do
  [[ -s $(box_file "$p") ]] || continue
  log "vagrant box add $BOX_NAME ($p)"
  vagrant box add --force --name "$BOX_NAME" --provider "$p" "$(box_file "$p")" >/dev/null \
    || die "vagrant box add $BOX_NAME ($p) failed"
done
# vagrant-libvirt uploads box.img into the default pool on first use; a stale
# volume from an older box of this name would shadow the new one.
if command -v virsh >/dev/null; then
  slug=${BOX_NAME//\//-VAGRANTSLASH-}
  for vol in $(virsh -c "${LIBVIRT_DEFAULT_URI:-qemu:///system}" vol-list default 2>/dev/null | awk -v s="$slug" 'index($1, s) == 1 {print $1}'); do
    virsh -c "${LIBVIRT_DEFAULT_URI:-qemu:///system}" vol-delete --pool default "$vol" >/dev/null 2>&1 || true
  done
fi
[[ $(installed_hash) == "$HASH" ]] || die "box added but $(box_dir libvirt)/iomux-recipe.sha256 does not hold $HASH"
log "box $BOX_NAME ready (recipe $HASH)"
