"""The FreeBSD box recipe (vagrant/box/freebsd.sh), on a STAND-IN image.

There is no FreeBSD image here and no KVM, so nothing in this file is a FreeBSD
run, and no report may count it as one. The stand-in is an empty 64 MiB qcow2
made with qemu-img and compressed with xz under the official image's file name,
with a CHECKSUM.SHA512 file in the release's own format beside it. What it
proves: the checksum is verified (and a bad one refused, leaving nothing), the
seed ISO holds what nuageinit reads, the box is what vagrant and vagrant-libvirt
accept (``vagrant box add`` runs, in a private VAGRANT_HOME, then
``vagrant box remove``), the merged Vagrantfile attaches the seed as a CD-ROM
that libvirt accepts in a domain definition (defined, never started), the box is
cached by its recipe hash, and the not-run line the harness shows without an image.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from harness import targets
from harness.drivers.base import Target, TargetError
from harness.drivers.vagrant import boxes
from harness.drivers.vagrant import driver as vd

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "vagrant" / "box" / "freebsd.sh"
VERSION = "14.4"
IMAGE = f"FreeBSD-{VERSION}-RELEASE-amd64-BASIC-CLOUDINIT-ufs.qcow2.xz"
SUMS = f"CHECKSUM.SHA512-FreeBSD-{VERSION}-RELEASE-amd64"
#: Clearly not the real box: a name no user has, in a VAGRANT_HOME of the test's own.
STANDIN_BOX = "iomux-standin/freebsd-14.4-standin"


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install qemu-utils genisoimage vagrant)")


def _freebsd_target(name: str) -> Target:
    return next(t for t in targets.load() if t.name == name)


@pytest.fixture
def standin(tmp_path: Path) -> dict[str, Any]:
    """A stand-in image dir, box cache, VAGRANT_HOME and seed dir, all under tmp_path."""
    _need("qemu-img", "xz", "vagrant")
    if shutil.which("genisoimage") is None and shutil.which("xorriso") is None:
        pytest.skip("neither genisoimage nor xorriso installed (apt-get install genisoimage)")
    images = tmp_path / "standin-images"
    images.mkdir()
    raw = tmp_path / "standin.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(raw), "64M"], check=True)
    (images / IMAGE).write_bytes(lzma.compress(raw.read_bytes()))
    digest = hashlib.sha512((images / IMAGE).read_bytes()).hexdigest()
    # The release's file has one BSD-style line per image (sha512 -r is not used there).
    (images / SUMS).write_text(f"SHA512 (FreeBSD-{VERSION}-RELEASE-amd64-ufs.qcow2.xz) = {'0' * 128}\n"
                               f"SHA512 ({IMAGE}) = {digest}\n")
    env = {**os.environ, "IOMUX_IMAGES": str(images), "IOMUX_BOX_CACHE": str(tmp_path / "cache"),
           "VAGRANT_HOME": str(tmp_path / "vagrant.d"), "IOMUX_BOX_NAME": STANDIN_BOX,
           "IOMUX_SEED_DIR": str(tmp_path), "VAGRANT_CHECKPOINT_DISABLE": "1",
           "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1"}
    env.pop("IOMUX_FREEBSD_SHA512", None)
    return {"tmp": tmp_path, "images": images, "cache": tmp_path / "cache", "env": env,
            "digest": digest, "raw": raw}


def _recipe(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(RECIPE), VERSION, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _boxes(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.box")) if cache.is_dir() else []


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []


def _one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("freebsd-box: error: ")
    assert "Traceback" not in res.stderr and ": line " not in lines[0]
    return lines[0]


def _vagrant(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def _iso_file(iso: Path, name: str) -> str:
    if shutil.which("isoinfo"):
        return subprocess.run(["isoinfo", "-R", "-x", f"/{name}", "-i", str(iso)], capture_output=True,
                              text=True, check=True).stdout
    out = iso.parent / f"x-{name}"
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", f"/{name}", str(out)],
                   capture_output=True, check=True)
    return out.read_text()


def _iso_label(iso: Path) -> str:
    # The primary volume descriptor is sector 16; its volume identifier is bytes 40..72.
    with open(iso, "rb") as fh:
        fh.seek(16 * 2048)
        pvd = fh.read(2048)
    assert pvd[1:6] == b"CD001", "not an ISO 9660 image"
    return pvd[40:72].decode("ascii").rstrip()


def _yaml(text: str) -> Any:
    # A real YAML parser on what nuageinit parses with libyaml: Ruby's Psych
    # (vagrant brings Ruby); the dev extra has no PyYAML.
    out = subprocess.run(["ruby", "-ryaml", "-rjson", "-e", "puts JSON.dump(YAML.safe_load(STDIN.read))"],
                         input=text, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


# -- checksum, atomicity, error lines --------------------------------------------------------

@pytest.mark.slow
def test_standin_box_builds_and_vagrant_adds_and_removes_it(standin: dict[str, Any]) -> None:
    env, cache = standin["env"], standin["cache"]
    res = _recipe(env)
    assert res.returncode == 0, res.stderr
    assert "verifying" in res.stdout and "ready (recipe" in res.stdout
    boxes = _boxes(cache)
    if shutil.which("VBoxManage") is None:
        assert [b.name.endswith("-libvirt.box") for b in boxes] == [True], boxes
    assert not [n for n in _leftovers(cache) if n.startswith("work.") or n.endswith(".part")]
    libvirt_box = next(b for b in boxes if b.name.endswith("-libvirt.box"))
    recipe_hash = libvirt_box.name.split("-")[2]

    with tarfile.open(libvirt_box) as tar:
        names = set(tar.getnames())
        assert names == {"metadata.json", "Vagrantfile", "box.img", "seed.iso", "iomux-recipe.sha256"}
        tar.extractall(standin["tmp"] / "box")
    unpacked = standin["tmp"] / "box"
    # vagrant-libvirt's box format, version 1: provider, format, virtual_size in GiB.
    meta = json.loads((unpacked / "metadata.json").read_text())
    assert meta == {"provider": "libvirt", "format": "qcow2", "virtual_size": 1}
    assert (unpacked / "iomux-recipe.sha256").read_text().strip() == recipe_hash
    # box.img is the image itself, unpacked, not a re-encoded copy.
    assert (unpacked / "box.img").read_bytes() == standin["raw"].read_bytes()

    # The seed: label cidata, meta-data and a #cloud-config user-data.
    seed = unpacked / "seed.iso"
    assert _iso_label(seed) == "cidata"
    meta_data = _yaml(_iso_file(seed, "meta-data"))
    assert meta_data["instance-id"] == f"iomux-freebsd-{VERSION}-{recipe_hash}"
    assert meta_data["local-hostname"] == "iomux-freebsd14"
    user_text = _iso_file(seed, "user-data")
    assert user_text.startswith("#cloud-config\n")
    user = _yaml(user_text)
    (vagrant_user,) = user["users"]
    assert vagrant_user["name"] == "vagrant" and vagrant_user["sudo"] == "ALL=(ALL) NOPASSWD: ALL"
    assert "default" not in user["users"], "the image's freebsd/freebsd user must not be created"
    insecure = next(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant.pub"),
                    None)
    if insecure is not None:
        assert insecure.read_text().strip() in vagrant_user["ssh_authorized_keys"]
    assert {"sudo", "rsync"} <= set(user["packages"])
    assert user["ssh_pwauth"] is False
    assert user["write_files"] == [{"path": "/etc/rc.conf.d/firstboot_freebsd_update",
                                    "content": 'firstboot_freebsd_update_enable="NO"\n'}]

    # vagrant accepted the box: it is listed, with the recipe hash inside.
    listed = _vagrant(env, "box", "list", "--machine-readable")
    assert f",box-name,{STANDIN_BOX}" in listed.stdout, listed.stdout + listed.stderr
    assert _recipe(env, "--check").returncode == 0
    again = _recipe(env)
    assert again.returncode == 0 and "up to date" in again.stdout

    # The merged Vagrantfile (box + a project's), read by vagrant itself, and the
    # domain libvirt makes of its CD-ROM (defined, never started).
    merged = _merged_config(env, standin["tmp"])
    assert merged["guest"] == "freebsd" and merged["shell"] == "sh"
    (cdrom,) = merged["cdroms"]
    assert cdrom["bus"] == "sata" and cdrom["type"] == "raw"
    copy = Path(cdrom["path"])
    assert copy.parent == standin["tmp"] and copy.read_bytes() == seed.read_bytes()
    assert copy.stat().st_mode & 0o044 == 0o044, "the qemu user must be able to read the seed"
    _define_domain(unpacked / "box.img", cdrom)
    # A seed copy that is not the box's (planted by someone else) is replaced, not used.
    copy.write_bytes(b"planted")
    assert Path(_merged_config(env, standin["tmp"], "project2")["cdroms"][0]["path"]).read_bytes() == \
        seed.read_bytes()

    # Removed from vagrant, the box comes back from the cache without a rebuild.
    assert _vagrant(env, "box", "remove", "--force", STANDIN_BOX).returncode == 0
    assert _recipe(env, "--check").returncode == 1
    readd = _recipe(env)
    assert readd.returncode == 0 and "verifying" not in readd.stdout, readd.stdout
    removed = _vagrant(env, "box", "remove", "--force", STANDIN_BOX)
    assert removed.returncode == 0, removed.stderr
    assert STANDIN_BOX not in _vagrant(env, "box", "list").stdout


def _merged_config(env: dict[str, str], tmp: Path, project_dir: str = "project") -> dict[str, Any]:
    """What vagrant makes of a project Vagrantfile on the stand-in box, for libvirt."""
    project = tmp / project_dir
    project.mkdir()
    (project / "Vagrantfile").write_text(
        f'Vagrant.configure("2") {{ |c| c.vm.box = "{STANDIN_BOX}" }}\n')
    script = tmp / "merged.rb"
    script.write_text(
        'require "json"\nrequire "vagrant"\n'
        "env = Vagrant::Environment.new(cwd: ARGV[0])\n"
        "m = env.machine(env.primary_machine_name, :libvirt)\n"
        'puts JSON.dump({"cdroms" => m.provider_config.cdroms, "guest" => m.config.vm.guest.to_s,\n'
        '                "shell" => m.config.ssh.shell})\n')
    res = subprocess.run(["ruby", str(script), str(project)], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    merged: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return merged


def _define_domain(disk: Path, cdrom: dict[str, str]) -> None:
    """libvirt accepts the seed CD-ROM as vagrant-libvirt writes it (domain.xml.erb):
    the domain is defined, read back and undefined, never started. Where libvirtd
    does not answer, libvirt's in-process test driver parses the same XML (it adds
    no controllers, so the SATA controller is checked only against QEMU's driver)."""
    assert shutil.which("virsh"), "virsh not installed (apt-get install libvirt-clients)"
    uri = os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")
    qemu = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=30,
                          check=False).returncode == 0
    if not qemu:
        uri = "test:///default"
    name = f"iomux-standin-{uuid.uuid4().hex[:8]}"
    xml = disk.parent / "domain.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='{cdrom["type"]}' />
      <source file='{cdrom["path"]}'/>
      <target dev='{cdrom["dev"]}' bus='{cdrom["bus"]}'/>
      <readonly/>
    </disk>
  </devices>
