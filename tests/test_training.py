"""Training is deterministic and resumable; compression and the CLI work on a real bundle."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from offramp.cli.main import main
from offramp.errors import OfframpError
from offramp.ml.build import (
    Recipe,
    ablation_configs,
    check,
    load_data,
    load_teacher,
    load_trained,
    make_model,
)
from offramp.ml.compress import (
    compare_codecs,
    default_cut,
    export_autoencoder,
    record_codecs,
    train_autoencoder,
)
from offramp.ml.train import Saved, TrainConfig, TrainResult, cpu_threads, memory_layout, train
from offramp.model.bundle import Bundle, BundleError, load_bundle
from offramp.model.inputs import InputSpec
from offramp.model.sessions import make_session

pytestmark = pytest.mark.tier("inproc")

# What these tests check (determinism, resuming, a teacher's effect, the CLI's shape) holds on
# a seeded part of the training split; the whole of it is trained by the tiny_bundle fixture.
QUICK = Recipe("quick", "mobilenetv2", {"width": 0.25, "stem_stride": 2}, train_limit=384,
               train=TrainConfig(epochs=2, batch_size=128))


def _run(cfg: TrainConfig, ckpt: Path | None = None) -> tuple[dict[str, torch.Tensor], TrainResult]:
    recipe = replace(QUICK, train=cfg)
    model = make_model(recipe, 10)
    result = train(model, load_data(recipe), InputSpec(), cfg, saved=Saved(ckpt), progress=False)
    return model.state_dict(), result


def _train(cfg: TrainConfig, ckpt: Path | None = None) -> dict[str, torch.Tensor]:
    return _run(cfg, ckpt)[0]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    a, b = _train(QUICK.train), _train(QUICK.train)
    assert _same(a, b)
    assert not _same(a, _train(replace(QUICK.train, seed=1)))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _train(QUICK.train)
    real_save = torch.save
    calls = {"n": 0}

    def crash_after_first_checkpoint(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    monkeypatch.setattr(torch, "save", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        _train(QUICK.train, ckpt)
    monkeypatch.setattr(torch, "save", real_save)
    resumed, result = _run(QUICK.train, ckpt)
    assert _same(resumed, straight)
    assert result.resumed_at_epoch == 1 and len(result.history) == QUICK.train.epochs
    assert all(epoch["seconds"] > 0 for epoch in result.history)
    with pytest.raises(OfframpError, match="other settings"):
        _train(replace(QUICK.train, lr=1e-4), ckpt)


def test_a_cpu_trains_channels_last_and_hands_back_the_default_layout() -> None:
    cpu = torch.device("cpu")
    assert memory_layout(cpu, QUICK.train) == torch.channels_last
    assert memory_layout(cpu, replace(QUICK.train, freeze_backbone=True)) == torch.contiguous_format
    assert memory_layout(torch.device("cuda"), QUICK.train) == torch.contiguous_format
    weights = _train(replace(QUICK.train, epochs=1))
    convs = [w for w in weights.values() if w.dim() == 4]
    assert convs and all(w.is_contiguous() for w in convs)  # what export expects


def test_training_takes_every_core_unless_omp_num_threads_says_fewer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads() == 8
    for given, threads in (("3", 3), ("64", 8), ("0", 1), ("many", 8)):
        monkeypatch.setenv("OMP_NUM_THREADS", given)
        assert cpu_threads() == threads, given


def test_a_separately_trained_teacher_is_distilled_from_and_checked(tmp_path: Path) -> None:
    one = replace(QUICK.train, epochs=1)
    data = load_data(QUICK)
    teacher = make_model(QUICK, 10)
    train(teacher, data, InputSpec(), one, progress=False)
    path = tmp_path / "model.pt"
    torch.save({"model_config": teacher.config, "num_classes": 10, "state": teacher.state_dict()},
               path)
    student = replace(QUICK, teacher=str(path), train=one)
    assert student.digest() != replace(QUICK, train=one).digest()
    check(student)
    taught = make_model(student, 10)
    result = train(taught, data, InputSpec(), one, progress=False,
                   teacher=load_teacher(student, len(data.classes)))
    assert result.history[0]["kd"] > 0
    assert not _same(taught.state_dict(), _train(one))  # the teacher changed what was learnt
    for recipe, message in ((replace(student, teacher=str(tmp_path / "none.pt")), "missing"),
                            (replace(student, input_size=48), "trained at 32 px"),
                            (replace(student, train=replace(one, freeze_backbone=True)),
                             "--freeze-backbone")):
        with pytest.raises(BundleError, match=message):
            check(recipe)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    wider = make_model(replace(QUICK, model_cfg={**QUICK.model_cfg, "width": 0.5}), 10)
    torch.save({"model_config": wider.config, "num_classes": 10, "state": teacher.state_dict()},
               tmp_path / "misfit.pt")
    for bad in ("junk.pt", "misfit.pt"):
        with pytest.raises(BundleError, match="not a model saved by offramp"):
            check(replace(student, teacher=str(tmp_path / bad)))
    with pytest.raises(BundleError, match="has 10 classes and digits has 5"):
        load_teacher(student, 5)


def test_ablation_switches_off_one_term_at_a_time() -> None:
    runs = ablation_configs(TrainConfig())
    assert [(c.loss.distill, c.loss.feature) for c in runs.values()] == [
        (True, True), (False, True), (True, False), (False, False)]


def test_autoencoder_at_a_cut_exports_and_is_compared(tiny_bundle: Bundle, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, root)
    bundle = load_bundle(root)
    model = load_trained(root / "model.pt")
    data = load_data(Recipe("t", "mobilenetv2", {}))
    cut = default_cut(bundle)
    cuts = range(1, bundle.num_segments)
    assert all(set(bundle.codec_accuracy(c)) == {"raw", "fp16", "int8"} for c in cuts), \
        "offramp build measures the wire codecs at every cut"
    enc, dec = train_autoencoder(model, bundle, data, cut, 4, epochs=1)
    spec = export_autoencoder(bundle, cut, 4, enc, dec)
    reloaded = load_bundle(root)
    assert reloaded.autoencoder(cut) == spec
    assert make_session(reloaded.path(spec.encoder)).get_outputs()[0].name == "latent"
    got = compare_codecs(model, bundle, data, cut, {4: (enc, dec)})
    reports = {r.codec: r for r in got}
    raw = reports["raw"].bytes_per_sample
    assert reports["fp16"].bytes_per_sample * 2 == raw == reports["int8"].bytes_per_sample * 4
    assert reports["ae-r4"].bytes_per_sample == raw // 8
    record_codecs(bundle, cut, got)
    assert load_bundle(root).codec_accuracy(cut) == {r.codec: r.final_accuracy for r in got}
    assert all("ae-r4" not in load_bundle(root).codec_accuracy(c) for c in cuts if c != cut)
    assert abs(reports["fp16"].final_accuracy - reports["raw"].final_accuracy) <= 0.01


def test_autoencoder_training_starts_from_the_principal_components(tiny_bundle: Bundle) -> None:
    """Before any step, the pair is the best linear reconstruction: with as many latent
    channels as the activation has, it gives the activation back (up to the fp16 it travels
    as); with fewer, its error is the variance of the components it leaves out."""
    from offramp.ml.compress import CutDecoder, CutEncoder, _activations, _principal_init

    bundle = load_bundle(tiny_bundle.root)
    model = load_trained(bundle.path("model.pt"))
    data = load_data(Recipe("t", "mobilenetv2", {}))
    cut = default_cut(bundle)
    acts, _ = _activations(model, bundle, data.val, bundle.segment(cut).last_block)
    channels = acts.shape[1]
    with torch.no_grad():
        enc, dec = CutEncoder(channels, 1).eval(), CutDecoder(channels, 1).eval()
        _principal_init(enc, dec, acts)
        assert torch.allclose(dec(enc(acts).half().float()), acts, atol=0.05 * float(acts.std()))
        enc, dec = CutEncoder(channels, 4).eval(), CutDecoder(channels, 4).eval()
        _principal_init(enc, dec, acts)
        error = float(((dec(enc(acts)) - acts) ** 2).mean())
        flat = acts.permute(0, 2, 3, 1).reshape(-1, channels).double()
        left_out = torch.linalg.eigvalsh(torch.cov(flat.T))[:channels - channels // 4]
    assert error == pytest.approx(float(left_out.sum()) / channels, rel=0.02)


def test_an_autoencoder_whose_activations_would_not_fit_in_memory_asks_for_a_limit(
        tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    from offramp.ml import compress

    bundle = load_bundle(tiny_bundle.root)
    data = load_data(Recipe("t", "mobilenetv2", {}))
    cut = default_cut(bundle)
    per = bundle.segment(cut).activation_bytes
    monkeypatch.setattr(compress, "MAX_ACTIVATIONS", 100 * per)
    with pytest.raises(BundleError, match=r"--train-limit 100 or less"):
        train_autoencoder(load_trained(bundle.path("model.pt")), bundle, data, cut, 4)


Offramp = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def offramp(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Offramp:
    """``offramp(*args)``: the ``offramp`` command run in this process (the model code is
    imported already; a process of its own spends seconds importing torch), with its exit
    status, stdout and stderr. tests/test_cli.py runs the command as a process."""
    monkeypatch.setenv("COLUMNS", "200")  # rich's tables, unwrapped

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["offramp", *args], code, out.out, out.err)
    return run


def test_calibrate_cli_prints_thresholds_and_expected_cost(tiny_bundle: Bundle,
                                                           offramp: Offramp) -> None:
    out = offramp("calibrate", str(tiny_bundle.root), "--target-accuracy", "0.85")
    assert out.returncode == 0, out.stderr
    assert "thresholds for target accuracy 0.8500" in out.stdout
    assert "expected FLOPs per sample" in out.stdout
    out = offramp("calibrate", str(tiny_bundle.root), "--flops-budget", "0.5")
    assert out.returncode == 0 and "within 0.50" in out.stdout


def test_export_cli_makes_two_segments_from_a_four_exit_model(tiny_bundle: Bundle,
                                                              tmp_path: Path, offramp: Offramp) -> None:
    out = offramp("export", str(tiny_bundle.path("model.pt")), "--out", str(tmp_path / "two"),
                   "--cuts", "2")
    assert out.returncode == 0, out.stderr
    assert load_bundle(tmp_path / "two").num_segments == 2


def test_a_re_exported_model_keeps_the_dataset_and_classes_it_was_trained_on(
        tiny_bundle: Bundle, tmp_path: Path, offramp: Offramp) -> None:
    """A model.pt carries its dataset and class names into every bundle exported from it; one
    that does not say is refused rather than labelled as digits."""
    import torch

    saved = torch.load(tiny_bundle.path("model.pt"), map_location="cpu", weights_only=False)
    assert saved["dataset"] == "digits" and saved["classes"] == tiny_bundle.manifest.classes
    clothes = [f"garment-{i}" for i in range(10)]
    torch.save({**saved, "dataset": "fashion-mnist", "classes": clothes}, tmp_path / "f.pt")
    out = offramp("export", str(tmp_path / "f.pt"), "--out", str(tmp_path / "again"),
                   "--cuts", "2")
    assert out.returncode == 0, out.stderr
    again = load_bundle(tmp_path / "again")
    assert again.manifest.classes == clothes
    assert again.manifest.metrics["dataset"] == "fashion-mnist"
    old = {k: v for k, v in saved.items() if k not in ("dataset", "classes")}
    torch.save(old, tmp_path / "old.pt")
    out = offramp("export", str(tmp_path / "old.pt"), "--out", str(tmp_path / "x"))
    assert out.returncode == 2 and "--dataset" in out.stderr and "Traceback" not in out.stderr
    out = offramp("export", str(tmp_path / "f.pt"), "--out", str(tmp_path / "y"),
                   "--dataset", "digits")
    assert out.returncode == 2 and "trained on fashion-mnist, not digits" in out.stderr
    out = offramp("export", str(tmp_path / "old.pt"), "--out", str(tmp_path / "z"),
                   "--dataset", "digits", "--cuts", "2")
    assert out.returncode == 0, out.stderr
    assert load_bundle(tmp_path / "z").manifest.classes == [str(i) for i in range(10)]


def test_compress_cli_records_what_each_codec_costs(tiny_bundle: Bundle, tmp_path: Path,
                                                    offramp: Offramp) -> None:
    import shutil

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle.root, root)
    out = offramp("compress", str(root), "--ratios", "2", "--epochs", "1", "--train-limit",
                   "200", "--val-limit", "100")
    assert out.returncode == 0, out.stderr
    bundle = load_bundle(root)
    for cut in range(1, bundle.num_segments):  # every cut by default
        assert set(bundle.codec_accuracy(cut)) == {"raw", "fp16", "int8", "ae-r2"}
        assert [a.ratio for a in bundle.autoencoders_at(cut)] == [2]
        assert f"codecs at cut {cut}" in out.stdout
    assert "ae-r2" in out.stdout
    for bad, message in ((["--cuts", "9"], "--cuts [9]"), (["--ratios", "1"], "--ratios")):
        out = offramp("compress", str(root), *bad)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_cli_errors_are_one_line(tmp_path: Path, offramp: Offramp) -> None:
    out = offramp("calibrate", str(tmp_path / "nothing"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_train_cli_saves_a_model_that_teaches_the_ablation(tmp_path: Path, offramp: Offramp) -> None:
    quick = ("--preset", "demo", "--model-opt", "width=0.25", "--epochs", "1", "--train-limit",
             "384")
    out = offramp("train", *quick, "--out", str(tmp_path / "teacher"))
    assert out.returncode == 0, out.stderr
    teacher = tmp_path / "teacher" / "model.pt"
    assert load_trained(teacher).num_exits == 4
    out = offramp("train", *quick, "--out", str(tmp_path / "student"), "--teacher", str(teacher),
                   "--ablation")
    assert out.returncode == 0, out.stderr
    for run in ("joint (CE+KD+FT)", "no distillation", "no feature transfer", "CE only"):
        assert run in out.stdout
    out = offramp("train", *quick, "--input-size", "48", "--out", str(tmp_path / "bad"),
                   "--teacher", str(teacher))
    assert out.returncode == 2 and "trained at 32 px" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "bad").exists()
