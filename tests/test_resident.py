"""The GPU path, checked without a GPU: the providers' options (CUDA graphs, TensorRT's engine
cache, precision, profile) as pure functions, and the resident hand-over (IO binding) on the
CPU provider with a real bundle: a chain of segments whose activations never leave ONNX
Runtime's buffers answers as the plain chain does, with exited rows dropped by index, in fixed
buffers (what CUDA graphs replay) or not."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from offramp.ml.data import load_digits
from offramp.model.bundle import Bundle, load_bundle
from offramp.model.inputs import normalise
from offramp.model.providers import GpuOptions, SegmentShape, engine_folder, provider_list
from offramp.model.resident import DeviceRows, Row
from offramp.model.sessions import SegmentRunner
from offramp.settings import load
from segment_worker.engine import Engine, Port
from segment_worker.settings import EngineConfig, WorkerSettings

pytestmark = pytest.mark.tier("inproc")

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _shape(tmp_path: Path, batch: int = 8, content: bytes = b"onnx") -> SegmentShape:
    file = tmp_path / "segment-2.onnx"
    file.write_bytes(content)
    return SegmentShape("m", file, "x", (32, 8, 8), batch)


# -- provider options --------------------------------------------------------------------------
def test_providers_fall_back_in_order_among_those_installed(tmp_path: Path) -> None:
    shape = _shape(tmp_path)
    names = [p for p, _ in provider_list("tensorrt", ALL, GpuOptions(), shape)]
    assert names == ALL
    assert [p for p, _ in provider_list("tensorrt", ["CPUExecutionProvider"], GpuOptions(),
                                        shape)] == ["CPUExecutionProvider"]
    assert [p for p, _ in provider_list("cpu", ALL, GpuOptions(), shape)] == \
        ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="'tpu' is not one of cpu, cuda, tensorrt"):
        provider_list("tpu", ALL, GpuOptions(), shape)


def test_cuda_graphs_are_asked_for_only_at_a_static_batch(tmp_path: Path) -> None:
    def cuda(gpu: GpuOptions, batch: int) -> dict[str, object]:
        return dict(provider_list("cuda", ALL, gpu, _shape(tmp_path, batch))[0][1])

    assert cuda(GpuOptions(), 8) == {"device_id": 0, "enable_cuda_graph": "1"}
    assert cuda(GpuOptions(), 0) == {"device_id": 0}  # batches of any size: no graph
    assert cuda(GpuOptions(cuda_graph=False, device_id=1), 8) == {"device_id": 1}
    # under TensorRT, the CUDA provider runs what TensorRT does not take, without a graph
    trt = dict(provider_list("tensorrt", ALL, GpuOptions(), _shape(tmp_path, 8)))
    assert "enable_cuda_graph" not in trt["CUDAExecutionProvider"]
    assert trt["TensorrtExecutionProvider"]["trt_cuda_graph_enable"] is True


def test_tensorrt_builds_for_the_static_batch_at_the_chosen_precision(tmp_path: Path) -> None:
    opts = dict(provider_list("tensorrt", ALL, GpuOptions(trt_precision="fp32"),
                              _shape(tmp_path, 8)))["TensorrtExecutionProvider"]
    assert opts["trt_profile_min_shapes"] == opts["trt_profile_max_shapes"] == "x:8x32x8x8"
    assert opts["trt_fp16_enable"] is False and opts["trt_int8_enable"] is False
    assert "trt_engine_cache_enable" not in opts  # no cache folder: built at every start
    dynamic = dict(provider_list("tensorrt", ALL, GpuOptions(), _shape(tmp_path, 0)))
    trt = dynamic["TensorrtExecutionProvider"]
    assert (trt["trt_profile_min_shapes"], trt["trt_profile_max_shapes"]) == \
        ("x:1x32x8x8", "x:64x32x8x8")
    assert trt["trt_fp16_enable"] is True and "trt_cuda_graph_enable" not in trt
    int8 = dict(provider_list("tensorrt", ALL, GpuOptions(trt_precision="int8",
                                                          trt_cache=str(tmp_path / "c")),
                              _shape(tmp_path, 8)))["TensorrtExecutionProvider"]
    assert int8["trt_int8_enable"] is True and int8["trt_fp16_enable"] is True
    assert int8["trt_int8_calibration_table_name"] == "calibration.flatbuffers"
    assert int8["trt_int8_use_native_calibration_table"] is False


def test_the_engine_cache_is_keyed_by_segment_contents_batch_and_precision(
        tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    opts = dict(provider_list("tensorrt", ALL, GpuOptions(trt_cache=cache),
                              _shape(tmp_path, 8)))["TensorrtExecutionProvider"]
    folder = Path(opts["trt_engine_cache_path"])
    assert opts["trt_engine_cache_enable"] is True and opts["trt_timing_cache_path"] == cache
    assert folder.parent.parent.parent == Path(cache) and folder.name == "b8-fp16"
    assert folder.parent.parent.name == "m" and folder.parent.name.startswith("segment-2-")
    keys = {engine_folder(cache, _shape(tmp_path, b, content), p)
            for b in (1, 8) for content in (b"a", b"b") for p in ("fp16", "int8")}
    assert len(keys) == 8  # a rebuilt segment, another batch or precision: another engine


def test_worker_settings_make_the_gpu_options() -> None:
    cpu = EngineConfig.from_settings(load(WorkerSettings, "OFFRAMP_WORKER_", {}))
    assert cpu.resident is False and cpu.gpu == GpuOptions()
    gpu = EngineConfig.from_settings(load(WorkerSettings, "OFFRAMP_WORKER_", {
        "OFFRAMP_WORKER_DEVICE": "tensorrt", "OFFRAMP_WORKER_TRT_CACHE": "/cache",
        "OFFRAMP_WORKER_TRT_PRECISION": "fp32", "OFFRAMP_WORKER_CUDA_GRAPH": "false",
        "OFFRAMP_WORKER_GPU_ID": "1"}))
    assert gpu.resident is True
    assert gpu.gpu == GpuOptions(cuda_graph=False, trt_cache="/cache", trt_precision="fp32",
                                 device_id=1)
    off = EngineConfig.from_settings(load(WorkerSettings, "OFFRAMP_WORKER_", {
        "OFFRAMP_WORKER_DEVICE": "cuda", "OFFRAMP_WORKER_RESIDENT": "off"}))
    assert off.resident is False


# -- the resident hand-over on the CPU provider ------------------------------------------------
def _inputs(bundle: Bundle, n: int) -> np.ndarray:
    return normalise(load_digits().test.images[:n], bundle.manifest.input)


def _chain(bundle: Bundle, x: np.ndarray, stay: list[list[int]], *, fixed: int,
           rows_model: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each segment's logits and embeddings, the resident way, keeping ``stay[k]`` (indices
    into what reached segment k) after segment k."""
    if not rows_model:
        root = bundle.root.parent / f"{bundle.root.name}-norows"
        if not root.exists():
            shutil.copytree(bundle.root, root)
            manifest = json.loads((root / "manifest.json").read_text())
            manifest.pop("rows_model", None)
            (root / "manifest.json").write_text(json.dumps(manifest))
        bundle = load_bundle(root)
        assert bundle.rows_model() is None
    runners = [SegmentRunner(bundle, s.index, resident=True, static_batch=fixed)
               for s in bundle.manifest.segments]
    xs: list[np.ndarray | Row] = list(x)
    out = []
    for k, runner in enumerate(runners):
        got = runner.run_rows(xs)
        out.append((got.logits, got.embedding))
        if got.activation is not None:
            assert isinstance(got.activation, DeviceRows)
            xs = runner.keep(got.activation, stay[k])
            assert all(isinstance(r, Row) for r in xs)
    return out


