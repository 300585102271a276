"""Settings: defaults, overrides, and one clear error naming the variable for each bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from admission_controller.settings import AdmissionSettings
from offramp.errors import SettingsError
from offramp.settings import BrokerAddress, BusSettings, CommonSettings, describe, load
from segment_worker.service import PREFIX, WorkerSettings


def test_defaults_load_from_an_empty_environment() -> None:
    s = load(CommonSettings, env={})
    assert s.bus.topic_prefix == "offramp/v1"
    assert s.heartbeat_s == 0.25


def test_overrides_are_typed_and_nested_groups_use_their_prefix() -> None:
    s = load(WorkerSettings, PREFIX, env={"OFFRAMP_KEEPALIVE_S": "20", "OFFRAMP_NODE": "jetson-1",
                                          "OFFRAMP_LOG_FORMAT": "json"})
    assert s.common.bus.keepalive_s == 20
    assert s.common.node == "jetson-1"
    assert s.common.log_format == "json"


@pytest.mark.parametrize(("var", "value", "words"), [
    ("OFFRAMP_KEEPALIVE_S", "ten", "expected an integer"),
    ("OFFRAMP_KEEPALIVE_S", "1", "must be >= 2"),
    ("OFFRAMP_HEARTBEAT_S", "120", "must be <= 60"),
    ("OFFRAMP_LOG_FORMAT", "xml", "expected one of auto, json, console"),
    ("OFFRAMP_RECONNECT_MIN_S", "soon", "expected a number"),
])
def test_bad_values_name_the_variable(var: str, value: str, words: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(CommonSettings, env={var: value})
    assert var in str(err.value)
    assert words in str(err.value)


@pytest.mark.parametrize(("url", "host", "port", "tls", "user"), [
    ("mqtt://gateway:1884", "gateway", 1884, False, None),
    ("mqtts://cam:secret@gw.local", "gw.local", 8883, True, "cam"),
    ("mqtt://127.0.0.1", "127.0.0.1", 1883, False, None),
])
def test_broker_url_parses(url: str, host: str, port: int, tls: bool, user: str | None) -> None:
    addr = BrokerAddress.parse(url)
    assert (addr.host, addr.port, addr.tls, addr.username) == (host, port, tls, user)


@pytest.mark.parametrize("url", ["http://x:1883", "mqtt://", "mqtt://host:notaport", "gateway"])
def test_bad_broker_url_is_one_clear_error(url: str) -> None:
    with pytest.raises(SettingsError, match="OFFRAMP_BROKER_URL"):
        BusSettings(broker_url=url).address()


def test_username_and_password_settings_override_the_url() -> None:
    addr = BusSettings(broker_url="mqtt://a:b@h:1", username="u", password="p").address()
    assert (addr.username, addr.password) == ("u", "p")


def test_a_password_file_is_read_at_connect_and_a_missing_one_fails_at_start(
        tmp_path: Path) -> None:
    secret = tmp_path / "worker-1"
    secret.write_text("s3cret\n")
    bus = load(BusSettings, env={"OFFRAMP_BROKER_URL": "mqtt://u:url-pw@h:1883",
                             "OFFRAMP_PASSWORD_FILE": str(secret)})
    assert bus.address().password == "s3cret"
    secret.write_text("rotated")
    assert bus.address().password == "rotated"
    with pytest.raises(SettingsError, match=r"OFFRAMP_PASSWORD_FILE=.*nope.*cannot read"):
        load(BusSettings, env={"OFFRAMP_PASSWORD_FILE": str(tmp_path / "nope")})


ADM = "OFFRAMP_ADMISSION_"


def test_the_ingest_session_logs_in_as_the_groups_user(tmp_path: Path) -> None:
    (tmp_path / "ingest").write_text("group-pw")
    env = {"OFFRAMP_BROKER_URL": "mqtt://h:1883", "OFFRAMP_USERNAME": "admission-1",
           "OFFRAMP_PASSWORD": "own-pw", "OFFRAMP_ADMISSION_INGEST_USERNAME": "ingest-admission",
           "OFFRAMP_ADMISSION_INGEST_PASSWORD_FILE": str(tmp_path / "ingest")}
    adm = load(AdmissionSettings, ADM, env)
    assert adm.common.bus.address().username == "admission-1"
    ingest = adm.ingest_bus().address()
    assert (ingest.username, ingest.password) == ("ingest-admission", "group-pw")
    assert load(AdmissionSettings, ADM, {}).ingest_bus() == load(AdmissionSettings, ADM, {}).common.bus
    with pytest.raises(SettingsError, match="INGEST_USERNAME is not"):
        load(AdmissionSettings, ADM, {"OFFRAMP_ADMISSION_INGEST_PASSWORD": "x"})
    with pytest.raises(SettingsError, match="cannot read"):
        load(AdmissionSettings, ADM, {**env, "OFFRAMP_ADMISSION_INGEST_PASSWORD_FILE": "/nonexistent"})


def test_describe_lists_every_variable_with_its_doc() -> None:
    rows = list(describe(WorkerSettings, PREFIX))
    names = [r[0] for r in rows]
    assert "OFFRAMP_BROKER_URL" in names
    assert all(doc for _, _, doc in rows)


def test_settings_catalog_covers_every_launchable_service() -> None:
    from offramp.local.services import service_modules, service_specs

    specs = service_specs()
    modules = service_modules()
    assert set(specs) == set(modules) == {"admission-controller", "segment-worker",
                                          "exit-arbiter", "priority-scheduler"}
    for name, spec in specs.items():
        assert spec.module == modules[name]
        names = [var for var, _, _ in describe(spec.settings, spec.prefix)]
        assert "OFFRAMP_BROKER_URL" in names
        assert spec.prefix.startswith("OFFRAMP_") and spec.prefix.endswith("_")
