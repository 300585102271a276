"""Compressing the activation at a cut (docs/algorithms.md 1.5, after MDI-Exit).

An encoder (1x1 conv shrinking channels by ``ratio``) runs on the sender; its latent travels as
fp16; the decoder runs on the receiver: a 1x1 conv back to the channels plus a small 3x3
refinement (conv, BN, ReLU, conv) that sees each position's neighbours.

Training starts from the channels' principal components: the encoder projects onto the top
``channels / ratio`` of them and the decoder's linear path projects back (the refinement starts
at zero), so step 0 is already the best linear reconstruction. With the backbone frozen, the
pair is then trained on reconstruction (scaled by the activation's variance), distillation from
the uncompressed model's final exit and, lightly, every downstream exit's cross-entropy: the
exits, not the activation, are what the compression has to keep.

:func:`compare_codecs` measures bytes per sample and final-exit accuracy on the validation
split for raw, fp16, int8 and the autoencoders; :func:`record_codecs` keeps them in the bundle,
where a worker's automatic codec choice reads the accuracy each codec costs
(``Bundle.codec_accuracy``). ``offramp build`` records raw, fp16 and int8 at every cut
(:func:`record_wire_codecs`), so the choice has options at every cut of any bundle.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from offramp.ml.data import Dataset, Split
from offramp.ml.export import OPSET, ExportError
from offramp.ml.train import to_tensors
from offramp.ml.zoo import MultiExitNet
from offramp.model.bundle import AutoencoderSpec, Bundle, BundleError
from offramp.model.sessions import make_session
from offramp.wire import Tensor

BATCH = 32
MAX_ACTIVATIONS = 4 << 30  # bytes of training activations held in memory at once


class CutEncoder(nn.Module):
    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, max(1, channels // ratio), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CutDecoder(nn.Module):
    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        latent = max(1, channels // ratio)
        self.linear = nn.Conv2d(latent, channels, 1)
        self.refine = nn.Sequential(nn.Conv2d(latent, channels, 3, padding=1),
                                    nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                    nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z) + self.refine(z)


@dataclass
class CodecReport:
    codec: str
    bytes_per_sample: int
    final_accuracy: float


def _cut_block(bundle: Bundle, cut: int) -> int:
    if not 1 <= cut < bundle.num_segments:
        raise BundleError(f"cut must be a segment boundary 1..{bundle.num_segments - 1}, got {cut}")
    return bundle.segment(cut).last_block


def _downstream(model: MultiExitNet, block: int, a: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every exit after ``block``, starting from its activation."""
    outs, first = [], block + 1
    for head, b in zip(model.heads, model.exit_blocks, strict=True):
        if b <= block:
            continue
        a = model.forward_blocks(a, first, b)
        outs.append(head(a)[0])
        first = b + 1
    return outs


