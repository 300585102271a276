"""Training a multi-exit model jointly (CPU by default, CUDA when present), deterministic with a
seed, checkpointed every epoch and resumable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from offramp.errors import OfframpError
from offramp.ml.data import Dataset, Split
from offramp.ml.loss import JointLoss, LossConfig
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
    loss: LossConfig = field(default_factory=LossConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loss"] = self.loss.to_dict()
        return d


@dataclass
class TrainResult:
    val_accuracy: list[float]
    test_accuracy: list[float]
    history: list[dict[str, float]]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise OfframpError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)


def to_tensors(split: Split, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(normalise(split.images, spec)), torch.from_numpy(split.labels)


def _batches(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, epoch: int
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
def exit_accuracy(model: MultiExitNet, x: torch.Tensor, y: torch.Tensor,
                  device: torch.device | None = None, batch: int = 256) -> list[float]:
    model.eval()
    device = device or next(model.parameters()).device
    hits = torch.zeros(model.num_exits)
    for s in range(0, len(y), batch):
        outs = model(x[s:s + batch].to(device))
        for k, (logits, _) in enumerate(outs):
            hits[k] += (logits.argmax(-1).cpu() == y[s:s + batch]).sum()
    return [round(float(h) / max(1, len(y)), 5) for h in hits]


def train(model: MultiExitNet, data: Dataset, spec: InputSpec, cfg: TrainConfig, *,
          checkpoint: Path | None = None, resume: bool = True,
          teacher: MultiExitNet | None = None, progress: bool = True) -> TrainResult:
    """Train all exits jointly; with ``checkpoint`` set, save every epoch and resume from it."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device(cfg.device)
    model.to(device)
    teacher_dim = teacher.embed_dim if teacher is not None else None
    criterion = JointLoss(cfg.loss, model.num_exits, model.embed_dim, teacher_dim).to(device)
    params = list(model.parameters()) + list(criterion.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    x_train, y_train = to_tensors(data.train, spec)
    steps = cfg.epochs * ((len(y_train) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, steps))
    start, history = 0, []
    if checkpoint is not None and resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state["model_config"] != model.config or state["train_config"] != cfg.to_dict():
            raise OfframpError(f"checkpoint {checkpoint} was made with other settings; "
                               "delete it or train with the same settings")
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["loss"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["epoch"] + 1, state["history"]
    if teacher is not None:
        teacher.to(device).eval()
    with _progress(progress) as bar:
        task = bar.add_task("train", total=cfg.epochs, completed=start)
        for epoch in range(start, cfg.epochs):
            model.train()
            totals = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "ft": 0.0}
            n = 0
            for xb_cpu, yb_cpu in _batches(x_train, y_train, cfg, epoch):
                xb, yb = xb_cpu.to(device), yb_cpu.to(device)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)[-1]
                loss, parts = criterion(model(xb), yb, t_out)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                totals["loss"] += float(loss.detach()) * len(yb)
                for k, v in parts.items():
                    totals[k] += v * len(yb)
                n += len(yb)
            history.append({k: round(v / max(1, n), 5) for k, v in totals.items()})
            bar.update(task, advance=1, description=f"train loss {history[-1]['loss']:.3f}")
            if checkpoint is not None:
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"model": model.state_dict(), "loss": criterion.state_dict(),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "epoch": epoch, "history": history, "model_config": model.config,
                            "train_config": cfg.to_dict()}, checkpoint)
    x_val, y_val = to_tensors(data.val, spec)
    x_test, y_test = to_tensors(data.test, spec)
    return TrainResult(exit_accuracy(model, x_val, y_val, device),
                       exit_accuracy(model, x_test, y_test, device), history)


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        return None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), transient=False)
