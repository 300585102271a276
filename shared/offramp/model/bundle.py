"""A model bundle: a directory with ``manifest.json`` and one ONNX file per segment.

Written by ``offramp export`` / ``offramp build`` (:mod:`offramp.ml.export`), read by every
service. Loading checks that the manifest is complete and that every file it names exists, and
raises :class:`BundleError` saying what is missing where.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from offramp.errors import OfframpError
from offramp.model.calibration import Calibration
from offramp.model.inputs import InputSpec

FORMAT = 1
MANIFEST = "manifest.json"


class BundleError(OfframpError):
    """A model bundle that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 for the batch axis

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]))

    @property
    def per_sample(self) -> tuple[int, ...]:
        return self.shape[1:]


@dataclass(frozen=True)
class SegmentSpec:
    """Segment k: blocks ``first_block..last_block`` then exit head k."""

    index: int
    file: str
    first_block: int
    last_block: int
    input: TensorSpec
    activation: TensorSpec | None  # None for the last segment
    logits: TensorSpec
    embedding: TensorSpec
    flops: int
    activation_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "file": self.file, "blocks": [self.first_block, self.last_block],
                "input": self.input.to_dict(),
                "activation": None if self.activation is None else self.activation.to_dict(),
                "logits": self.logits.to_dict(), "embedding": self.embedding.to_dict(),
                "flops": self.flops, "activation_bytes": self.activation_bytes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentSpec:
        act = d.get("activation")
        return cls(int(d["index"]), str(d["file"]), int(d["blocks"][0]), int(d["blocks"][1]),
                   TensorSpec.from_dict(d["input"]),
                   None if act is None else TensorSpec.from_dict(act),
                   TensorSpec.from_dict(d["logits"]), TensorSpec.from_dict(d["embedding"]),
                   int(d["flops"]), int(d["activation_bytes"]))


@dataclass(frozen=True)
class AutoencoderSpec:
    """A learned codec for the activation leaving segment ``cut``."""

    cut: int
    ratio: int
    encoder: str
    decoder: str
    latent_shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "ratio": self.ratio, "encoder": self.encoder,
                "decoder": self.decoder, "latent_shape": list(self.latent_shape)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderSpec:
        return cls(int(d["cut"]), int(d["ratio"]), str(d["encoder"]), str(d["decoder"]),
                   tuple(int(x) for x in d["latent_shape"]))


