"""Model zoo, exit heads, the joint loss and its switches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offramp.ml.build import load_trained
from offramp.ml.flops import count_flops
from offramp.ml.loss import JointLoss, LossConfig
from offramp.ml.zoo import REGISTRY, create_model

pytestmark = pytest.mark.tier("inproc")

SIZES = {"resnet18": 64, "resnet50": 64}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_model_gives_one_output_per_exit(name: str) -> None:
    size = SIZES.get(name, 32)
    model = create_model(name, 7, input_size=size).eval()
    outs = model(torch.randn(2, 3, size, size))
    assert 3 <= model.num_exits <= 5
    assert len(outs) == model.num_exits == len(model.heads)
    assert len(model.feature_info) == len(model.blocks)
    assert model.exit_blocks[-1] == len(model.blocks) - 1
    for logits, hidden in outs:
        assert logits.shape == (2, 7)
        assert hidden.shape == (2, model.embed_dim)


def test_exits_can_be_attached_after_any_block() -> None:
    model = create_model("resnet20", 10, exits=[1, 5])
    assert model.exit_blocks == [1, 5, 9]
    with pytest.raises(ValueError, match="exit blocks"):
        create_model("resnet20", 10, exits=[42])
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg", 10)


def test_early_conv_heads_pool_to_a_grid_and_older_models_still_load(tmp_path: Path) -> None:
    """Heads on high-resolution features keep a 2x2 layout (where the strokes are, not only
    which); a model saved before, whose config has no head_grid, is rebuilt as it was."""
    model = create_model("mobilenetv2", 10)
    assert model.config["head_grid"] == 2
    conv_heads = [h for h in model.heads if h.grid == 2]
    assert conv_heads and model.heads[-1].grid == 1
    old = create_model("mobilenetv2", 10, head_grid=1)
    config = {k: v for k, v in old.config.items() if k != "head_grid"}
    torch.save({"model_config": {**config, "name": "mobilenetv2"}, "num_classes": 10,
                "state": old.state_dict()}, tmp_path / "model.pt")
    loaded = load_trained(tmp_path / "model.pt")
    assert all(h.grid == 1 for h in loaded.heads)
    x = torch.randn(2, 3, 32, 32)
    old.eval()
    for (a, _), (b, _) in zip(old(x), loaded(x), strict=True):
        assert torch.allclose(a, b)


def test_width_multiplier_and_depth_are_settings() -> None:
    small = sum(p.numel() for p in create_model("mobilenetv2", 10, width=0.5).parameters())
    big = sum(p.numel() for p in create_model("mobilenetv2", 10, width=1.0).parameters())
    assert small < big
    wrn = create_model("wideresnet", 10, depth=22, width=2)
    assert len(wrn.blocks) == 1 + 3 * 3 + 1
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("wideresnet", 10, depth=17)


def test_flops_grow_with_depth_and_count_per_sample() -> None:
    model = create_model("resnet20", 10).eval()
    x1, x4 = torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)
    one = count_flops(model, lambda: model(x1))
    four = count_flops(model, lambda: model(x4))
    assert one == four > 40e6  # ResNet-20 is about 41 MMACs x 2 plus heads


def _outputs(k: int = 3, n: int = 8, c: int = 5, e: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, c, generator=g, requires_grad=True),
             torch.randn(n, e, generator=g, requires_grad=True)) for _ in range(k)]


def test_each_loss_term_can_be_switched_off() -> None:
    y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(1))
    full = JointLoss(LossConfig(), 3, 16)
    _, parts = full(_outputs(), y)
    assert parts["kd"] > 0 and parts["ft"] > 0
    _, parts = JointLoss(LossConfig(distill=False), 3, 16)(_outputs(), y)
    assert parts["kd"] == 0 and parts["ft"] > 0
    _, parts = JointLoss(LossConfig(feature=False), 3, 16)(_outputs(), y)
    assert parts["ft"] == 0 and parts["kd"] > 0


def test_loss_trains_early_exits_and_projections_not_the_teacher_signal() -> None:
    outs = _outputs()
    y = torch.zeros(8, dtype=torch.long)
    loss_fn = JointLoss(LossConfig(alpha=0.0, exit_weights=(1.0, 1.0, 0.0)), 3, 16)
    loss, _ = loss_fn(outs, y)
    loss.backward()
    assert outs[0][0].grad is not None and outs[0][0].grad.abs().sum() > 0
    # with weight 0 on the final exit, the teacher is only a target: no gradient reaches it
    assert outs[2][0].grad is None or outs[2][0].grad.abs().sum() == 0
    assert loss_fn.projections[0].weight.grad is not None


def test_external_teacher_and_bad_settings() -> None:
    y = torch.zeros(8, dtype=torch.long)
    teacher = (torch.randn(8, 5), torch.randn(8, 32))
    loss, parts = JointLoss(LossConfig(), 3, 16, teacher_dim=32)(_outputs(), y, teacher)
    assert loss.isfinite() and parts["kd"] > 0
    for bad in ({"alpha": 1.5}, {"temperature": 0}, {"gamma": -1}):
        with pytest.raises(ValueError):
            LossConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exit weights"):
        LossConfig(exit_weights=(1.0,)).weights(3)
