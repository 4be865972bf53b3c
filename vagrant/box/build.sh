#!/usr/bin/env bash
# Build the offline Debian 12 libvirt box from Debian's archive alone, and add it
# to vagrant as iomux/debian-12-offline (targets.toml's debian-vm). Cached:
# rebuilt only when this recipe changes.
#
#   vagrant/box/build.sh            build if the recipe changed, then `vagrant box add`
#   vagrant/box/build.sh --check    exit 0 if the installed box matches the recipe, 1 if not
#   vagrant/box/build.sh --force    rebuild even if cached
#
# The recipe hash (sha256 of this file, which is the whole recipe) travels inside the box
# as iomux-recipe.sha256, so the installed box says which recipe made it; the
# built .box file is kept under $IOMUX_BOX_CACHE so that a removed box is re-added
# without a rebuild.
#
# Needs root (loop devices, mount, chroot), debootstrap, parted, grub-pc-bin,
# qemu-utils and vagrant: vagrant/setup-host.sh start installs them.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BOX_NAME=${IOMUX_BOX_NAME:-iomux/debian-12-offline}
CACHE=${IOMUX_BOX_CACHE:-/var/cache/iomux/box}
MIRROR=${IOMUX_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
DISK_SIZE=2G
# The guest's packages: the issue's list. initramfs-tools and kmod are named so
# that debootstrap's resolver does not have to choose an alternative. The guest
# has no network (restrict=on), so what the in-guest suite needs comes with the
# box: Debian's python3-pytest (tests/server needs pytest only), python3-hypothesis
# (the fault suite's random clients) and strace (the registration probe counts
# epoll_ctl calls with it). No ifupdown or dhclient: systemd-networkd (in systemd)
# configures the NIC (see below for why).
PKGS=linux-image-cloud-amd64,initramfs-tools,kmod,systemd-sysv,udev,iproute2,openssh-server,sudo,python3,qemu-guest-agent,rsync,procps,python3-pytest,python3-hypothesis,strace

log() { printf '[box] %s\n' "$*"; }
die() { printf 'box: error: %s\n' "$*" >&2; exit 1; }

# The echo servers' unit the box carries is provision.sh's (echo_unit): part of the recipe.
echo_unit() { env -u IOMUX_PROVISION_ROOT -u IOMUX_PROVISION_HOST sh "$HERE/../provision.sh" --print-unit; }
recipe_hash() { { (cd "$HERE" && cat build.sh); echo_unit; } | sha256sum | cut -c1-16; }

box_dir() {
  local home=${VAGRANT_HOME:-$HOME/.vagrant.d}
  printf '%s/boxes/%s/0/libvirt' "$home" "${BOX_NAME//\//-VAGRANTSLASH-}"
}

installed_hash() { cat "$(box_dir)/iomux-recipe.sha256" 2>/dev/null || true; }

mode=${1:-build}
HASH=$(recipe_hash)
BOX_FILE=$CACHE/debian-12-$HASH.box

case $mode in
  --check) [[ $(installed_hash) == "$HASH" ]] && { echo "cached $HASH"; exit 0; }
           echo "stale (installed: $(installed_hash || true), recipe: $HASH)"; exit 1 ;;
  build|--force) ;;
  *) die "usage: $0 [--check|--force]" ;;
esac

command -v vagrant >/dev/null || die "vagrant executable was not found (run vagrant/setup-host.sh start)"
if [[ $mode == build && $(installed_hash) == "$HASH" ]]; then
  log "box $BOX_NAME is up to date (recipe $HASH)"; exit 0
fi

