"""The observability files, offline: the metrics the code exports are the ones the README lists,
the shipped Grafana dashboard asks only for those and uses the provisioned data source, and the
Prometheus configs scrape every service. `make test-deploy` runs the queries for real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.tier("inproc")

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "compose/observability/grafana/dashboards/offramp.json"
METRIC = re.compile(r"\bofframp_[a-z_]+")


def _exported() -> set[str]:
    names: set[str] = set()
    for path in [*ROOT.glob("shared/offramp/**/*.py"), *ROOT.glob("services/*/*/*.py")]:
        names |= set(re.findall(r'"(offramp_[a-z_]+)"', path.read_text()))
    return names


def _documented() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| metric | type | labels | service |"):]
    table = table[:table.index("\n\n")]
    return {name for row in table.splitlines()[2:] for name in re.findall(r"`(offramp_[a-z_]+)`",
                                                                            row.split("|")[1])}


def test_the_readme_lists_exactly_the_metrics_the_services_export() -> None:
    assert _exported() == _documented()


def _queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_the_dashboard_asks_only_for_exported_metrics_from_the_provisioned_source() -> None:
    dash = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((ROOT / "compose/observability/grafana/provisioning/datasources/"
                              "prometheus.yml").read_text())["datasources"]
    uid = sources[0]["uid"]
    exported = _exported()
    used = set()
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            for name in METRIC.findall(target["expr"]):
                used.add(re.sub(r"_(bucket|count|sum)$", "", name))
    assert used <= exported, used - exported
    # what the issue asks the board to show
    for metric in ("offramp_results_total", "offramp_exits_total", "offramp_latency_seconds",
                   "offramp_source_info", "offramp_queue_backlog_seconds",
                   "offramp_credit_outstanding", "offramp_drops_total",
                   "offramp_bus_reconnects_total", "offramp_plan_epoch"):
        assert metric in used, metric
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


class _ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (!reset, !override) read as plain values."""


_ComposeLoader.add_multi_constructor(
    "!", lambda loader, tag, node: loader.construct_sequence(node)
    if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node))


def _targets(config: Path) -> list[tuple[str, str]]:
    scrape = yaml.safe_load(config.read_text())["scrape_configs"]
    return [(t, group["labels"]["service"]) for job in scrape for group in job["static_configs"]
            for t in group["targets"]]


def test_prometheus_scrapes_every_service_of_the_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    serving = sorted(name for name, svc in compose.items()
                     if "OFFRAMP_HTTP_PORT" in svc.get("environment", {})
                     and "gpu" not in svc.get("profiles", []))
    compose_targets = _targets(ROOT / "compose/observability/prometheus.yml")
    assert sorted(t.split(":")[0] for t, _ in compose_targets) == serving
    override = yaml.load((ROOT / "compose/podman/override.yml").read_text(),
                         Loader=_ComposeLoader)["services"]
    ports = sorted(f"127.0.0.1:{override[name]['environment']['OFFRAMP_HTTP_PORT']}"
                   for name in serving)
    assert sorted(t for t, _ in _targets(ROOT / "compose/podman/prometheus.yml")) == ports
    assert sorted(label for _, label in compose_targets) == sorted(
        label for _, label in _targets(ROOT / "compose/podman/prometheus.yml"))


def test_k3s_pods_carry_the_scrape_annotations() -> None:
    for name in ("services.yaml", "segment-worker.yaml"):
        for doc in yaml.safe_load_all((ROOT / "k3s/base" / name).read_text()):
            notes = doc["spec"]["template"]["metadata"]["annotations"]
            assert notes == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080",
                             "prometheus.io/path": "/metrics"}, doc["metadata"]["name"]
