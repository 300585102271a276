"""`make test-deploy`: what Prometheus scraped from the running stack, asked through its HTTP
API. Every target is up, offramp_results_total counts the frames the test published, and every
PromQL expression of the shipped Grafana dashboard returns data.

Usage: prometheus_check.py URL DASHBOARD_JSON SOURCE EXPECTED_RESULTS
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

# what Grafana puts in place of the dashboard's variables
VARIABLES = {"$__rate_interval": "1m", "$source": ".*"}


def api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{path} {params}: {body}")
    return body["data"]


def wait_for(what: str, check: Any, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        ok, detail = check()
        if ok:
            return detail
        if time.monotonic() > deadline:
            sys.exit(f"prometheus: {what}: {detail}")
        time.sleep(2)


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def main(url: str, dashboard_path: str, source: str, expected: int) -> None:
    def targets() -> tuple[bool, str]:
        active = api(url, "targets")["activeTargets"]
        down = [f"{t['scrapeUrl']} {t['health']} {t.get('lastError', '')}" for t in active
                if t["health"] != "up"]
        return bool(active) and not down, f"{len(active)} targets, not up: {down}"

    print(wait_for("every target up", targets))

    def results() -> tuple[bool, str]:
        data = api(url, "query", query=f'sum(offramp_results_total{{source="{source}"}})')
        got = float(data["result"][0]["value"][1]) if data["result"] else 0.0
        return got == expected, f"offramp_results_total for {source}: {got}, expected {expected}"

    print(wait_for("results counted", results))
    dashboard = json.loads(Path(dashboard_path).read_text())
    empty: list[str] = []

    def every_panel() -> tuple[bool, str]:
        empty.clear()
        for title, expr in expressions(dashboard):
            if not api(url, "query", query=expr)["result"]:
                empty.append(f"{title}: {expr}")
        return not empty, "no data for:\n  " + "\n  ".join(empty)

    wait_for("the dashboard's queries", every_panel, timeout_s=30)
    print(f"the dashboard's {len(expressions(dashboard))} queries all return data")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
