"""docs/reproduction.md is what ``make report`` makes of the committed bench results: the page
regenerated here equals the committed one, its plots exist, and a missing result file leaves
its claims 'not measured' instead of failing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench.report import FIGURES, RESULTS, ROOT, generate

pytestmark = pytest.mark.tier("inproc")

DOCS = ROOT / "docs"


def test_the_committed_page_is_the_committed_results_rendered(tmp_path: Path) -> None:
    page = generate(RESULTS, tmp_path, plots=False)
    committed = DOCS / "reproduction.md"
    assert page.read_text() == committed.read_text(), (
        "docs/reproduction.md is out of date with bench/results: run `make report`")


def test_every_plot_the_page_shows_is_committed_and_drawn(tmp_path: Path) -> None:
    shown = re.findall(rf"\]\({FIGURES}/([a-z_]+\.png)\)", (DOCS / "reproduction.md").read_text())
    assert len(set(shown)) >= 5
    for png in set(shown):
        assert (DOCS / FIGURES / png).stat().st_size > 5_000, png
    generate(RESULTS, tmp_path)  # matplotlib draws every plot from the results as they are
    drawn = {p.name for p in (tmp_path / FIGURES).glob("*.png")}
    assert set(shown) <= drawn
    assert all((tmp_path / FIGURES / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in drawn)


def test_a_missing_result_file_leaves_its_claims_not_measured(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name in ("control", "pipeline"):
        shutil.copy(RESULTS / f"{name}.json", results)
    text = generate(results, tmp_path / "out").read_text()
    assert "- `exits.json`: missing" in text and "- `links.json`: missing" in text
    row = next(line for line in text.splitlines() if line.startswith("| Compute cut"))
    assert "not measured" in row
    assert "distree_exits.png" not in text  # no plot without its figures


def test_a_result_file_that_is_not_json_is_one_clear_error(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "control.json").write_text("{not json")
    with pytest.raises(SystemExit, match=r"control\.json cannot be read as a result file"):
        generate(results, tmp_path / "out", plots=False)


def test_a_claim_below_its_goal_is_said_to_be_unmet(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    control = json.loads((results / "control.json").read_text())
    control["priority_latency_reduction"] = 0.5
    (results / "control.json").write_text(json.dumps(control))
    text = generate(results, tmp_path / "out", plots=False).read_text()
    row = next(line for line in text.splitlines()
               if line.startswith("| High-priority latency cut: digits"))
    assert "| 0.5 |" in row and row.endswith("**not met** |")