@dataclass
class Manifest:
    name: str
    arch: str
    config: dict[str, Any]
    classes: list[str]
    input: InputSpec
    blocks: list[dict[str, Any]]
    exits: list[dict[str, Any]]
    segments: list[SegmentSpec]
    full_model: str
    full_flops: int
    calibration: dict[str, Any] = field(default_factory=dict)
    autoencoders: list[AutoencoderSpec] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    rows_model: str = ""  # one Gather: drops rows of a batch on the device ('' : none)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "arch": self.arch, "config": self.config,
                "classes": self.classes, "input": self.input.to_dict(), "blocks": self.blocks,
                "exits": self.exits, "segments": [s.to_dict() for s in self.segments],
                "full_model": {"file": self.full_model, "flops": self.full_flops},
                "calibration": self.calibration,
                "autoencoders": [a.to_dict() for a in self.autoencoders],
                "metrics": self.metrics, **({"rows_model": self.rows_model}
                                            if self.rows_model else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(f"manifest format {d.get('format')!r} is not {FORMAT}")
        return cls(str(d["name"]), str(d["arch"]), dict(d["config"]), list(d["classes"]),
                   InputSpec.from_dict(d["input"]), list(d["blocks"]), list(d["exits"]),
                   [SegmentSpec.from_dict(s) for s in d["segments"]],
                   str(d["full_model"]["file"]), int(d["full_model"]["flops"]),
                   dict(d.get("calibration") or {}),
                   [AutoencoderSpec.from_dict(a) for a in d.get("autoencoders") or []],
                   dict(d.get("metrics") or {}), str(d.get("rows_model") or ""))


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def num_segments(self) -> int:
        return len(self.manifest.segments)

    @cached_property
    def identity(self) -> str:
        """``name@digest``: what services compare to tell that they serve the same model.
        The digest (12 hex of a SHA-256) covers what the wire depends on, the manifest's
        structure (input, classes, exits, cuts, codecs) and the bytes of every graph a worker
        runs, and not the calibration or the recorded metrics, which ``offramp calibrate`` may
        change under running services without changing a single activation."""
        m = self.manifest.to_dict()
        structure = {k: m[k] for k in ("name", "arch", "config", "classes", "input", "exits",
                                       "segments", "autoencoders")}
        h = hashlib.sha256(json.dumps(structure, sort_keys=True).encode())
        for file in served_files(self.manifest):
            with (self.root / file).open("rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        return f"{self.name}@{h.hexdigest()[:12]}"

    def segment(self, index: int) -> SegmentSpec:
        if not 1 <= index <= self.num_segments:
            raise BundleError(f"bundle {self.name} has segments 1..{self.num_segments}, not {index}")
        return self.manifest.segments[index - 1]

    def path(self, file: str) -> Path:
        return self.root / file

    def calibration(self) -> Calibration:
        if not self.manifest.calibration:
            raise BundleError(f"bundle {self.root} has no calibration; run `offramp calibrate`")
        return Calibration.from_dict(self.manifest.calibration)

    def rows_model(self) -> Path | None:
        """The bundle's row-gathering model (device-resident activations), if it has one."""
        return self.path(self.manifest.rows_model) if self.manifest.rows_model else None

    def int8_table(self, segment: int) -> Path:
        """Where segment ``segment``'s TensorRT INT8 calibration table is kept (written by
        ``offramp calibrate --int8``)."""
        return self.path(f"int8/{Path(self.segment(segment).file).stem}.flatbuffers")

    def autoencoder(self, cut: int) -> AutoencoderSpec | None:
        return next((a for a in self.manifest.autoencoders if a.cut == cut), None)

    def autoencoders_at(self, cut: int) -> list[AutoencoderSpec]:
        return sorted((a for a in self.manifest.autoencoders if a.cut == cut),
                      key=lambda a: a.ratio)

    def _codecs(self, cut: int) -> dict[str, Any]:
        """What ``offramp build`` and ``offramp compress`` recorded per codec at ``cut``."""
        recorded: dict[str, Any] = (self.manifest.metrics.get("codecs") or {}).get(str(cut)) or {}
        return recorded

    def codec_accuracy(self, cut: int) -> dict[str, float]:
        """Final-exit validation accuracy with the activation leaving segment ``cut`` sent by
        each codec (raw, fp16, int8, ae-r<ratio>), as ``offramp compress`` measured it; empty
        where it was never measured."""
        return {str(name): float(v["accuracy"]) for name, v in self._codecs(cut).items()}

    def codec_bytes(self, cut: int) -> dict[str, int]:
        """Bytes per sample each recorded codec sends at ``cut`` (empty: none recorded)."""
        return {str(name): int(v["bytes_per_sample"]) for name, v in self._codecs(cut).items()}

    def wire_bytes(self, cut: int, max_loss: float) -> int:
        """Bytes per sample of the activation leaving segment ``cut`` by the smallest codec
        whose recorded accuracy loss is within ``max_loss`` points (raw where none is): what
        a worker's automatic choice sends over a slow link."""
        raw = self.segment(cut).activation_bytes
        accuracy, sizes = self.codec_accuracy(cut), self.codec_bytes(cut)
        if "raw" not in accuracy:
            return raw
        return min([raw, *(sizes[c] for c, a in accuracy.items()
                           if 100 * (accuracy["raw"] - a) <= max_loss)])

    def save(self) -> None:
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest.to_dict(), indent=1))
        tmp.replace(self.root / MANIFEST)


def served_files(manifest: Manifest) -> list[str]:
    """The graphs a worker runs: segments, autoencoders, the row-gathering model."""
    files = [s.file for s in manifest.segments]
    files += [f for a in manifest.autoencoders for f in (a.encoder, a.decoder)]
    return files + ([manifest.rows_model] if manifest.rows_model else [])


def load_bundle(root: str | Path) -> Bundle:
    """Read and check a bundle directory; BundleError names what is wrong."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"model bundle directory {root} does not exist "
                          "(build one with `offramp build --preset demo --out DIR`)")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {root} is not a model bundle")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BundleError(f"{path} is incomplete or malformed ({type(exc).__name__}: {exc})") from None
    for file in [*served_files(manifest), manifest.full_model]:
        if not (root / file).is_file():
            raise BundleError(f"{root / file} named in {path} is missing")
    for i, seg in enumerate(manifest.segments, start=1):
        if seg.index != i:
            raise BundleError(f"{path}: segment {i} is numbered {seg.index}")
        if (seg.activation is None) != (i == len(manifest.segments)):
            raise BundleError(f"{path}: only the last segment has no activation output")
    return Bundle(root, manifest)