</domain>
""")
    # libvirt's own schema first (virt-xml-validate ships with libvirt-clients, beside virsh).
    if shutil.which("virt-xml-validate"):
        valid = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True,
                               text=True, timeout=60, check=False)
        assert valid.returncode == 0, valid.stdout + valid.stderr
    # One virsh session: the test driver's state lives only as long as its connection.
    res = subprocess.run(["virsh", "-c", uri, f"define {xml}; dumpxml {name}; undefine {name}"],
                         capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        subprocess.run(["virsh", "-c", uri, "undefine", name], capture_output=True, timeout=60,
                       check=False)
    assert res.returncode == 0, res.stderr
    assert f"<source file='{cdrom['path']}'/>" in res.stdout
    assert "device='cdrom'" in res.stdout and "<readonly/>" in res.stdout
    assert f"<target dev='{cdrom['dev']}' bus='sata'/>" in res.stdout
    if qemu:
        assert "<controller type='sata'" in res.stdout, "libvirt added no SATA controller"


def test_corrupted_image_is_refused_with_one_line_and_nothing_built(standin: dict[str, Any]) -> None:
    image = standin["images"] / IMAGE
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    res = _recipe(standin["env"])
    assert res.returncode == 1
    line = _one_error_line(res)
    assert f"{IMAGE}: SHA-512 mismatch" in line and "download it again" in line
    assert _boxes(standin["cache"]) == [] and _leftovers(standin["cache"]) == []
    assert not (standin["tmp"] / "vagrant.d" / "boxes").exists()


def test_missing_checksum_is_refused_with_one_line(standin: dict[str, Any]) -> None:
    (standin["images"] / SUMS).unlink()
    res = _recipe(standin["env"])
    assert res.returncode == 1
    assert f"no SHA-512 for {IMAGE}: put {SUMS} beside it" in _one_error_line(res)
    assert _leftovers(standin["cache"]) == []


def test_checksum_file_without_this_image_is_refused(standin: dict[str, Any]) -> None:
    (standin["images"] / SUMS).write_text(f"SHA512 (other.qcow2.xz) = {'1' * 128}\n")
    res = _recipe(standin["env"])
    assert res.returncode == 1 and "no SHA-512 for" in _one_error_line(res)


def test_pinned_sha512_replaces_the_checksum_file(standin: dict[str, Any]) -> None:
    (standin["images"] / SUMS).unlink()
    wrong = {**standin["env"], "IOMUX_FREEBSD_SHA512": "ab" * 64}
    res = _recipe(wrong)
    assert res.returncode == 1 and "SHA-512 mismatch" in _one_error_line(res)
    assert _leftovers(standin["cache"]) == []
    pinned = {**standin["env"], "IOMUX_FREEBSD_SHA512": standin["digest"].upper()}
    res = _recipe(pinned)
    assert res.returncode == 0, res.stderr
    assert len(_boxes(standin["cache"])) >= 1
    assert _vagrant(pinned, "box", "remove", "--force", STANDIN_BOX).returncode == 0


def test_a_new_image_is_a_new_recipe_hash(standin: dict[str, Any]) -> None:
    env = standin["env"]
    first = _recipe(env, "--check").stdout
    assert first.startswith("stale (installed: , recipe: ")
    other = {**env, "IOMUX_FREEBSD_SHA512": "cd" * 64}
    assert _recipe(other, "--check").stdout != first


def test_no_image_and_the_plain_image_are_one_line_each(standin: dict[str, Any]) -> None:
    image = standin["images"] / IMAGE
    image.unlink()
    res = _recipe(standin["env"])
    assert res.returncode == 1
    assert _one_error_line(res) == (
        f"freebsd-box: error: no FreeBSD {VERSION} image: put {IMAGE} and its CHECKSUM.SHA512 "
        f"in {standin['images']}, or set IOMUX_IMAGES")
    # The plain image enables neither nuageinit nor sshd: refused, and said why.
    (standin["images"] / f"FreeBSD-{VERSION}-RELEASE-amd64-ufs.qcow2.xz").write_bytes(b"x")
    res = _recipe(standin["env"])
    assert res.returncode == 1 and "has no nuageinit or sshd enabled" in _one_error_line(res)


def test_bad_arguments_are_one_line() -> None:
    res = subprocess.run([str(RECIPE), "fourteen"], capture_output=True, text=True, check=False)
    assert res.returncode == 1 and "usage:" in _one_error_line(res)


# -- the harness side: targets, the not-run line, the override --------------------------------

@pytest.mark.parametrize("name,version", [("freebsd-14", "14.4"), ("freebsd-15", "15.0")])
def test_targets_name_the_release_image_and_where_to_get_it(name: str, version: str) -> None:
    target = _freebsd_target(name)
    image = boxes.FreeBSDImage.of(target)
    assert image is not None and image.version == version
    assert image.file == f"FreeBSD-{version}-RELEASE-amd64-BASIC-CLOUDINIT-ufs.qcow2.xz"
    assert image.checksum_file == f"CHECKSUM.SHA512-FreeBSD-{version}-RELEASE-amd64"
    assert image.url == f"https://download.freebsd.org/releases/VM-IMAGES/{version}-RELEASE/amd64/Latest/"
    assert target.box == f"iomux/freebsd-{version}"


def test_freebsd_13_is_gone() -> None:
    assert "freebsd-13" not in {t.name for t in targets.load()}


class _NoBoxes(vd.VagrantDriver):
    """The driver with an empty ``vagrant box list`` (no vagrant call)."""

    def __init__(self, installed: str = "") -> None:
        super().__init__()
        self._box_list = f"1,{installed},box-name,{installed}\n" if installed else ""


@pytest.mark.parametrize("name", ["freebsd-14", "freebsd-15"])
def test_no_image_is_the_one_not_run_line(name: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(boxes.IMAGES_ENV, raising=False)
    monkeypatch.delenv(boxes.box_override_var(_freebsd_target(name)), raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    target = _freebsd_target(name)
    image = boxes.FreeBSDImage.of(target)
    assert image is not None
    reason = _NoBoxes().target_unavailable_reason(target)
    assert reason == (f"no FreeBSD {image.version} image: put {image.file} and its CHECKSUM.SHA512 "
                      "in ~/.cache/iomux, or set IOMUX_IMAGES")
    assert "\n" not in reason
    # With IOMUX_IMAGES set, the line names that directory; with both files there, no reason.
    monkeypatch.setenv(boxes.IMAGES_ENV, str(tmp_path / "img"))
    assert f"in {tmp_path / 'img'}, or set" in (_NoBoxes().target_unavailable_reason(target) or "")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / image.file).write_bytes(b"stand-in")
    assert _NoBoxes().target_unavailable_reason(target) is not None, "no checksum yet"
    (tmp_path / "img" / image.checksum_file).write_text("stand-in\n")
    assert _NoBoxes().target_unavailable_reason(target) is None
    # An installed box of the target's name is enough without the image.
    monkeypatch.setenv(boxes.IMAGES_ENV, str(tmp_path / "nothing"))
    assert _NoBoxes(installed=target.box or "").target_unavailable_reason(target) is None


def test_a_box_the_user_has_is_taken_through_the_override(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    target = _freebsd_target("freebsd-14")
    monkeypatch.setenv(boxes.IMAGES_ENV, str(tmp_path))
    monkeypatch.setenv("IOMUX_BOX_FREEBSD_14", "generic/freebsd14")
    driver = _NoBoxes(installed="generic/freebsd14")
    assert driver.box_for(target) == "generic/freebsd14"
    assert driver.target_unavailable_reason(target) is None
    assert driver.build(target, 60) == {"cached": True, "seconds": 0.0, "box": "generic/freebsd14"}
    missing = _NoBoxes().target_unavailable_reason(target)
    assert missing == ("no FreeBSD box generic/freebsd14: not in vagrant box list "
                       "(vagrant box add it, or unset IOMUX_BOX_FREEBSD_14)")


def test_build_without_image_or_box_says_the_not_run_line(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    monkeypatch.setenv(boxes.IMAGES_ENV, str(tmp_path))
    monkeypatch.setattr(boxes, "STATE_ROOT", tmp_path / "state")
    target = _freebsd_target("freebsd-15")
    with pytest.raises(TargetError, match=r"^freebsd-15: no FreeBSD 15\.0 image: put "):
        _NoBoxes().build(target, 60)


STUB_VBOXMANAGE = """#!/bin/sh
# STAND-IN for VBoxManage (no VirtualBox here): logs its arguments, and for
# `export --output FILE` writes a box.ovf and the disk that VirtualBox would.
echo "$*" >>"$STUB_LOG"
case "$1" in
  showvminfo) echo 'macaddress1="080027AABBCC"' ;;
  export) out=$4; echo '<Envelope/>' >"$out"; echo vmdk >"$(dirname "$out")/box-disk001.vmdk" ;;
