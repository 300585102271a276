"""Deployment files, checked offline: the compose file against the compose spec, the
Dockerfiles linted, every k3s overlay rendered and validated, and the broker configuration of
compose/ actually started: passwords, ACL, TLS and websockets enforced and working."""

from __future__ import annotations

import asyncio
import queue
import re
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from offramp.local.broker import free_port

pytestmark = pytest.mark.tier("deploy")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (it comes with the dev extra: pip install -e .[dev])")
    return str(path)


def test_compose_file_follows_the_compose_spec() -> None:
    out = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "docker-compose.yml")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", sorted(str(p.relative_to(ROOT)) for p in [
    ROOT / "services/Dockerfile", *ROOT.glob("services/*/Dockerfile*"),
    ROOT / "compose/builder.Dockerfile"]))
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    out = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", dockerfile],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("overlay", ["single-node", "jetson"])
def test_k3s_overlays_render_and_validate(overlay: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the Kustomize overlays")
    rendered = subprocess.run([kubectl, "kustomize", str(ROOT / "k3s/overlays" / overlay)],
                              capture_output=True, text=True, check=False)
    assert rendered.returncode == 0, rendered.stderr
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(rendered.stdout)
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", "-k", "1.32.0", "--quiet",
                          str(manifest)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    docs = rendered.stdout
    assert "app.kubernetes.io/part-of: offramp" in docs
    assert docs.count("readinessProbe") >= 5 and "terminationGracePeriodSeconds: 30" in docs
    if overlay == "jetson":
        assert "runtimeClassName: nvidia" in docs and "offramp/segment-worker:jetson" in docs
        assert "OFFRAMP_WORKER_TRT_CACHE" in docs and "volumeClaimTemplates" in docs
        assert docs.count("offramp.io/role: gateway") == 4


@pytest.mark.parametrize(("overlay", "workers"), [("single-node", 2), ("jetson", 3)])
def test_every_k3s_pod_finds_its_own_broker_user(overlay: str, workers: int,
                                                 tmp_path: Path) -> None:
    """k3s/make-secrets.sh and the manifests agree: each pod of each StatefulSet has a password
    file named after it in the Secret it mounts, and an ACL section of its own."""
    import base64

    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: cannot render the Kustomize overlays")
    rendered = subprocess.run([kubectl, "kustomize", str(ROOT / "k3s/overlays" / overlay)],
                              capture_output=True, text=True, check=True).stdout
    subprocess.run(["bash", str(ROOT / "k3s/make-secrets.sh"), "--workers", str(workers),
                    "--out", str(tmp_path), "cam-1"], check=True, capture_output=True)
    secrets = {d["metadata"]["name"]: {k: base64.b64decode(v).decode()
                                        for k, v in d["data"].items()}
               for d in yaml.safe_load_all((tmp_path / "secrets.yaml").read_text()) if d}
    acl = secrets["offramp-broker-users"]["acl"]
    pods = 0
    for doc in yaml.safe_load_all(rendered):
        if doc["kind"] == "Deployment":  # the broker
            users = next(v for v in doc["spec"]["template"]["spec"]["volumes"]
                         if v["name"] == "users")["secret"]
            assert {i["key"] for i in users["items"]} <= set(secrets[users["secretName"]])
        if doc["kind"] != "StatefulSet":
            continue
        spec = doc["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value", e.get("valueFrom")) for e in spec["containers"][0]["env"]}
        assert env["OFFRAMP_NODE"] == env["OFFRAMP_USERNAME"] == {
            "fieldRef": {"fieldPath": "metadata.name"}}
        assert env["OFFRAMP_PASSWORD_FILE"] == "/credentials/$(OFFRAMP_NODE)"
        mounted = next(v for v in spec["volumes"] if v["name"] == "credentials")["secret"]
        files = secrets[mounted["secretName"]]
        if "OFFRAMP_ADMISSION_INGEST_PASSWORD_FILE" in env:
            assert env["OFFRAMP_ADMISSION_INGEST_PASSWORD_FILE"] == "/credentials/" + env[
                "OFFRAMP_ADMISSION_INGEST_USERNAME"]
            assert env["OFFRAMP_ADMISSION_INGEST_USERNAME"] in files
        for i in range(doc["spec"]["replicas"]):
            pod = f"{doc['metadata']['name']}-{i}"
            assert pod in files, (pod, mounted["secretName"], sorted(files))
            assert f"\nuser {pod}\n" in acl
            pods += 1
    assert pods == workers + 2 + 1 + 1
    assert set(secrets["offramp-worker-credentials"]) == {
        f"offramp-segment-worker-{i}" for i in range(workers)}