@torch.no_grad()
def _activations(model: MultiExitNet, bundle: Bundle, split: Split, block: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_tensors(split, bundle.manifest.input)
    acts = torch.cat([model.forward_blocks(x[s:s + 128], 0, block) for s in range(0, len(y), 128)])
    return acts, y


@torch.no_grad()
def _principal_init(enc: CutEncoder, dec: CutDecoder, acts: torch.Tensor) -> None:
    """Encoder onto the top principal components of the channels, decoder's linear path back."""
    channels = acts.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    outer = torch.zeros(channels, channels, dtype=torch.float64)
    for s in range(0, len(acts), 64):  # in float64, a few samples at a time (no second copy)
        rows = acts[s:s + 64].permute(0, 2, 3, 1).reshape(-1, channels).double()
        total += rows.sum(0)
        outer += rows.T @ rows
    n = acts.numel() // channels
    mean = total / n
    _, vectors = torch.linalg.eigh((outer - n * torch.outer(mean, mean)) / max(1, n - 1))
    top = vectors.flip(1)[:, :enc.conv.out_channels].float()  # channels x latent
    mean = mean.float()
    for conv, weight, bias in ((enc.conv, top.T, -(top.T @ mean)), (dec.linear, top, mean)):
        assert conv.bias is not None
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(bias)
    last = dec.refine[-1]  # the refinement starts as nothing
    assert isinstance(last, nn.Conv2d) and last.bias is not None
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def train_autoencoder(model: MultiExitNet, bundle: Bundle, data: Dataset, cut: int, ratio: int,
                      *, epochs: int = 8, lr: float = 1e-3, seed: int = 0
                      ) -> tuple[CutEncoder, CutDecoder]:
    torch.manual_seed(seed)
    block = _cut_block(bundle, cut)
    need = len(data.train) * bundle.segment(cut).activation_bytes
    if need > MAX_ACTIVATIONS:
        fits = MAX_ACTIVATIONS // bundle.segment(cut).activation_bytes
        raise BundleError(f"the activations at cut {cut} of {len(data.train)} training images "
                          f"take {need / 2**30:.1f} GiB; train the autoencoder on fewer "
                          f"(--train-limit {fits} or less)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    acts, y = _activations(model, bundle, data.train, block)
    channels = acts.shape[1]
    enc, dec = CutEncoder(channels, ratio), CutDecoder(channels, ratio)
    _principal_init(enc, dec, acts)
    variance = float(acts.var()) or 1.0
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=lr)
    steps = max(1, epochs * -(-len(y) // BATCH))
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        enc.train()
        dec.train()
        for idx in torch.randperm(len(y), generator=gen).split(BATCH):
            a = acts[idx]
            with torch.no_grad():
                teacher = F.softmax(_downstream(model, block, a)[-1], -1)
            rec = dec(enc(a).half().float())  # trained through the fp16 the latent travels as
            outs = _downstream(model, block, rec)
            loss = (F.mse_loss(rec, a) / variance
                    + F.kl_div(F.log_softmax(outs[-1], -1), teacher, reduction="batchmean")
                    + 0.1 * sum(F.cross_entropy(o, y[idx]) for o in outs))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return enc.eval(), dec.eval()


def export_autoencoder(bundle: Bundle, cut: int, ratio: int, enc: CutEncoder, dec: CutDecoder
                       ) -> AutoencoderSpec:
    act_shape = bundle.segment(cut).activation
    assert act_shape is not None
    example = torch.randn(2, *act_shape.per_sample)
    latent = enc(example)
    names = (f"ae-cut{cut}-r{ratio}-encoder.onnx", f"ae-cut{cut}-r{ratio}-decoder.onnx")
    for module, inp, name, (i, o) in ((enc, example, names[0], ("act", "latent")),
                                      (dec, latent, names[1], ("latent", "act"))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (inp,), str(bundle.path(name)), input_names=[i],
                              output_names=[o], dynamic_axes={i: {0: "b"}, o: {0: "b"}},
                              opset_version=OPSET, dynamo=False)
        onnx.checker.check_model(onnx.load(str(bundle.path(name))))
        got = make_session(bundle.path(name)).run(None, {i: inp.detach().numpy()})[0]
        if not np.allclose(got, module(inp).detach().numpy(), atol=1e-4, rtol=1e-3):
            raise ExportError(f"{name}: ONNX Runtime differs from torch")
    spec = AutoencoderSpec(cut, ratio, names[0], names[1], tuple(latent.shape[1:]))
    bundle.manifest.autoencoders = [a for a in bundle.manifest.autoencoders
                                    if (a.cut, a.ratio) != (cut, ratio)] + [spec]
    bundle.save()
    return spec


@torch.no_grad()
def compare_codecs(model: MultiExitNet, bundle: Bundle, data: Dataset, cut: int,
                   autoencoders: dict[int, tuple[CutEncoder, CutDecoder]],
                   samples: int | None = None) -> list[CodecReport]:
    """Final-exit validation accuracy when the activation at ``cut`` crosses the wire per
    codec (the autoencoders named ``ae-r<ratio>``), on the first ``samples`` validation images
    (None: all of them)."""
    model.eval()
    block = _cut_block(bundle, cut)
    val = data.val if samples is None else Split(data.val.images[:samples],
                                                 data.val.labels[:samples])
    acts, y = _activations(model, bundle, val, block)
    per_sample = int(acts[0].numel())

    def accuracy(transform: object) -> float:
        hits = 0
        for s in range(0, len(y), 64):
            a = transform(acts[s:s + 64])  # type: ignore[operator]
            hits += int((_downstream(model, block, a)[-1].argmax(-1) == y[s:s + 64]).sum())
        return round(hits / len(y), 5)

    def through(codec: str) -> object:
        return lambda a: torch.from_numpy(
            Tensor.decode_bytes(Tensor.encode(a.numpy(), codec)))  # type: ignore[arg-type]

    reports = [CodecReport("raw", per_sample * 4, accuracy(lambda a: a)),
               CodecReport("fp16", per_sample * 2, accuracy(through("fp16"))),
               CodecReport("int8", per_sample, accuracy(through("int8")))]
    for ratio, (enc, dec) in sorted(autoencoders.items()):
        latent = int(enc(acts[:1]).numel())
        reports.append(CodecReport(f"ae-r{ratio}", latent * 2,
                                   accuracy(lambda a, e=enc, d=dec: d(e(a).half().float()))))
    return reports


def record_codecs(bundle: Bundle, cut: int, reports: list[CodecReport]) -> None:
    """Keep what each codec costs at ``cut`` in the bundle's manifest (its metrics), beside
    what was recorded there before for codecs not measured again."""
    codecs = dict(bundle.manifest.metrics.get("codecs") or {})
    codecs[str(cut)] = {**(codecs.get(str(cut)) or {}),
                        **{r.codec: {"bytes_per_sample": r.bytes_per_sample,
                                     "accuracy": r.final_accuracy} for r in reports}}
    bundle.manifest.metrics["codecs"] = codecs
    bundle.save()


def record_wire_codecs(model: MultiExitNet, bundle: Bundle, data: Dataset,
                       samples: int | None = 1000) -> None:
    """What raw, fp16 and int8 cost at every cut of ``bundle`` (the first ``samples``
    validation images): what ``offramp build`` leaves, so that a worker's automatic codec choice
    has measured options wherever the plan cuts."""
    for cut in range(1, bundle.num_segments):
        record_codecs(bundle, cut, compare_codecs(model, bundle, data, cut, {}, samples))


def default_cut(bundle: Bundle) -> int:
    """The first cut whose activation is smallest per sample (what crosses the network)."""
    sizes = [(s.activation_bytes, s.index) for s in bundle.manifest.segments[:-1]]
    return min(sizes)[1] if sizes else 1


__all__ = ["CodecReport", "compare_codecs", "default_cut", "export_autoencoder",
           "record_codecs", "record_wire_codecs", "train_autoencoder"]
