"""How this worker's activations cross a link: the codec per cut, chosen for the link as
measured (:mod:`offramp.policy.codecs`) or pinned by ``OFFRAMP_WORKER_CODEC``, and the
bundle's autoencoders run on either side of it.

A cut's options are measured once, the first time it sends: bytes per sample from the bundle's
activation shape, encode and decode time per sample on this node (autoencoder sessions run on
the inference thread, numpy casts here), and the accuracy each codec costs from the bundle's
calibration (``offramp compress``). A receiver decodes an ``ae`` latent with the decoder whose
latent shape it matches, so sender and receiver need nothing but the same bundle.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import onnxruntime as ort

from offramp.errors import WireError
from offramp.model.bundle import AutoencoderSpec, Bundle
from offramp.model.sessions import make_session
from offramp.policy.codecs import CodecOption, choose_codec
from offramp.wire import Tensor

Offload = Callable[..., Awaitable[Any]]  # run a blocking function off the event loop
PINNED = ("raw", "fp16", "int8", "ae")


@dataclass(frozen=True)
class Option:
    """A codec option and what it needs to run (the autoencoder, for ``ae-r<ratio>``)."""

    cost: CodecOption
    ae: AutoencoderSpec | None = None


class Codecs:
    def __init__(self, bundle: Bundle, *, mode: str, max_loss: float, batch: int,
                 offload: Offload, log: Any) -> None:
        if mode != "auto" and mode not in PINNED:
            raise ValueError(f"codec {mode!r} is not auto or one of {', '.join(PINNED)}")
        self.bundle = bundle
        self.mode = mode
        self.max_loss = max_loss
        self.batch = batch
        self.offload = offload
        self.log = log
        self._options: dict[int, list[Option]] = {}
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._chosen: dict[tuple[int, str], str] = {}  # (cut, node) -> the codec last used

    # -- choosing --------------------------------------------------------------------------------
    async def options(self, cut: int) -> list[Option]:
        if cut not in self._options:
            self._options[cut] = await self.offload(self._measure, cut)
        return self._options[cut]

    async def choose(self, cut: int, node: str, link_bytes_per_s: float) -> Option:
        """The option for sending ``cut``'s activation to ``node`` over a path of this rate."""
        option = self._pick(await self.options(cut), link_bytes_per_s)
        if self._chosen.get((cut, node)) != option.cost.codec:
            self._chosen[(cut, node)] = option.cost.codec
            self.log.info("codec_chosen", cut=cut, to=node, codec=option.cost.codec,
                          mode=self.mode,
                          link_bytes_per_s=round(link_bytes_per_s),
                          expected_ms=round(1e3 * option.cost.cost_s(link_bytes_per_s), 3))
        return option

    def wire(self, cut: int, link_bytes_per_s: float) -> tuple[float, float]:
        """What the codec for a link of this rate does to ``cut``'s transfer, per raw byte: the
        bytes it sends and its encode plus decode seconds (raw until the cut's options have
        been measured, at its first send). What placement counts for each candidate."""
        options = self._options.get(cut)
        if not options:
            return 1.0, 0.0
        raw = options[0].cost
        cost = self._pick(options, link_bytes_per_s).cost
        return (cost.bytes_per_sample / raw.bytes_per_sample,
                (cost.encode_s + cost.decode_s) / raw.bytes_per_sample)

    def _pick(self, options: list[Option], link_bytes_per_s: float) -> Option:
        if self.mode == "auto":
            best = choose_codec([o.cost for o in options], link_bytes_per_s,
                                max_loss=self.max_loss)
            return next(o for o in options if o.cost is best)
        return next((o for o in options if o.cost.codec.split("-")[0] == self.mode),
                    options[0])  # ae pinned where the bundle has none at this cut: raw

    def _measure(self, cut: int) -> list[Option]:
        """The options at ``cut`` and their costs here (blocking: runs off the event loop)."""
        seg = self.bundle.segment(cut)
        assert seg.activation is not None, "a cut is a segment with a successor"
        shape = (self.batch, *seg.activation.per_sample)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        n = int(np.prod(seg.activation.per_sample))
        accuracy = self.bundle.codec_accuracy(cut)

        def loss(name: str) -> float | None:
            if name == "raw":
                return 0.0
            if name not in accuracy or "raw" not in accuracy:
                return None
            return round(100 * (accuracy["raw"] - accuracy[name]), 3)

        options = [Option(CodecOption("raw", 4 * n, loss=0.0))]
        for name in ("fp16", "int8"):
            enc = _per_sample(partial(Tensor.encode, x, name), self.batch)
            t = Tensor.encode(x, name)
            dec = _per_sample(t.to_numpy, self.batch)
            options.append(Option(CodecOption(name, t.nbytes // self.batch, enc, dec, loss(name))))
        for spec in self.bundle.autoencoders_at(cut):
            latent = self._run(spec.encoder, "act", x)
            enc = _per_sample(partial(self._run, spec.encoder, "act", x), self.batch)
            dec = _per_sample(partial(self._run, spec.decoder, "latent", latent), self.batch)
            name = f"ae-r{spec.ratio}"
            options.append(Option(CodecOption(name, 2 * int(np.prod(spec.latent_shape)), enc,
                                              dec, loss(name)), spec))
        return options

    # -- encoding and decoding -------------------------------------------------------------------
    async def encode(self, option: Option, x: np.ndarray) -> Tensor:
        if option.ae is None:
            return Tensor.encode(x, option.cost.codec)  # type: ignore[arg-type]
        latent = await self.offload(self._run, option.ae.encoder, "act", x)
        return Tensor.latent(latent)

    async def decode(self, tensor: Tensor, cut: int) -> np.ndarray:
        """The activation a packet carries (``ae`` latents through the cut's decoder)."""
        if tensor.codec != "ae":
            return tensor.to_numpy()
        spec = next((a for a in self.bundle.autoencoders_at(cut)
                     if tuple(a.latent_shape) == tuple(tensor.shape[1:])), None)
        if spec is None:
            raise WireError(f"tensor: no autoencoder at cut {cut} of {self.bundle.name} has a "
                            f"latent of shape {list(tensor.shape[1:])}")
        latent = tensor.stored().astype(np.float32)
        out: np.ndarray = await self.offload(self._run, spec.decoder, "latent", latent)
        return out

    def _run(self, file: str, name: str, x: np.ndarray) -> np.ndarray:
        session = self._sessions.get(file)
        if session is None:
            session = self._sessions[file] = make_session(self.bundle.path(file))
        out: np.ndarray = session.run(None, {name: x})[0]
        return out


def _per_sample(fn: Callable[[], object], batch: int, repeat: int = 3) -> float:
    """Best of ``repeat`` timings of ``fn`` (after one warm-up), per sample of ``batch``."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best / batch