MEMBERS = {"shared": "offramp", "services/admission-controller": "admission_controller",
           "services/segment-worker": "segment_worker", "services/exit-arbiter": "exit_arbiter",
           "services/priority-scheduler": "priority_scheduler"}


@pytest.mark.parametrize("member", sorted(MEMBERS))
def test_the_wheel_the_images_install_holds_every_module(tmp_path: Path, member: str) -> None:
    """The images install each member as a wheel, not as the editable checkout the tests use:
    a package missing from a pyproject.toml breaks only them (it did, for offramp.policy)."""
    src = tmp_path / "src"  # a clean copy: setuptools would reuse a stale build/ of the checkout
    shutil.copytree(ROOT / member, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info",
                                                                      "build"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    str(src)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / member / MEMBERS[member]
    wanted = {f"{MEMBERS[member]}/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")}
    assert wanted and wanted - names == set()
    assert all(n.split("/", 1)[0] in (MEMBERS[member], wheel.name.split("-")[0] + "-" +
                                      wheel.name.split("-")[1] + ".dist-info") for n in names), \
        "a wheel holds its own package and nothing else at the top of site-packages"


def test_every_service_is_a_workspace_member_with_an_entry_point() -> None:
    for member, package in MEMBERS.items():
        if member == "shared":
            continue
        meta = tomllib.loads((ROOT / member / "pyproject.toml").read_text())["project"]
        name = member.split("/", 1)[1]
        assert meta["entry-points"]["offramp.services"] == {name: f"{package}.service:SERVICE"}
        assert meta["scripts"] == {f"offramp-{name}": f"{package}.__main__:cli"}
        library = [d for d in meta["dependencies"] if d.startswith("offramp")]
        assert len(library) == 1, meta["dependencies"]
        # a service whose code decodes images installs Pillow with the library (a worker
        # image without it failed every frame it was sent as the camera's bytes)
        decodes = any(re.search(r"offramp\.model\.(images|frames)\b", p.read_text())
                      for p in (ROOT / member / package).rglob("*.py"))
        extras = set(re.findall(r"\[([^]]*)\]", library[0])[0].split(",")) if "[" in library[0] \
            else set()
        assert ("images" in extras) == decodes, (member, library[0])


# PyPI's onnxruntime-gpu links CUDA 12 up to 1.26 and CUDA 13 from 1.27 (read from the wheels'
# metadata and NEEDED entries); a wheel for the other CUDA loads no CUDA library and runs on CPU.
ORT_GPU_CUDA13_FROM = "1.27"


def _cuda_of(spec: str) -> int:
    """The CUDA major version a specifier of onnxruntime-gpu admits (only one may be)."""
    admitted = SpecifierSet(spec.split("onnxruntime-gpu", 1)[1])
    majors = {12 if Version(v) < Version(ORT_GPU_CUDA13_FROM) else 13
              for v in ("1.20", "1.26.9", ORT_GPU_CUDA13_FROM, "1.99") if v in admitted}
    assert len(majors) == 1, f"{spec!r} admits wheels for CUDA {sorted(majors)}"
    return majors.pop()