def _plain(bundle: Bundle, x: np.ndarray,
           stay: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    out, h = [], x
    for k, spec in enumerate(bundle.manifest.segments):
        got = SegmentRunner(bundle, spec.index).run(h)
        out.append((got.logits, got.embedding))
        if got.activation is not None:
            h = got.activation[stay[k]]
    return out


@pytest.mark.parametrize("fixed", [0, 8], ids=["sized-by-batch", "fixed-buffers"])
@pytest.mark.parametrize("rows_model", [True, False], ids=["rows-on-device", "no-rows-model"])
def test_a_resident_chain_answers_as_the_plain_chain(tiny_bundle: Bundle, fixed: int,
                                                     rows_model: bool) -> None:
    """Rows dropped by index after each segment (some exit), and once all of them go on."""
    x = _inputs(tiny_bundle, 8)
    stay = [[0, 2, 3, 7], [3, 1, 2], [0, 1, 2]]
    want = _plain(tiny_bundle, x, stay)
    got = _chain(tiny_bundle, x, stay, fixed=fixed, rows_model=rows_model)
    for (gl, ge), (wl, we) in zip(got, want, strict=True):
        np.testing.assert_allclose(gl, wl, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ge, we, rtol=1e-5, atol=1e-5)


def test_a_batch_mixing_device_rows_and_arrived_rows_is_assembled_once(
        tiny_bundle: Bundle) -> None:
    """Survivors of two runs and a packet's rows in one micro-batch of segment 2."""
    x = _inputs(tiny_bundle, 12)
    first = SegmentRunner(tiny_bundle, 1, resident=True)
    second = SegmentRunner(tiny_bundle, 2, resident=True, transfers=first.transfers)
    plain = SegmentRunner(tiny_bundle, 1).run(x)
    assert plain.activation is not None
    a = first.run_rows(list(x[:6]))
    assert isinstance(a.activation, DeviceRows)
    rows_a = first.keep(a.activation, [1, 4])
    b = first.run_rows(list(x[6:10]))
    assert isinstance(b.activation, DeviceRows)
    rows_b = first.keep(b.activation, [0, 1, 2, 3])  # all of them: no copy at all
    arrived = list(plain.activation[10:12])
    got = second.run_rows([*rows_a, *rows_b, *arrived])
    want = SegmentRunner(tiny_bundle, 2).run(plain.activation[[1, 4, 6, 7, 8, 9, 10, 11]])
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert first.transfers["on_device"] == 1  # only the drop of exited rows after run a


@pytest.mark.parametrize("fixed", [0, 8], ids=["sized-by-batch", "fixed-buffers"])
def test_rows_passed_on_feed_the_next_segment_with_one_gather_and_no_copy_kept(
        tiny_bundle: Bundle, fixed: int) -> None:
    """A run-through (the next segment runs before this one again): the survivors are read
    straight out of this run's output, gathered once into the next segment's input."""
    x = _inputs(tiny_bundle, 8)
    first = SegmentRunner(tiny_bundle, 1, resident=True, static_batch=fixed)
    second = SegmentRunner(tiny_bundle, 2, resident=True, static_batch=fixed,
                           transfers=first.transfers)
    out = first.run_rows(x)
    assert out.activation is not None
    stay = [0, 3, 5]
    got = second.run_rows(first.pass_on(out.activation, stay))
    plain = SegmentRunner(tiny_bundle, 1).run(x).activation
    assert plain is not None
    want = SegmentRunner(tiny_bundle, 2).run(plain[stay])
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert first.transfers == {"on_device": 1}  # the gather into segment 2's input, only
    host = SegmentRunner(tiny_bundle, 1).run(x)
    assert host.activation is not None
    passed = SegmentRunner(tiny_bundle, 1).pass_on(host.activation, stay)
    assert isinstance(passed, np.ndarray) and np.array_equal(passed, host.activation[stay])


def test_the_rows_model_loads_in_onnxruntime_as_old_as_the_segments_need(
        tiny_bundle: Bundle) -> None:
    """rows.onnx carries the oldest IR version its opset allows, as torch's export does for
    the segments: onnx's newest (IR 14 with onnx 1.23) was refused by onnxruntime 1.31."""
    import onnx

    rows = tiny_bundle.rows_model()
    assert rows is not None
    segment = onnx.load(str(tiny_bundle.path(tiny_bundle.segment(1).file)))
    assert onnx.load(str(rows)).ir_version <= segment.ir_version


def test_device_rows_go_to_the_host_once(tiny_bundle: Bundle) -> None:
    x = _inputs(tiny_bundle, 4)
    runner = SegmentRunner(tiny_bundle, 1, resident=True)
    out = runner.run_rows(list(x))
    assert isinstance(out.activation, DeviceRows)
    rows = runner.keep(out.activation, [0, 1, 2, 3])
    assert isinstance(rows[0], Row)
    first = rows[0].batch.host()
    assert rows[3].batch.host() is first  # one copy for the whole batch
    want = SegmentRunner(tiny_bundle, 1).run(x).activation
    np.testing.assert_allclose(first, want, rtol=1e-5, atol=1e-5)
    assert rows[0].nbytes == tiny_bundle.segment(1).activation_bytes


def test_a_batch_over_the_fixed_buffers_is_refused(tiny_bundle: Bundle) -> None:
    runner = SegmentRunner(tiny_bundle, 1, resident=True, static_batch=4)
    with pytest.raises(Exception, match="over its static batch 4"):
        runner.run_rows(list(_inputs(tiny_bundle, 5)))


# -- readiness while loading ---------------------------------------------------------------------
async def test_the_engine_says_what_it_builds_while_a_segment_loads(
        tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz reads ``engine.warming``: while segment 2 of 3 loads (its first run at the
    batch size is where TensorRT builds), it says so; once loaded, nothing is missing."""
    cfg = replace(EngineConfig(node="w1", batch_max=4), device="tensorrt")  # falls back to CPU
    started, release = threading.Event(), threading.Event()
    real = SegmentRunner.run_rows

    def slow(self: SegmentRunner, xs: list[np.ndarray | Row]) -> object:
        started.set()
        release.wait(10)
        return real(self, xs)

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        return None

    from offramp.bus import Topics
    from offramp.node.peers import PeerTable

    monkeypatch.setattr(SegmentRunner, "run_rows", slow)
    async with Engine(tiny_bundle, cfg, PeerTable("w1"), Port(Topics("t"), publish)) as eng:
        assert eng.warming is None
        loading = asyncio.get_running_loop().run_in_executor(None, eng.load, 1, (2, 3))
        assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert eng.warming == "building TensorRT engines, segment 2 of 3"
        release.set()
        hosted = await loading
        assert eng.warming is None and hosted.stats.service_s > 0


# -- INT8 calibration tables ---------------------------------------------------------------------
def test_int8_tables_come_from_the_validation_split_and_go_where_tensorrt_reads_them(
        tiny_bundle: Bundle, tmp_path: Path) -> None:
    from offramp.cli.main import main as ml_main
    from offramp.model.sessions import stage_int8_table

    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.root, root)
    assert ml_main(["calibrate", str(root), "--int8", "--int8-samples", "64"]) == 0
    bundle = load_bundle(root)
    assert bundle.manifest.metrics["int8_calibration"]["split"] == "validation"
    shape = SegmentShape(bundle.name, bundle.path(bundle.segment(2).file), "x",
                         bundle.segment(2).input.per_sample, 8)
    gpu = GpuOptions(trt_precision="int8", trt_cache=str(tmp_path / "cache"))
    staged = stage_int8_table(bundle, 2, gpu, shape)
    assert staged.parent == engine_folder(gpu.trt_cache, shape, "int8")
    table = staged.read_bytes()
    assert table == bundle.int8_table(2).read_bytes()
    assert b"/Conv_output_0" in table  # a range for the tensors inside the segment
    with pytest.raises(Exception, match="needs an engine cache folder"):
        stage_int8_table(bundle, 2, replace(gpu, trt_cache=""), shape)
    bundle.int8_table(3).unlink()
    with pytest.raises(Exception, match=r"segment 3 has no INT8 calibration table; run "
                                        r"`offramp calibrate .* --int8`"):
        stage_int8_table(bundle, 3, gpu, shape)


def test_a_worker_asked_for_int8_without_an_engine_cache_says_so(tiny_bundle: Bundle) -> None:
    from offramp.errors import SettingsError
    from segment_worker.service import run

    settings = load(WorkerSettings, "OFFRAMP_WORKER_", {
        "OFFRAMP_WORKER_BUNDLE": str(tiny_bundle.root), "OFFRAMP_WORKER_DEVICE": "tensorrt",
        "OFFRAMP_WORKER_TRT_PRECISION": "int8"})
    with pytest.raises(SettingsError, match="int8 needs OFFRAMP_WORKER_TRT_CACHE"):
        asyncio.run(run(settings, asyncio.Event()))


def test_a_session_that_refuses_a_cuda_graph_runs_without_one(
        tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime refuses a CUDA graph when a node falls to the CPU provider: the segment
    still loads, without the graph, and says why."""
    from offramp.model import sessions

    real = sessions.make_session

    def picky(path: Path, **kw: object) -> object:
        gpu = kw.get("gpu")
        if isinstance(gpu, GpuOptions) and gpu.cuda_graph:
            raise sessions.BundleError("cannot load: this session cannot use the CUDA Graph")
        return real(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(sessions, "make_session", picky)
    runner = SegmentRunner(tiny_bundle, 1, resident=True, static_batch=4)
    assert "CUDA Graph" in runner.graph_refused and not runner.gpu.cuda_graph
    assert runner.run_rows(list(_inputs(tiny_bundle, 3))).logits.shape == (3, 10)
