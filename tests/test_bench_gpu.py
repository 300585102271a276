"""``make bench-gpu`` runs on a GPU machine lent for minutes: it must not fail there for a
reason a CPU can find. Its parts, dry-run here on the CPU with the session's tiny model."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import gpu
from bench.gpu_engine import engine_run
from bench.gpu_ready import ready_time
from exit_arbiter.service import ArbiterSettings, make_policy
from offramp.ml.data import load_digits
from offramp.model import sessions
from offramp.model.bundle import Bundle
from offramp.model.inputs import normalise

pytestmark = pytest.mark.tier("inproc")


def test_every_variant_is_measured_or_says_why_not(tmp_path: Path) -> None:
    bundle = gpu.make_bundle("mnv2-32", tmp_path)
    for batch in (1, 8):
        row = gpu.measure("mnv2-32", bundle, "cpu", batch, 0.05, str(tmp_path / "trt"))
        assert set(row) == set(gpu.VARIANTS)
        for name in ("monolithic", "chain_plain", "chain_resident", "worker", "worker_stepwise"):
            assert isinstance(row[name], float) and row[name] > 0, (name, row)
        assert row["chain_cuda_graph"] == "CUDA graphs need a GPU"
        assert isinstance(row["chain_tensorrt_fp16"], str)
    assert "worker" in gpu.table({"mnv2-32": {"8": row}})
    assert gpu.ratio(row["worker"], row["chain_plain"]) is not None
    assert gpu.ratio(row["worker"], row["chain_cuda_graph"]) is None  # a reason, not a rate


def test_the_engine_with_exits_open_answers_every_sample_as_the_chain_would(
        tiny_bundle: Bundle) -> None:
    """Exits open: every sample answered once, at the exits the calibration expects, with
    the labels the plain chain gives at those exits (so the rate comes with its accuracy)."""
    digits = load_digits().test
    x, y = normalise(digits.images[:64], tiny_bundle.manifest.input), digits.labels[:64]
    policy = make_policy(ArbiterSettings(), tiny_bundle.calibration(), tiny_bundle.name, 1)
    closed = engine_run(tiny_bundle, "cpu", 8, x, 0.2)
    opened = engine_run(tiny_bundle, "cpu", 8, x, 0.2, policy)
    assert closed.exits == {tiny_bundle.num_segments: closed.samples}
    assert sum(opened.exits.values()) == opened.samples and len(opened.labels) == opened.samples
    assert opened.exits.get(1, 0) > 0, opened.exits  # digits leave early on this model
    truth = y[np.arange(opened.samples) % len(y)]
    accuracy = float((opened.labels == truth).mean())
    assert accuracy >= policy.expected_accuracy - 0.1, (accuracy, policy)


def test_a_worker_is_ready_only_after_its_segments_are_warm(tiny_bundle: Bundle) -> None:
    got = ready_time(tiny_bundle, "cpu", 8, timeout_s=120)
    assert got["ready_after_warm"], got
    assert got["said"][-1][1] == "ready" and got["ready_s"] == got["said"][-1][0] > 0
    assert all(what != "ready" for _, what in got["said"][:-1])
    assert got["device_unavailable"] is None and got["providers"] == ["CPUExecutionProvider"]


def test_preloading_gpu_libraries_reports_what_onnxruntime_could_not_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu's preload_dlls prints its failures; they come back as one line for the
    worker's device_unavailable warning. Nothing is tried on a build without CUDA."""
    assert sessions.preload_gpu_libraries() == ""  # CPU onnxruntime here
    monkeypatch.setattr(sessions, "cuda_available", lambda: True)

    def failing(**kw: object) -> None:
        print("Failed to load libcudart.so.13: cannot open shared object file")
        print("Please follow https://onnxruntime.ai/docs/install/#cuda-and-cudnn")

    monkeypatch.setattr(sessions.ort, "preload_dlls", failing, raising=False)
    said = sessions.preload_gpu_libraries()
    assert said.startswith("Failed to load libcudart.so.13") and "\n" not in said

    def broken(**kw: object) -> None:
        raise RuntimeError("Invalid parameter of directory=None")

    monkeypatch.setattr(sessions.ort, "preload_dlls", broken, raising=False)
    assert sessions.preload_gpu_libraries() == "Invalid parameter of directory=None"
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sessions.ort, "preload_dlls", lambda **kw: None, raising=False)
    assert sessions.preload_gpu_libraries() == "" and sys.stdout.getvalue() == ""
