"""The joint loss over all exits (docs/algorithms.md 2.1, after DistrEE):

``L = sum_k w_k [ a CE(y, p_k) + (1 - a) t^2 KL(p_T^t || p_k^t) ] + g sum_k || P_k(f_k) - f_T ||^2``

with the teacher T either the final exit (self-distillation, detached) or a separately trained
model, P_k small linear projections into the teacher's feature space, features L2-normalised.
The final exit under self-distillation is trained by cross-entropy alone. Each term can be
switched off; every weight is a setting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.5
    temperature: float = 3.0
    gamma: float = 0.1
    exit_weights: tuple[float, ...] = ()  # empty: rising with depth, k / K
    distill: bool = True
    feature: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")

    @property
    def taught(self) -> bool:
        """Whether any term learns from a teacher (with neither, none is run)."""
        return self.distill or (self.feature and self.gamma > 0)

    def weights(self, num_exits: int) -> list[float]:
        if self.exit_weights:
            if len(self.exit_weights) != num_exits:
                raise ValueError(f"{len(self.exit_weights)} exit weights for {num_exits} exits")
            return list(self.exit_weights)
        return [(k + 1) / num_exits for k in range(num_exits)]

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["exit_weights"] = list(self.exit_weights)
        return d


Outputs = list[tuple[torch.Tensor, torch.Tensor]]


class JointLoss(nn.Module):
    """Holds the feature-transfer projections; ``forward`` returns (loss, parts)."""

    def __init__(self, config: LossConfig, num_exits: int, embed_dim: int,
                 teacher_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_exits = num_exits
        self.w = config.weights(num_exits)
        self.projections = nn.ModuleList(
            nn.Linear(embed_dim, teacher_dim or embed_dim) for _ in range(num_exits - 1))

    def forward(self, outputs: Outputs, target: torch.Tensor,
                teacher: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        self_distill = teacher is None
        t_logits, t_feat = teacher if teacher is not None else outputs[-1]
        t_logits, t_feat = t_logits.detach(), t_feat.detach()
        ce_total = kd_total = ft_total = torch.zeros((), device=target.device)
        for k, (logits, feat) in enumerate(outputs):
            ce = F.cross_entropy(logits, target)
            last = k == self.num_exits - 1
            if cfg.distill and not (last and self_distill):
                t = cfg.temperature
                kd = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(t_logits / t, -1),
                              reduction="batchmean") * t * t
                ce_total = ce_total + self.w[k] * cfg.alpha * ce
                kd_total = kd_total + self.w[k] * (1 - cfg.alpha) * kd
            else:
                ce_total = ce_total + self.w[k] * ce
            if cfg.feature and cfg.gamma > 0 and not last:
                proj = F.normalize(self.projections[k](feat), dim=-1)
                ft = (proj - F.normalize(t_feat, dim=-1)).pow(2).sum(-1).mean()
                ft_total = ft_total + cfg.gamma * ft
        loss = ce_total + kd_total + ft_total
        parts = {"ce": float(ce_total.detach()), "kd": float(kd_total.detach()),
                 "ft": float(ft_total.detach())}
        return loss, parts