def test_the_cuda_image_installs_an_onnxruntime_gpu_for_its_cuda() -> None:
    text = (ROOT / "services/segment-worker/Dockerfile.cuda").read_text()
    image = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", text, re.M)
    wheel = re.search(r'^ARG ORT_GPU="([^"]+)"', text, re.M)
    assert image and wheel, "Dockerfile.cuda names its CUDA image and its onnxruntime-gpu"
    assert '"${ORT_GPU}"' in text, "the install step uses ORT_GPU"
    assert _cuda_of(wheel.group(1)) == int(image.group(1))
    extras = tomllib.loads((ROOT / "services/segment-worker/pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert [_cuda_of(extras["gpu"][0]), _cuda_of(extras["gpu-cuda12"][0])] == [13, 12]


def test_k3s_broker_config_matches_compose() -> None:
    def meaningful(path: Path) -> list[str]:
        lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
        return [ln.replace("/mosquitto/users/", "/mosquitto/config/") for ln in lines
                if not ln.startswith("include_dir")]

    assert meaningful(ROOT / "k3s/base/mosquitto.conf") == meaningful(ROOT / "compose/mosquitto.conf")


# -- the compose broker, for real ---------------------------------------------------------------

class SecureBroker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mqtt, self.tls, self.ws = free_port(), free_port(), free_port()
        compose = root / "compose"
        shutil.copytree(ROOT / "compose", compose, ignore=shutil.ignore_patterns(
            "passwd", ".env", "certs", "tls.conf"))
        subprocess.run(["bash", str(compose / "make-passwords.sh"), "cam-1", "cam-2"], check=True,
                       capture_output=True)
        subprocess.run(["bash", str(compose / "make-certs.sh"), "localhost"], check=True,
                       capture_output=True)
        self.passwords = dict(line.split("=", 1) for line in
                              (compose / ".env").read_text().splitlines())
        (root / "data").mkdir()
        conf = (compose / "mosquitto.conf").read_text()
        conf = conf.replace("listener 1883 0.0.0.0", f"listener {self.mqtt} 127.0.0.1")
        conf = conf.replace("listener 9001 0.0.0.0", f"listener {self.ws} 127.0.0.1")
        conf = conf.replace("/mosquitto/data/", f"{root}/data/")
        conf = conf.replace("/mosquitto/config/", f"{compose}/")
        conf = conf.replace("log_dest stdout", "log_dest stderr")
        tls = (compose / "conf.d/tls.conf").read_text()
        tls = tls.replace("listener 8883 0.0.0.0", f"listener {self.tls} 127.0.0.1")
        (compose / "conf.d/tls.conf").write_text(tls.replace("/mosquitto/config/", f"{compose}/"))
        import getpass

        self.config = root / "mosquitto.conf"
        self.config.write_text(f"user {getpass.getuser()}\n" + conf)
        self.ca = compose / "certs/ca.crt"
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self._listening():
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto did not start: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            time.sleep(0.05)

    def _listening(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.mqtt), timeout=0.2):
                return True
        except OSError:
            return False

    def password(self, user: str) -> str:
        return self.passwords[f"OFFRAMP_PASSWORD_{user.upper().replace('-', '_')}"]

    def client(self, user: str, password: str | None = None, *, port: int | None = None,
               transport: str = "tcp", tls: bool = False, client_id: str | None = None,
               ) -> tuple[mqtt.Client, queue.Queue[str]]:
        """A connected paho client; what it receives lands in the queue as "topic payload",
        and a disconnect the client did not ask for as "DISCONNECTED <reason>"."""
        got: queue.Queue[str] = queue.Queue()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                        client_id=client_id or f"t-{user}-{time.monotonic_ns()}",
                        protocol=mqtt.MQTTv5, transport=transport)  # type: ignore[arg-type]
        c.on_disconnect = lambda cl, ud, fl, rc, pr: got.put(f"DISCONNECTED {rc}")
        c.username_pw_set(user, self.password(user) if password is None else password)
        if tls:
            c.tls_set(ca_certs=str(self.ca), cert_reqs=ssl.CERT_REQUIRED)
        connected: queue.Queue[int] = queue.Queue()
        c.on_connect = lambda cl, ud, fl, rc, pr: connected.put(rc.value)
        c.on_message = lambda cl, ud, msg: got.put(f"{msg.topic} {msg.payload.decode()}")
        c.connect("localhost" if tls else "127.0.0.1", port or self.mqtt)
        c.loop_start()
        rc = connected.get(timeout=5)
        if rc != 0:
            c.loop_stop()
            raise PermissionError(f"refused with reason {rc}")
        return c, got

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    broker = SecureBroker(tmp_path_factory.mktemp("secure-broker"))
    yield broker
    broker.close()


def _drain(q: queue.Queue[str], wait_s: float = 0.7) -> list[str]:
    time.sleep(wait_s)
    out = []
    while not q.empty():
        out.append(q.get())
    return out