esac
"""


@pytest.mark.slow
def test_virtualbox_box_with_a_stand_in_vboxmanage(standin: dict[str, Any]) -> None:
    """The VirtualBox half, where VBoxManage exists: the qcow2 goes to VMDK, VBoxManage
    builds and exports the VM, and vagrant accepts the box for the virtualbox provider.
    VBoxManage is a stub here (no VirtualBox): what is checked is the recipe's side."""
    if shutil.which("VBoxManage"):
        pytest.skip("a real VBoxManage is installed; the stub would hide it")
    stub_dir = standin["tmp"] / "stub-bin"
    stub_dir.mkdir()
    (stub_dir / "VBoxManage").write_text(STUB_VBOXMANAGE)
    (stub_dir / "VBoxManage").chmod(0o755)
    log = standin["tmp"] / "vboxmanage.log"
    env = {**standin["env"], "PATH": f"{stub_dir}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    res = _recipe(env)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["createvm", "modifyvm", "storagectl", "storageattach",
                                              "showvminfo", "export", "unregistervm"]
    assert "--storagectl SATA --port 0 --device 0 --type hdd" in calls[3]
    vbox = next(b for b in _boxes(standin["cache"]) if b.name.endswith("-virtualbox.box"))
    with tarfile.open(vbox) as tar:
        names = {n.lstrip("./") for n in tar.getnames()} - {""}
        assert names == {"metadata.json", "Vagrantfile", "box.ovf", "box-disk001.vmdk", "seed.iso",
                         "iomux-recipe.sha256"}
        meta = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("metadata.json")))
        assert meta is not None and json.loads(meta.read()) == {"provider": "virtualbox"}
        vf = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("Vagrantfile")))
        assert vf is not None and 'c.vm.base_mac = "080027AABBCC"' in vf.read().decode()
    # The VMDK the stub was given is qemu-img's conversion of the image.
    attach = calls[3].split("--medium ")[1]
    assert attach.endswith("/vbox/disk.vmdk")
    listed = _vagrant(env, "box", "list", "--machine-readable").stdout
    assert listed.count(f",box-name,{STANDIN_BOX}") == 2, listed
    assert ",box-provider,virtualbox" in listed and ",box-provider,libvirt" in listed
    for provider in ("libvirt", "virtualbox"):
        res2 = _vagrant(env, "box", "remove", "--force", "--provider", provider, STANDIN_BOX)
        assert res2.returncode == 0, res2.stderr
    assert not [n for n in _leftovers(standin["cache"]) if n.startswith("work.")]
