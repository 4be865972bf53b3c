"""Docker targets on an engine of their own: resolving it, sweeping it, and a real run.

The unit tests need no engine: a Docker CLI context made here (a temporary
DOCKER_CONFIG), the URL forms of ``docker_host`` and where each publishes, and a
sweep over fake engines. The real test starts a second ``dockerd`` on its own
socket as the "remote" engine, loads the target image into it from the main
engine, and runs ``pytest -p harness.plugin tests/cross_os -n 2`` with one target
on each engine: every suite of both must pass, and nothing of the second engine
may be left once it is stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import pytest

from harness.drivers.base import Target, TargetError
from harness.drivers.docker.driver import DockerDriver
from harness.drivers.docker.engines import Engine, resolve_engine
from harness.lifecycle import sweep_leftovers
from harness.targets import load

try:  # tomllib is 3.11+; the harness also runs on 3.9/3.10 hosts with tomli.
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
TARGETS_TOML = REPO / "targets.toml"
#: The target run on the second engine; its image comes from the main engine.
TARGET_NAME = "debian-12"
#: --inner-k: one test of each file of the suites run inside the target.
INNER_SELECTION = " or ".join((
    "echo_8_mib_sha256", "forked_server_holds_the_descriptors", "probe_all_with_hung_after",
    "partial_writes_sha256", "black_holed_peer_via_proxy", "slicing_sends_one_byte",
    "every_client_gets_exactly"))
#: The host-side tests of those suites: the probe, and the wrappers of the inner runs.
_WRAPPERS = ("test_probe", "test_behaviour_suite", "test_fault_suite")


def _target(name: str = "t", **options: Any) -> Target:
    return Target(name=name, kind="docker", os_family="linux", backends=("select",),
                  image="debian:bookworm", options=options)


@pytest.fixture
def docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Docker CLI configuration directory, and no engine in the environment."""
    config = tmp_path / "docker-config"
    config.mkdir()
    # ContextAPI reads contexts beside config.json (docker/engines.py docstring).
    (config / "config.json").write_text("{}")
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    for name in ("DOCKER_HOST", "DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
        monkeypatch.delenv(name, raising=False)
    return config


def make_context(config: Path, name: str, host: str, tls: bool = False) -> None:
    """What ``docker context create NAME --docker host=HOST[,ca=,cert=,key=]`` writes."""
    context_id = hashlib.sha256(name.encode()).hexdigest()
    meta = config / "contexts" / "meta" / context_id
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(json.dumps({
        "Name": name, "Metadata": {},
        "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": not tls}}}))
    if tls:
        certs = config / "contexts" / "tls" / context_id / "docker"
        certs.mkdir(parents=True)
        for file in ("ca.pem", "cert.pem", "key.pem"):
            (certs / file).write_text("not a real certificate\n")


# -- resolving an engine ---------------------------------------------------------


def test_a_context_resolves_to_its_host_and_tls(docker_config: Path) -> None:
    make_context(docker_config, "build-box", "tcp://192.0.2.10:2376", tls=True)
    engine = resolve_engine(_target(docker_context="build-box"))
    assert engine.base_url == "tcp://192.0.2.10:2376"
    assert engine.tls is not None and engine.tls.verify is True
    assert engine.tls.cert == (str(docker_config / "contexts" / "tls" /
                                   hashlib.sha256(b"build-box").hexdigest() / "docker" /
                                   "cert.pem"),
                               str(docker_config / "contexts" / "tls" /
                                   hashlib.sha256(b"build-box").hexdigest() / "docker" /
                                   "key.pem"))
    assert engine.label == "context build-box"
    assert engine.cli_args == ("--context", "build-box")
    # its published ports are on that machine, bound to that address
    assert engine.published_host == "192.0.2.10"
    assert engine.bind_address == "192.0.2.10"