if [[ $mode == --force || ! -s $BOX_FILE ]]; then
  [[ $(id -u) == 0 ]] || die "building the box needs root (loop devices, mount, chroot)"
  GRUB_SETUP=/usr/lib/grub/i386-pc/grub-bios-setup  # grub-pc-bin keeps it off PATH
  [[ -x $GRUB_SETUP ]] || die "$GRUB_SETUP was not found (package grub-pc-bin)"
  for tool in debootstrap parted losetup mkfs.ext4 grub-mkimage qemu-img; do
    command -v "$tool" >/dev/null || die "$tool was not found (run vagrant/setup-host.sh start)"
  done
  KEY=""
  for k in /usr/share/vagrant/keys/vagrant.pub /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
           /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    [[ -s $k ]] && { KEY=$k; break; }
  done
  [[ -n $KEY ]] || die "vagrant's public insecure key (keys/vagrant.pub) was not found"

  mkdir -p "$CACHE"
  WORK=$(mktemp -d "$CACHE/work.XXXXXX")
  MNT=$WORK/root
  LOOP=""
  cleanup() {
    set +e
    for m in dev/pts dev proc sys ""; do mountpoint -q "$MNT/$m" && umount -l "$MNT/$m"; done
    [[ -n $LOOP ]] && losetup -d "$LOOP"
    rm -rf "$WORK"
  }
  trap cleanup EXIT

  start=$(date +%s)
  log "disk: $DISK_SIZE raw, one MBR partition"
  truncate -s "$DISK_SIZE" "$WORK/disk.raw"
  parted -s "$WORK/disk.raw" mklabel msdos mkpart primary ext4 1MiB 100% set 1 boot on
  # Partition scanning of loop devices (losetup -P) does not work on these
  # machines (no loopNp1 appears), so the partition gets its own loop device at
  # its offset, and GRUB is installed by hand with grub-mkimage/grub-bios-setup
  # (grub-install would need to see the partition as part of the disk).
  LOOP=$(losetup -f --show -o $((1024 * 1024)) "$WORK/disk.raw")
  mkfs.ext4 -q -L iomux-root "$LOOP"
  UUID=$(blkid -s UUID -o value "$LOOP")
  mkdir -p "$MNT"; mount "$LOOP" "$MNT"

  # The debootstrap result is cached on its own, keyed by what goes into it, so
  # that a change to the configuration below costs seconds, not a debootstrap.
  ROOTFS_TAR=$CACHE/rootfs-$(echo "$SUITE $PKGS $MIRROR" | sha256sum | cut -c1-16).tar
  if [[ -s $ROOTFS_TAR ]]; then
    log "root file system from $ROOTFS_TAR"
    tar -C "$MNT" --numeric-owner -xpf "$ROOTFS_TAR"
  else
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    debootstrap --variant=minbase --include="$PKGS" "$SUITE" "$MNT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -f "$CACHE"/rootfs-*.tar
    tar -C "$MNT" --numeric-owner -cpf "$ROOTFS_TAR.tmp" . && mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  fi

  log "configuring the guest"
  echo iomux-debian12 >"$MNT/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 iomux-debian12\n' >"$MNT/etc/hosts"
  # Pass 0, no fsck (2.3 s under emulation): the root is a fresh snapshot of the box
  # at every `vagrant up`.
  printf 'UUID=%s / ext4 errors=remount-ro 0 0\n' "$UUID" >"$MNT/etc/fstab"
  # The user-mode NIC sits at a fixed PCI address (bus 0, slot 0x10: see the
  # Vagrantfile's -device), so its predictable name is always enp0s16. The
  # UDP-tunnel NIC exists only for vagrant-libvirt's address lookup and is left
  # unmanaged (no .network file matches it): no DHCP server answers there.
  # systemd-networkd, not ifupdown: under emulation ifupdown-pre.service's
  # `udevadm settle` held networking.service, and so sshd, back for 10.1 s of a
  # 24.2 s userspace boot (systemd-analyze critical-chain ssh.service, 2026-12-07);
  # networkd takes the NIC when udev announces it, and its DHCP client is built in.
  mkdir -p "$MNT/etc/systemd/network"
  printf '[Match]\nName=enp0s16\n\n[Network]\nDHCP=ipv4\n' >"$MNT/etc/systemd/network/10-enp0s16.network"
  chroot "$MNT" systemctl enable systemd-networkd.service >/dev/null 2>&1
  # Nothing here waits for network-online.target; never let a unit that does wait
  # on the unmanaged tunnel NIC.
  chroot "$MNT" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1

  chroot "$MNT" useradd -m -s /bin/bash -U vagrant
  install -d -m 700 -o 1000 -g 1000 "$MNT/home/vagrant/.ssh"
  install -m 600 -o 1000 -g 1000 "$KEY" "$MNT/home/vagrant/.ssh/authorized_keys"
  printf 'vagrant ALL=(ALL) NOPASSWD:ALL\nDefaults:vagrant !requiretty\n' >"$MNT/etc/sudoers.d/vagrant"
  chmod 440 "$MNT/etc/sudoers.d/vagrant"
  chroot "$MNT" passwd -l root >/dev/null

  # Host keys are made at first boot, so no two VMs from this box share them.
  rm -f "$MNT"/etc/ssh/ssh_host_*
  cat >"$MNT/etc/systemd/system/iomux-ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate SSH host keys on first boot
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# No RSA host key: generating one under software emulation held sshd back for
# tens of seconds, and vagrant and OpenSSH both speak ed25519/ecdsa.
ExecStart=/usr/bin/ssh-keygen -q -N "" -t ed25519 -f /etc/ssh/ssh_host_ed25519_key
ExecStart=/usr/bin/ssh-keygen -q -N "" -t ecdsa -f /etc/ssh/ssh_host_ecdsa_key