def test_no_anonymous_access_and_wrong_passwords_are_refused(secure_broker: SecureBroker) -> None:
    with pytest.raises(PermissionError):
        secure_broker.client("cam-1", "wrong-password")
    with pytest.raises(PermissionError):
        secure_broker.client("nobody", "")
    c, _ = secure_broker.client("cam-1")
    c.disconnect()


def test_acl_confines_each_role_to_its_topics(secure_broker: SecureBroker) -> None:
    op, seen = secure_broker.client("operator")
    op.subscribe("offramp/v1/#", qos=1)
    cam, cam_got = secure_broker.client("cam-1")
    cam.subscribe("offramp/v1/results/+", qos=1)
    adm, _ = secure_broker.client("admission-1")
    time.sleep(0.3)
    for topic in ("offramp/v1/ingest/cam-1", "offramp/v1/ingest/cam-2",
                  "offramp/v1/act/m/1/worker-1", "offramp/v1/control/plan"):
        cam.publish(topic, "from-cam-1", qos=1).wait_for_publish(5)
    adm.publish("offramp/v1/results/cam-1", "yours", qos=1).wait_for_publish(5)
    adm.publish("offramp/v1/results/cam-2", "not yours", qos=1).wait_for_publish(5)
    adm.publish("offramp/v1/ingest/cam-1", "admission may not publish frames", qos=1)
    operator_saw = _drain(seen)
    assert "offramp/v1/ingest/cam-1 from-cam-1" in operator_saw
    assert not any(s.startswith(("offramp/v1/ingest/cam-2", "offramp/v1/act/",
                                 "offramp/v1/control/plan")) for s in operator_saw), operator_saw
    assert "offramp/v1/ingest/cam-1 admission may not publish frames" not in operator_saw
    assert _drain(cam_got, 0.1) == ["offramp/v1/results/cam-1 yours"]
    for c in (op, cam, adm):
        c.disconnect()
        c.loop_stop()


def test_the_compose_broker_healthcheck_passes(secure_broker: SecureBroker) -> None:
    """docker-compose.yml's broker healthcheck, run as written: the services wait for it."""
    import yaml

    test = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["broker"][
        "healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("$$", "$").replace("mosquitto_sub ",
                                                 f"mosquitto_sub -p {secure_broker.mqtt} ", 1)
    env = {"PATH": "/usr/bin:/bin", "OFFRAMP_PASSWORD_HEALTHCHECK": secure_broker.passwords[
        "OFFRAMP_PASSWORD_HEALTHCHECK"]}
    done = subprocess.run(["sh", "-c", command], check=False, env=env, capture_output=True,
                          text=True, timeout=10)
    assert done.returncode == 0, done.stderr


def test_tls_and_websocket_listeners_work(secure_broker: SecureBroker) -> None:
    c, got = secure_broker.client("operator", port=secure_broker.tls, tls=True)
    c.subscribe("offramp/v1/results/+", qos=1)
    ws, _ = secure_broker.client("admission-1", port=secure_broker.ws, transport="websockets")
    time.sleep(0.3)
    ws.publish("offramp/v1/results/cam-1", "over websockets", qos=1).wait_for_publish(5)
    assert _drain(got) == ["offramp/v1/results/cam-1 over websockets"]
    for cl in (c, ws):
        cl.disconnect()
        cl.loop_stop()
    assert re.search(r"listener \d+ 127\.0\.0\.1", (secure_broker.root / "compose/conf.d/tls.conf")
                     .read_text())


def test_a_publish_the_broker_refuses_fails_with_its_reason(secure_broker: SecureBroker) -> None:
    """MQTT v5 brokers answer a QoS 1 publish the ACL denies with a failure reason code in the
    PUBACK: the bus raises it at once, where a success would silently lose the frame."""
    from offramp.bus import Bus
    from offramp.errors import BusError
    from offramp.settings import BusSettings

    settings = BusSettings(broker_url=f"mqtt://127.0.0.1:{secure_broker.mqtt}",
                           username="cam-1", password=secure_broker.password("cam-1"))

    async def go() -> None:
        async with Bus(settings, "t-refused") as bus:
            await bus.wait_connected(5)
            await bus.publish("offramp/v1/ingest/cam-1", b"mine", qos=1)
            with pytest.raises(BusError, match=r"refused.*[Nn]ot authori[sz]ed"):
                await asyncio.wait_for(bus.publish("offramp/v1/ingest/cam-2", b"not mine",
                                                   qos=1), 5)
            await bus.publish("offramp/v1/ingest/cam-1", b"still connected", qos=1)

    asyncio.run(go())