def test_a_context_without_tls_and_the_current_context(docker_config: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    make_context(docker_config, "second", "unix:///run/second/docker.sock")
    engine = resolve_engine(_target(docker_context="second"))
    assert (engine.base_url, engine.tls, engine.published_host) == (
        "unix:///run/second/docker.sock", None, "127.0.0.1")
    # a target that names none gets the current context, as the docker CLI would
    monkeypatch.setenv("DOCKER_CONTEXT", "second")
    default = resolve_engine(_target())
    assert (default.base_url, default.label, default.cli_args) == (
        "unix:///run/second/docker.sock", "default", ())
    monkeypatch.delenv("DOCKER_CONTEXT")
    (docker_config / "config.json").write_text(json.dumps({"currentContext": "second"}))
    assert resolve_engine(None).base_url == "unix:///run/second/docker.sock"


def test_a_missing_context_is_one_line(docker_config: Path) -> None:
    with pytest.raises(TargetError, match=r"^t: no Docker context 'gone' \(docker context "
                                          r"ls lists them\)$"):
        resolve_engine(_target(docker_context="gone"))
    (docker_config / "config.json").unlink()
    with pytest.raises(TargetError, match=r"no config\.json in") as caught:
        resolve_engine(_target(docker_context="gone"))
    assert "\n" not in str(caught.value)


def test_the_default_engine_follows_docker_host(docker_config: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_engine(None) == Engine("")
    monkeypatch.setenv("DOCKER_HOST", "tcp://198.51.100.4:2375")
    engine = resolve_engine(_target())
    assert (engine.base_url, engine.label, engine.published_host) == (
        "tcp://198.51.100.4:2375", "default", "198.51.100.4")


@pytest.mark.parametrize(("url", "published", "bind"), [
    ("unix:///tmp/e2/docker.sock", "127.0.0.1", "127.0.0.1"),
    ("tcp://127.0.0.1:2375", "127.0.0.1", "127.0.0.1"),
    ("tcp://localhost:2375", "127.0.0.1", "127.0.0.1"),
    ("tcp://192.0.2.7:2375", "192.0.2.7", "192.0.2.7"),
    ("tcp://[2001:db8::7]:2375", "2001:db8::7", "2001:db8::7"),
    # an engine cannot bind a name: every address of that machine
    ("ssh://ci@build-box.example", "build-box.example", "0.0.0.0"),
    ("ssh://ci@192.0.2.8:2222", "192.0.2.8", "192.0.2.8"),
])
def test_docker_host_publishes_on_its_machine(url: str, published: str, bind: str) -> None:
    engine = resolve_engine(_target(docker_host=url))
    assert (engine.base_url, engine.published_host, engine.bind_address) == (url, published,
                                                                            bind)
    assert engine.cli_args == ("--host", url)


@pytest.mark.parametrize(("options", "message"), [
    ({"docker_host": "http://x:1"}, "must be unix://, tcp:// or ssh://"),
    ({"docker_host": ""}, "docker_host must be a non-empty string"),
    ({"docker_context": 3}, "docker_context must be a non-empty string"),
    ({"docker_host": "unix:///a", "docker_context": "b"}, "not both"),
])
def test_a_wrong_engine_option_is_one_line(options: dict[str, Any], message: str) -> None:
    with pytest.raises(TargetError, match=message):
        resolve_engine(_target(**options))


# -- sweeping every engine -------------------------------------------------------


class FakeEngineClient:
    """An engine's client that has nothing of ours, or does not answer."""

    def __init__(self, url: str, visits: list[str], down: bool) -> None:
        self.url, self.visits, self.down = url, visits, down
        self.containers = self.networks = self.images = self

    def list(self, **_kwargs: Any) -> list[Any]:
        if self.down:
            raise ConnectionError(f"connection refused\nby {self.url}")
        self.visits.append(self.url)
        return []


def test_the_sweep_visits_every_engine_once(docker_config: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    make_context(docker_config, "ctx", "unix:///run/ctx.sock")
    visits: list[str] = []
    driver = DockerDriver()
    monkeypatch.setattr(driver, "_client_of", lambda engine: FakeEngineClient(
        engine.base_url, visits, down=engine.base_url.startswith("tcp://")))
    targets = [_target("a", docker_host="unix:///run/a.sock"),
               _target("b", docker_host="unix:///run/a.sock"),
               _target("c", docker_context="ctx"),
               _target("d", docker_host="tcp://127.0.0.1:1"),
               _target("e", docker_context="gone"),
               _target("f")]
    removed = driver.sweep(None, targets)
    # the default engine first, then each named one once (containers, networks, images)
    assert visits == [url for url in ("", "unix:///run/a.sock", "unix:///run/ctx.sock")
                      for _ in range(3)]
    assert removed == [
        "engine not resolved: e: no Docker context 'gone' (docker context ls lists them)",
        "engine tcp://127.0.0.1:1: not swept: connection refused"]
    visits.clear()
    driver.sweep("run-1")  # no targets: the default engine only, without images
    assert visits == ["", ""]


class RecordingDriver(DockerDriver):
    """A docker driver whose sweep only records what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.given: list[tuple[str | None, list[str]]] = []

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        self.given.append((run_id, [t.name for t in targets]))
        return []


def test_sweep_leftovers_gives_each_driver_its_kinds_targets() -> None:
    driver = RecordingDriver()
    local = dataclasses.replace(_target("here"), kind="local")
    sweep_leftovers({"docker": driver}, None, targets=[_target("a"), local, _target("b")])
    sweep_leftovers({"docker": driver}, ["r1"], targets=[_target("a")])
    assert driver.given == [(None, ["a", "b"]), ("r1", ["a"])]


# -- a target on an engine of another machine -----------------------------------


class FakeContainer:
    """A started container whose requested ports are published as asked."""

    def __init__(self, ports: dict[str, tuple[str, None]]) -> None:
        self.id, self.status = "c0ffee", "running"
        self.attrs = {"NetworkSettings": {"Ports": {
            port: [{"HostIp": ip, "HostPort": str(40000 + n)}]
            for n, (port, (ip, _)) in enumerate(sorted(ports.items()))}}}

    def reload(self) -> None:
        pass


class FakeRunClient:
    """Just enough of an engine's client for ``DockerDriver.start``."""

    def __init__(self) -> None:
        self.networks = self.containers = self
        self.ports: dict[str, tuple[str, None]] = {}

    def create(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def run(self, *_args: Any, ports: dict[str, tuple[str, None]], **_kwargs: Any) -> Any:
        self.ports = ports
        return FakeContainer(ports)


def test_a_remote_engine_publishes_and_is_reached_on_its_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = "tcp://192.0.2.7:2375"
    target = dataclasses.replace(_target(docker_host=url), backends=("select", "epoll"))
    driver = DockerDriver()
    client = FakeRunClient()
    monkeypatch.setattr(driver, "_client_of", lambda engine: client)
    instance = driver.start(target, "run-1", "gw0", timeout=10)
    assert {ip for ip, _ in client.ports.values()} == {"192.0.2.7"}
    assert {host for host, _ in instance.echo_ports.values()} == {"192.0.2.7"}
    assert driver.echo_address(instance, "epoll")[0] == "192.0.2.7"
    assert driver.published_host(target) == "192.0.2.7"
    # testinfra runs the docker CLI on the same engine
    spec, kwargs = driver.testinfra_spec(instance)
    assert spec == f"iomux-docker://{instance.resource_name}"
    assert kwargs == {"docker_cli": ("--host", url)}
    import testinfra

    host = testinfra.get_host(spec, **kwargs)
    ran: list[str] = []

    def run_local(command: str, *args: str) -> Any:
        ran.append(command % args)
        return host.backend.result(0, b"", b"", b"")

    monkeypatch.setattr(host.backend, "run_local", run_local)
    host.run("id -u")
    assert ran and ran[0].startswith(f"docker --host {url} exec {instance.resource_name} ")


# -- a real second engine --------------------------------------------------------


def _second_engine_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "a second dockerd runs on Linux only"
    if os.geteuid() != 0:
        return "starting a second dockerd needs root"
    missing = [tool for tool in ("dockerd", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed"
    reason = DockerDriver().unavailable_reason()
    return f"the main engine is needed for the image: {reason}" if reason else None


def _lines(*argv: str) -> list[str]:
    if shutil.which(argv[0]) is None:
        return []
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                          check=False).stdout.splitlines()


def _free_pool() -> str:
    """A 10.x.0.0/16 no route of this host uses, for the second engine's bridge and
    networks (two such tests at once must not pick the same)."""
    routes = "\n".join(_lines("ip", "-4", "route"))
    for octet in random.sample(range(200, 250), 50):
        if f"10.{octet}." not in routes:
            return f"10.{octet}.0.0/16"
    raise RuntimeError("no free 10.x.0.0/16 for the second engine")


def _made_by(bridge: str, pool: str) -> list[str]:
    """What of the second engine is on the host: its bridge, its networks' routes
    (in ``pool``) and any firewall rule naming either. Other runs' Docker networks
    on the main engine come and go meanwhile; these are the second engine's only."""
    prefix = pool.split(".0.0/")[0] + "."
    found = [f"link {line.split()[1]}" for line in _lines("ip", "-o", "link")
             if line.split()[1].rstrip(":").split("@")[0] == bridge]
    found += [f"route {line}" for line in _lines("ip", "-4", "route") if line.startswith(prefix)]
    for tool in ("iptables-save", "ip6tables-save"):
        found += [f"{tool}: {line}" for line in _lines(tool) if prefix in line or bridge in line]
    return found


@dataclasses.dataclass
class SecondEngine:
    """A dockerd of this test's own, and where it keeps everything."""

    root: Path
    bridge: str
    pool: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"


def _mounts_under(path: Path) -> list[str]:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [m for m in mounts if m == str(path) or m.startswith(f"{path}/")]


@contextlib.contextmanager
def second_engine() -> Iterator[SecondEngine]:
    """Start a second dockerd beside the main one, and afterwards stop it and remove
    everything it had. Found here (Docker 20.10):

    - ``--bridge=none`` must not be used: a dockerd without a default bridge
      *deletes the link named docker0* when it starts (removeDefaultBridgeInterface),
      which is the main engine's. It gets a bridge of its own instead, made here
      (``--bridge=NAME`` takes only an existing link: "bridge device with non
      default name NAME must be created manually"), and addresses from a pool of
      its own, so that neither engine hands out a subnet the other uses.
    - ``--iptables=false --ip6tables=false --ip-forward=false --ip-masq=false``:
      it leaves the host's firewall and sysctls as they are (the main engine's
      DOCKER chains stay the main engine's). Published ports on 127.0.0.1 still
      work: the userland proxy (docker-proxy, on by default) listens there and
      connects to the container over the bridge; no NAT is needed for that.
    - Its own --data-root, --exec-root, --pidfile, socket and an empty
      --config-file, so nothing of /etc/docker/daemon.json or /var/lib/docker is
      shared. With no system containerd (/run/containerd/containerd.sock absent,
      as here) it starts a containerd of its own under the exec root; where one
      runs, it would use that one, so it gets containerd namespaces of its own.
    - It is up in about a second; SIGTERM stops it, its containerd and their
      mounts, and leaves its bridge, which is deleted here.
    """
    # The directory's name is the engine's containerd namespace too, and containerd
    # takes only [A-Za-z0-9]+ joined by single '.', '_' or '-' (identifiers.Validate:
    # "namespace validation: identifier ... must match"), so it is made of hex here:
    # mkdtemp's suffix may start or end with '_' or hold '__', which failed about one
    # run in twenty at container start. /tmp keeps the socket path short.
    root = Path("/tmp") / f"iomux-e2-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o700)
    bridge = f"iomuxe2{uuid.uuid4().hex[:8]}"  # 15 characters at most
    pool = _free_pool()
    (root / "daemon.json").write_text("{}")
    subprocess.run(["ip", "link", "add", "name", bridge, "type", "bridge"], check=True,
                   timeout=30)
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        ["dockerd", "--config-file", str(root / "daemon.json"),
         "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "docker.pid"), "-H", f"unix://{root / 'docker.sock'}",
         f"--bridge={bridge}", "--iptables=false", "--ip6tables=false",
         "--ip-forward=false", "--ip-masq=false",
         "--containerd-namespace", root.name, "--containerd-plugins-namespace",
         f"{root.name}-plugins",
         "--default-address-pool", f"base={pool},size=24", "--log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = SecondEngine(root, bridge, pool, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(Exception):  # the SDK asks for /version at once
                Engine(engine.url).client(timeout=30).ping()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the second dockerd did not come up: "
                                   f"{(root / 'dockerd.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield engine
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)
        log.close()
        subprocess.run(["ip", "link", "del", bridge], check=False, timeout=30,
                       capture_output=True)
        for mount in sorted(_mounts_under(root), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_targets(path: Path, tables: list[dict[str, Any]]) -> None:
    """targets.toml of ``tables`` (strings, numbers, lists and one level of sub-tables)."""
    lines: list[str] = []
    for table in tables:
        lines.append("[[target]]")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in subtables]
        for key, sub in subtables.items():
            lines.append(f"[target.{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
        lines.append("")
    path.write_text("\n".join(lines))


def _declared(name: str) -> dict[str, Any]:
    with open(TARGETS_TOML, "rb") as fh:
        tables: list[dict[str, Any]] = tomllib.load(fh)["target"]
    return dict(next(t for t in tables if t["name"] == name))


def _ours_on(client: Any) -> list[str]:
    label = {"label": ["io.iomux.project=iomux"]}
    return ([f"container {c.name}" for c in client.containers.list(all=True, filters=label)]
            + [f"network {n.name}" for n in client.networks.list(filters=label)])


@pytest.mark.slow
@pytest.mark.long(57)
@pytest.mark.xdist_group("remote-engine")
@pytest.mark.skipif(_second_engine_reason() is not None, reason=str(_second_engine_reason()))
def test_a_target_on_a_second_engine_passes_all_its_suites(tmp_path: Path) -> None:
    """``-n 2``: debian-12 on the second engine (an xdist worker's target there) and
    the same recipe on the default engine, at once; both pass every suite. The suites
    run inside the target run a selection (--inner-k, one test of each of their files):
    what this proves is the engine's transport, which every file's tests use alike."""
    main = DockerDriver()
    declared = _declared(TARGET_NAME)
    # The image as the main engine has it (built, or found cached): the second engine
    # gets it and its base by save and load, so its build step finds both cached.
    built = main.build(next(t for t in load() if t.name == TARGET_NAME), timeout=1800)
    on_main = f"{TARGET_NAME}-main"
    try:
        with second_engine() as engine:
            remote = Engine(engine.url).client(timeout=300)
            for ref in (str(built["base"]), str(built["image"])):
                remote.images.load(main.client().images.get(ref).save(named=True))
            targets = tmp_path / "targets.toml"
            write_targets(targets, [{**declared, "docker_host": engine.url},
                                    {**declared, "name": on_main,
                                     "description": "debian-12 on the default engine"}])
            reports = tmp_path / "reports"
            env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p",
                 "no:cacheprovider", "tests/cross_os", "--reports-dir", str(reports),
                 "--targets-file", str(targets), "--targets", f"{TARGET_NAME},{on_main}",
                 "-n", "2", "--dist", "loadgroup", "--inner-k", INNER_SELECTION],
                cwd=REPO, capture_output=True, text=True, timeout=1200, env=env, check=False)
            assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
            results = json.loads((reports / "latest" / "results.json").read_text())
            assert results["run"]["inner_selection"] == INNER_SELECTION
            by_name = {t["name"]: t for t in results["targets"]}
            chosen = INNER_SELECTION.split(" or ")
            for name in (TARGET_NAME, on_main):
                assert by_name[name]["status"] == "passed", by_name[name]["reason"]
                suites = by_name[name]["suites"]
                assert {"in-guest", "faults", "black-box", "host"} <= set(suites), suites
                inner = [t["name"] for t in by_name[name]["tests"]
                         if t["suite"] in ("in-guest", "faults")
                         and t["name"].split("::")[-1].split("[")[0] not in _WRAPPERS]
                # every selected test ran inside the target, and nothing else did
                assert all(any(c in n for n in inner) for c in chosen), inner
                assert all(any(c in n for c in chosen) for n in inner), inner
                assert all(counts.get("failed", 0) == 0 and counts.get("error", 0) == 0
                           for counts in suites.values()), suites
            # the same suites ran the same tests on both engines
            assert by_name[TARGET_NAME]["suites"] == by_name[on_main]["suites"]
            assert by_name[TARGET_NAME]["build"]["cached"] is True
            assert _ours_on(remote) == []  # destroyed by the run
            # up, the engine has its bridge and that bridge's route on the host, no more
            assert [m.split()[0] for m in _made_by(engine.bridge, engine.pool)] == [
                "link", "route"]
    finally:
        with contextlib.suppress(Exception):
            main.client().images.remove(f"iomux/{on_main}:latest", force=True)
        for image in main.client().images.list(name=f"iomux/{on_main}"):
            with contextlib.suppress(Exception):
                main.client().images.remove(image.id, force=True)
    assert not Path(engine.root).exists()
    assert _processes_of(engine.root) == []
    assert _made_by(engine.bridge, engine.pool) == []


def _processes_of(root: Path) -> list[str]:
    """Processes whose command line names ``root`` (dockerd, its containerd, shims)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(root).encode() in cmdline.read_bytes():
                found.append(cmdline.parent.name)
    return found
