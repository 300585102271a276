"""Training a multi-exit model jointly (CPU by default, CUDA when present), deterministic with a
seed, checkpointed every epoch and resumable. With ``freeze_backbone`` only the exit heads train,
on features computed once (:mod:`offramp.ml.transfer`); ``finetune_epochs`` then trains the
whole model at a tenth of the learning rate."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from offramp.errors import OfframpError
from offramp.ml.data import Dataset, Split
from offramp.ml.loss import JointLoss, LossConfig
from offramp.ml.progress import Bar
from offramp.ml.progress import progress as progress_bar
from offramp.ml.transfer import FeatureCache, freeze_backbone, head_outputs
from offramp.ml.zoo import MultiExitNet
from offramp.model.inputs import InputSpec, normalise


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    augment: bool = True
    pad: int = 2
    flip: bool = False
    freeze_backbone: bool = False
    finetune_epochs: int = 0
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = self.loss.to_dict()
        # left out at their defaults, so that checkpoints and bundles made before these
        # settings existed still match
        for key in ("freeze_backbone", "finetune_epochs"):
            if not d[key]:
                del d[key]
        return d


@dataclass(frozen=True)
class Saved:
    """Where a run keeps its state: ``checkpoint`` saved every epoch (None: nothing kept) and
    resumed from unless ``resume`` is off; ``features``: a frozen backbone's cached features
    (None: beside the checkpoint). Runs that differ only in their training terms can share
    one features file."""

    checkpoint: Path | None = None
    resume: bool = True
    features: Path | None = None


@dataclass
class TrainResult:
    val_accuracy: list[float]
    test_accuracy: list[float]
    history: list[dict[str, float]]  # per epoch: the mean loss terms, and its seconds
    resumed_at_epoch: int = 0  # epochs a checkpoint already held when this run started


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OfframpError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


class Inputs:
    """A split's images as model inputs, normalised a batch at a time when indexed: the uint8
    images are a quarter of the float32 tensor (55,000 images at 96 px: 1.5 GB, not 6)."""

    def __init__(self, images: np.ndarray, spec: InputSpec) -> None:
        self.images = images
        self.spec = spec
        self.shape = (len(images), spec.channels, images.shape[1], images.shape[2])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        pick = index.numpy() if isinstance(index, torch.Tensor) else index
        return torch.from_numpy(normalise(self.images[pick], self.spec))


def to_tensors(split: Split, spec: InputSpec) -> tuple[Inputs, torch.Tensor]:
    return Inputs(split.images, spec), torch.from_numpy(split.labels)


def _batches(x: Inputs, y: torch.Tensor, cfg: TrainConfig, epoch: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(len(y), generator=gen)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start:start + cfg.batch_size]
        xb = x[idx]
        if cfg.augment and cfg.pad > 0:
            padded = nn.functional.pad(xb, [cfg.pad] * 4)
            dx, dy = torch.randint(0, 2 * cfg.pad + 1, (2,), generator=gen).tolist()
            xb = padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
            if cfg.flip and bool(torch.randint(0, 2, (1,), generator=gen)):
                xb = xb.flip(3)
        yield xb, y[idx]


@torch.no_grad()
def exit_accuracy(model: MultiExitNet, x: Inputs | torch.Tensor, y: torch.Tensor,
                  device: torch.device | None = None, batch: int = 256, *,
                  bar: Bar | None = None, task: Any = None) -> list[float]:
    model.eval()
    device = device or next(model.parameters()).device
    hits = torch.zeros(model.num_exits)
    for s in range(0, len(y), batch):
        outs = model(x[s:s + batch].to(device))
        for k, (logits, _) in enumerate(outs):
            hits[k] += (logits.argmax(-1).cpu() == y[s:s + batch]).sum()
        if bar is not None:
            bar.update(task, advance=len(y[s:s + batch]))
    return [round(float(h) / max(1, len(y)), 5) for h in hits]


def cpu_threads() -> int:
    """Threads for training on the CPU: every core, unless OMP_NUM_THREADS says fewer (as it
    does where other work shares the machine, such as parallel test workers)."""
    cores = os.cpu_count() or 1
    try:
        return max(1, min(cores, int(os.environ["OMP_NUM_THREADS"])))
    except (KeyError, ValueError):
        return cores


def train(model: MultiExitNet, data: Dataset, spec: InputSpec, cfg: TrainConfig, *,
          saved: Saved = Saved(), teacher: MultiExitNet | None = None,
          progress: bool = True) -> TrainResult:
    """Train all exits jointly, keeping and resuming state as ``saved`` says."""
    checkpoint, resume, features = saved.checkpoint, saved.resume, saved.features
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cpu_threads())
    device = resolve_device(cfg.device)
    layout = memory_layout(device, cfg)
    _place(device, layout, model)
    teacher = teacher if cfg.loss.taught else None  # nothing would learn from it
    if cfg.freeze_backbone and teacher is not None:
        raise OfframpError("a frozen backbone trains on cached features; it takes no teacher")
    teacher_dim = teacher.embed_dim if teacher is not None else None
    criterion = JointLoss(cfg.loss, model.num_exits, model.embed_dim, teacher_dim).to(device)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    params = [p for p in model.parameters() if p.requires_grad] + list(criterion.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = to_tensors(data.train, spec)
    steps = cfg.epochs * ((len(y_train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps))
    parts_of: dict[str, Any] = {"model": model, "loss": criterion, "optimizer": opt, "scheduler": sched}
    start, history = 0, list[dict[str, float]]()
    if checkpoint is not None and resume and checkpoint.is_file():
        start, history = _restore(checkpoint, parts_of, model.config, cfg, device)
    if teacher is not None:
        _place(device, layout, teacher)
        teacher.eval()
    with progress_bar(progress) as bar:
        if features is None and checkpoint is not None:
            features = checkpoint.with_suffix(".features.pt")
        cache = (_features(model, x_train, device, features, bar)
                 if cfg.freeze_backbone and start < cfg.epochs else None)
        task = bar.add_task("train", total=cfg.epochs, completed=start)
        for epoch in range(start, cfg.epochs):
            (model.heads if cache is not None else model).train()
            history.append(_epoch(criterion, opt, sched, _steps(
                model, cache, (x_train, y_train), cfg, epoch, device, teacher)))
            bar.update(task, advance=1, description=f"train loss {history[-1]['loss']:.3f}")
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save({**{k: v.state_dict() for k, v in parts_of.items()},
                            "epoch": epoch, "history": history, "model_config": model.config,
                            "train_config": cfg.to_dict()}, checkpoint)
    _place(device, torch.contiguous_format, model, teacher)  # what export and callers expect
    if cfg.finetune_epochs > 0:
        model.blocks.requires_grad_(True)
        tune = replace(cfg, epochs=cfg.finetune_epochs, lr=cfg.lr / 10, freeze_backbone=False,
                       finetune_epochs=0)
        tuned = train(model, data, spec, tune, progress=progress, saved=Saved(
            checkpoint.with_suffix(".finetune.pt") if checkpoint else None, resume))
        return TrainResult(tuned.val_accuracy, tuned.test_accuracy, history + tuned.history,
                           start)
    x_val, y_val = to_tensors(data.val, spec)
    x_test, y_test = to_tensors(data.test, spec)
    with progress_bar(progress) as bar:
        task = bar.add_task("exit accuracy (validation, test)", total=len(y_val) + len(y_test))
        val, test = (exit_accuracy(model, x, y, device, bar=bar, task=task)
                     for x, y in ((x_val, y_val), (x_test, y_test)))
        return TrainResult(val, test, history, start)


def _epoch(criterion: JointLoss, opt: torch.optim.Optimizer, sched: Any,
           batches: Iterator[Step]) -> dict[str, float]:
    """One pass over the training batches: the mean of each loss term, and its seconds."""
    totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "ft": 0.0}
    n, began = 0, time.monotonic()
    for (outs, t_out), yb in batches:
        loss, parts = criterion(outs, yb, t_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        totals["loss"] += float(loss.detach()) * len(yb)
        for k, v in parts.items():
            totals[k] += v * len(yb)
        n += len(yb)
    return ({k: round(v / max(1, n), 5) for k, v in totals.items()}
            | {"seconds": round(time.monotonic() - began, 1)})


def _place(device: torch.device, layout: torch.memory_format, *modules: nn.Module | None) -> None:
    for module in modules:
        if module is not None:
            module.to(device)
            cast(Any, module).to(memory_format=layout)  # an overload torch's stubs leave out


def _restore(checkpoint: Path, parts: dict[str, Any], model_config: dict[str, object],
             cfg: TrainConfig, device: torch.device) -> tuple[int, list[dict[str, float]]]:
    """Load a checkpoint into model, loss, optimizer and scheduler; (next epoch, history)."""
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    if state["model_config"] != model_config or state["train_config"] != cfg.to_dict():
        raise OfframpError(f"checkpoint {checkpoint} was made with other settings; "
                           "delete it or train with the same settings")
    for key, part in parts.items():
        part.load_state_dict(state[key])
    return state["epoch"] + 1, state["history"]


Step = tuple[tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor] | None],
             torch.Tensor]


def memory_layout(device: torch.device, cfg: TrainConfig) -> torch.memory_format:
    """Channels-last when the whole network trains on a CPU: oneDNN's convolutions (the
    depthwise ones above all) run faster on it; MobileNetV2 at 32x32, batch 128 on 2 cores
    took 0.77 s a step against 1.12 s. Heads on cached features keep the default."""
    if device.type == "cpu" and not cfg.freeze_backbone:
        return torch.channels_last
    return torch.contiguous_format


def _steps(model: MultiExitNet, cache: FeatureCache | None, xy: tuple[Inputs, torch.Tensor],
           cfg: TrainConfig, epoch: int, device: torch.device,
           teacher: MultiExitNet | None) -> Iterator[Step]:
    """Each batch's exit outputs (and the teacher's final output) with its labels."""
    x, y = xy
    layout = memory_layout(device, cfg)
    if cache is not None:
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        order = torch.randperm(len(y), generator=gen)
        for idx, feats in cache.batches(order, cfg.batch_size, device):
            yield (head_outputs(model, feats), None), y[idx].to(device)
        return
    for xb_cpu, yb_cpu in _batches(x, y, cfg, epoch):
        xb = xb_cpu.to(device, memory_format=layout)
        t_out = None
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(xb)[-1]
        yield (model(xb), t_out), yb_cpu.to(device)


def _features(model: MultiExitNet, x: Inputs, device: torch.device,
              path: Path | None, bar: Bar) -> FeatureCache:
    """The frozen backbone's features of the training images: from the cache file when it
    matches, else computed (and saved there)."""
    if path is not None and (cache := FeatureCache.load(path, len(x))) is not None:
        return cache
    task = bar.add_task("backbone features", total=len(x))
    cache = FeatureCache.compute(model, x, device,
                                 progress=lambda n: bar.update(task, advance=n))
    if path is not None:
        cache.save(path)
    return cache