[Install]
WantedBy=multi-user.target
EOF
  # The machine's own key, before sshd starts: the Vagrantfile makes a key pair per
  # machine under the run's vagrant state and hands QEMU the public half as the
  # fw_cfg file opt/io.iomux/authorized_keys; this unit makes it vagrant's only
  # authorized key, so the shared insecure key is gone before anyone can log in,
  # and vagrant need not swap keys over SSH (insert_key: 9.3 s under emulation,
  # 2026-12-07). Without that file (another hypervisor) nothing changes, and
  # vagrant's insert_key replaces the insecure key as before.
  cat >"$MNT/etc/systemd/system/iomux-authorized-key.service" <<'EOF'
[Unit]
Description=Install the machine's SSH key from QEMU's fw_cfg
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'modprobe qemu_fw_cfg 2>/dev/null; f=/sys/firmware/qemu_fw_cfg/by_name/opt/io.iomux/authorized_keys/raw; [ -r "$f" ] || exit 0; umask 077; { cat "$f"; echo; } >/home/vagrant/.ssh/authorized_keys.new && chown vagrant:vagrant /home/vagrant/.ssh/authorized_keys.new && mv /home/vagrant/.ssh/authorized_keys.new /home/vagrant/.ssh/authorized_keys'

[Install]
WantedBy=multi-user.target
EOF
  chroot "$MNT" systemctl enable iomux-authorized-key.service >/dev/null 2>&1
  printf 'UseDNS no\nPasswordAuthentication no\nHostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n' >"$MNT/etc/ssh/sshd_config.d/iomux.conf"
  chroot "$MNT" systemctl enable iomux-ssh-hostkeys.service >/dev/null 2>&1
  # The echo servers' template unit, in place before the first boot: provision.sh
  # finds it unchanged and skips the daemon-reload (3.5 s under emulation).
  echo_unit >"$MNT/etc/systemd/system/iomux-echo@.service"
  # Under emulation every timer that wakes apt costs minutes of CPU; the guest
  # has no route to a mirror anyway (restrict=on).
  chroot "$MNT" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
  # The one vCPU is the boot's bottleneck, so what nobody uses does not start:
  # e2scrub_reap (12.6 s under emulation; no LVM here) and the login prompts
  # (getty-static 5.3 s; the serial console keeps the kernel's messages; vagrant
  # and the harness log in over SSH).
  chroot "$MNT" systemctl mask e2scrub_reap.service getty-static.service getty@tty1.service \
    serial-getty@ttyS0.service >/dev/null 2>&1
  # Nor do the kernel interfaces nobody here mounts or loads: hugepages, mqueue,
  # debugfs, tracefs, configfs, fusectl, binfmt_misc, and the modprobe@ units
  # (0.5-1.9 s each under emulation, one after another on the one vCPU:
  # systemd-analyze blame, 2026-12-07). The suites' strace needs ptrace, not debugfs.
  chroot "$MNT" systemctl mask dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount \
    sys-kernel-tracing.mount sys-kernel-config.mount sys-fs-fuse-connections.mount \
    proc-sys-fs-binfmt_misc.automount systemd-binfmt.service kmod-static-nodes.service \
    modprobe@configfs.service modprobe@dm_mod.service modprobe@drm.service \
    modprobe@efi_pstore.service modprobe@fuse.service modprobe@loop.service \
    systemd-network-generator.service systemd-tmpfiles-clean.timer >/dev/null 2>&1
  # Drivers udev would load for hardware that is there but unused: the qemu64 CPU
  # model has SVM, so kvm_amd and kvm (1.1 MB) were loaded at every boot, and the
  # i440FX machine's IDE controller brought libata and its probing (the disk is
  # virtio). A blacklist stops only the automatic load; modprobe by name still works.
  printf 'blacklist %s\n' kvm_amd kvm_intel kvm ata_piix ata_generic pata_acpi powernow_k8 \
    virtio_balloon serio_raw >"$MNT/etc/modprobe.d/iomux-unused-hardware.conf"
  # The initramfs with the two drivers the root needs (ext4 is built in), not
  # MODULES=most: 15 MB, 0.75 s to unpack and 3.3 s of udev in it under emulation
  # (dmesg: "Run /init" at 2.8 s, the root mounted at 6.1 s).
  sed -i 's/^MODULES=.*/MODULES=list/' "$MNT/etc/initramfs-tools/initramfs.conf"
  printf 'virtio_pci\nvirtio_blk\n' >>"$MNT/etc/initramfs-tools/modules"
  chroot "$MNT" update-initramfs -u -k all >"$WORK/initramfs.log" 2>&1 \
    || { cat "$WORK/initramfs.log" >&2; die "update-initramfs failed"; }
  : >"$MNT/etc/machine-id"
  rm -f "$MNT/var/lib/dbus/machine-id"
  chroot "$MNT" apt-get clean
  rm -rf "$MNT"/var/lib/apt/lists/* "$MNT"/var/cache/apt/*.bin "$MNT"/var/log/*.log
  # Documentation is a fifth of the root file system and nothing reads it here.
  rm -rf "$MNT"/usr/share/doc/* "$MNT"/usr/share/man/* "$MNT"/usr/share/info/* "$MNT"/usr/share/locale/*
  printf 'path-exclude=/usr/share/doc/*\npath-exclude=/usr/share/man/*\npath-exclude=/usr/share/locale/*\n' \
    >"$MNT/etc/dpkg/dpkg.cfg.d/iomux-nodoc"

  [[ -e $MNT/vmlinuz && -e $MNT/initrd.img ]] || die "kernel or initrd missing in the guest (/vmlinuz, /initrd.img)"
  du -sm "$MNT" | awk '{print "[box] root file system: " $1 " MB"}'

  log "GRUB on the MBR"
  mkdir -p "$MNT/boot/grub"
  cat >"$MNT/boot/grub/grub.cfg" <<EOF
set timeout=0
insmod part_msdos
insmod ext2
search --no-floppy --fs-uuid --set=root $UUID
linux /vmlinuz root=UUID=$UUID ro console=tty0 console=ttyS0,115200n8
initrd /initrd.img
boot
EOF
  cp -r /usr/lib/grub/i386-pc "$MNT/boot/grub/"
  cp /usr/lib/grub/i386-pc/boot.img "$MNT/boot/grub/"
  grub-mkimage -O i386-pc -o "$MNT/boot/grub/core.img" -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 search_fs_uuid
  # Whole-disk loop device beside the partition's: grub-bios-setup writes
  # boot.img to the MBR and core.img into the 1 MiB gap before the partition.
  # The device map names the disk, else it guesses from the host's /dev/vda.
  DISK=$(losetup -f --show "$WORK/disk.raw")
  echo "(hd0) $DISK" >"$WORK/device.map"
  "$GRUB_SETUP" --skip-fs-probe -m "$WORK/device.map" -d "$MNT/boot/grub" "$DISK" >"$WORK/grub.log" 2>&1 \
    || { losetup -d "$DISK"; cat "$WORK/grub.log" >&2; die "grub-bios-setup failed"; }
  losetup -d "$DISK"
  # Blocks of deleted files (the .debs debootstrap unpacked) would otherwise be
  # copied into the qcow2; discard punches them out of disk.raw.
  fstrim "$MNT" || log "fstrim failed; the box will be larger"
  umount "$MNT"; losetup -d "$LOOP"; LOOP=""

  log "qcow2 and box file"
  qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
  vsize=$(( $(stat -c %s "$WORK/disk.raw") / 1024 / 1024 / 1024 ))
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$vsize" >"$WORK/metadata.json"
  echo "$HASH" >"$WORK/iomux-recipe.sha256"
  # Plain tar: the qcow2 is compressed already, gzip on top gains nothing but time.
  tar -C "$WORK" -cf "$WORK/out.box" metadata.json box.img iomux-recipe.sha256
  rm -f "$CACHE"/debian-12-*.box
  mv "$WORK/out.box" "$BOX_FILE"
  log "built $BOX_FILE in $(( $(date +%s) - start )) s, $(du -m "$BOX_FILE" | cut -f1) MB"
fi

log "vagrant box add $BOX_NAME"
vagrant box add --force --name "$BOX_NAME" --provider libvirt "$BOX_FILE" >/dev/null
# vagrant-libvirt uploads the box image into the default pool on first use; a
# stale volume from an older box would shadow the new one, so drop it.
if command -v virsh >/dev/null; then
  for vol in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk '/iomux-VAGRANTSLASH-debian-12/ {print $1}'); do
    virsh -c qemu:///system vol-delete --pool default "$vol" >/dev/null 2>&1 || true
  done
fi
[[ $(installed_hash) == "$HASH" ]] || die "box added but $(box_dir)/iomux-recipe.sha256 does not hold $HASH"
log "box $BOX_NAME ready (recipe $HASH)"