def test_each_node_publishes_only_its_own_state_and_reads_only_its_own_activations(
        secure_broker: SecureBroker) -> None:
    """Per-instance credentials: worker-1 cannot fake worker-gpu-1's heartbeat or its offline
    message, nor read activations addressed to it; a camera named like a node gets nothing."""
    op, seen = secure_broker.client("operator")
    op.subscribe("offramp/v1/#", qos=1)
    w1, w1_got = secure_broker.client("worker-1")
    w1.subscribe("offramp/v1/act/+/+/worker-gpu-1", qos=1)
    w1.subscribe("offramp/v1/act/+/+/worker-1", qos=1)
    adm, _ = secure_broker.client("admission-1")
    time.sleep(0.3)
    w1.publish("offramp/v1/state/worker/worker-1", "mine", qos=1).wait_for_publish(5)
    for forged in ("offramp/v1/state/worker/worker-gpu-1", "offramp/v1/state/admission/x",
                   "offramp/v1/control/plan", "offramp/v1/results/cam-1"):
        w1.publish(forged, "forged", qos=1).wait_for_publish(5)
    adm.publish("offramp/v1/act/m/1/worker-gpu-1", "for gpu", qos=1).wait_for_publish(5)
    adm.publish("offramp/v1/act/m/1/worker-1", "for w1", qos=1).wait_for_publish(5)
    adm.publish("offramp/v1/state/admission/admission-2", "forged", qos=1).wait_for_publish(5)
    operator_saw = _drain(seen)
    assert "offramp/v1/state/worker/worker-1 mine" in operator_saw
    assert not [m for m in operator_saw if m.endswith("forged")], operator_saw
    assert _drain(w1_got, 0.1) == ["offramp/v1/act/m/1/worker-1 for w1"]
    for c in (op, w1, adm):
        c.disconnect()
        c.loop_stop()


def test_no_client_takes_over_another_clients_session(secure_broker: SecureBroker) -> None:
    """Client ids are user names: a camera asking for a service's client id gets its own,
    and the service stays connected."""
    w1, w1_got = secure_broker.client("worker-1", client_id="offramp-worker-worker-1")
    ing, ing_got = secure_broker.client("ingest-admission", client_id="offramp-ingest-admission")
    for stolen in ("offramp-worker-worker-1", "worker-1", "offramp-ingest-admission",
                   "ingest-admission"):
        cam, _ = secure_broker.client("cam-1", client_id=stolen)
        cam.publish("offramp/v1/ingest/cam-1", "still a camera", qos=1).wait_for_publish(5)
        cam.disconnect()
        cam.loop_stop()
    assert not [m for m in _drain(w1_got, 0.5) + _drain(ing_got, 0) if "DISCONNECTED" in m]
    for c in (w1, ing):
        c.disconnect()
        c.loop_stop()


def test_make_passwords_refuses_bad_and_repeated_names(tmp_path: Path) -> None:
    script = ROOT / "compose/make-passwords.sh"
    for args, message in ((["cam 1"], "bad name"), (["--worker", "w;rm"], "bad name"),
                          (["--worker", "cam-1", "cam-1"], "name used twice"),
                          (["--wrkr", "x"], "unknown option --wrkr")):
        done = subprocess.run(["bash", str(script), "--out", str(tmp_path), *args],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "passwd").exists()
    done = subprocess.run(["bash", str(script), "--out", str(tmp_path), "--worker", "w-0",
                           "--worker", "w-1", "--prefix", "site/v2", "cam-9"],
                          capture_output=True, text=True, check=True)
    acl = (tmp_path / "acl").read_text()
    assert "user w-1\ntopic read site/v2/act/+/+/w-1\n" in acl and "pattern" not in acl
    assert "user cam-9\ntopic write site/v2/ingest/cam-9\n" in acl
    assert (tmp_path / "credentials/w-0").read_text() in (tmp_path / ".env").read_text()
