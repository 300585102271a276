"""Activations that stay on the device between segments (ONNX Runtime's IO binding).

A segment run this way takes its input where it already is and leaves its activation on the
session's device; only the logits and the embedding (a few floats per sample, what the exit
decision reads) come to the host. The samples that exit are dropped on the device by index
(:meth:`Bound.keep`), and the next segment hosted here takes the survivors from there. Rows go
to the host once, when a packet to another node needs them (:meth:`DeviceRows.host`); a packet
that arrives is copied to the device once, as part of the batch it joins.

With ``fixed`` buffers (what CUDA graphs need: every run at the same addresses and shape) the
input and outputs are allocated once at the static batch; the input is filled in place, and
the activation buffer is overwritten by the next run, so :meth:`Bound.keep` copies the rows
that go on out of it before that.

Dropping rows on the device uses the bundle's ``rows.onnx`` (one Gather); a bundle exported
before it existed has none, and its rows go through the host instead (``transfers`` says so).
The CPU provider runs all of this too, which is how it is tested without a GPU.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort


@dataclass(eq=False)
class DeviceRows:
    """A batch of activations on the device, the rows of one segment run that go on."""

    value: ort.OrtValue
    transfers: Counter[str]
    _host: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.value.shape()[0])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.value.shape()[1:])) * 4

    def host(self) -> np.ndarray:
        """The rows on the host, copied once however often asked."""
        if self._host is None:
            self._host = self.value.numpy()
            if self.value.device_name() != "cpu":
                self.transfers["to_host"] += 1
        return self._host


@dataclass(frozen=True, eq=False)
class Row:
    """One sample's activation in a :class:`DeviceRows` (what a queued item holds instead of
    a host array)."""

    batch: DeviceRows
    index: int

    @property
    def nbytes(self) -> int:
        return self.batch.row_bytes


Activation = np.ndarray | Row  # a queued sample's input: on the host, or on the device
# A micro-batch's input: the queued activations, or (all on the host) already stacked
Batch = Sequence[Activation] | np.ndarray


def on_host(xs: Batch) -> np.ndarray:
    """The activations as one host array (each device batch copied to the host once)."""
    if isinstance(xs, np.ndarray):
        return xs
    return np.stack([x.batch.host()[x.index] if isinstance(x, Row) else x for x in xs])


def stack_on_host(xs: list[Activation]) -> Batch:
    """Host rows stacked now (where the caller is: the event loop, so that the inference
    thread only runs the session), device rows as they are (the inference thread gathers
    them)."""
    return xs if any(isinstance(x, Row) for x in xs) else on_host(xs)


@dataclass(frozen=True)
class Outputs:
    """A segment run's outputs: the activation on the device (resident) or the host."""

    activation: DeviceRows | np.ndarray | None
    logits: np.ndarray
    embedding: np.ndarray


class RowSelector:
    """Gathers rows of a device batch into another (``rows.onnx``), or through the host where
    the bundle has no such model."""

    def __init__(self, session: ort.InferenceSession | None, device: str, device_id: int,
                 transfers: Counter[str]) -> None:
        self.session = session
        self.device, self.device_id = device, device_id
        self.transfers = transfers

    @classmethod
    def load(cls, path: Path | None, device: str, device_id: int,
             transfers: Counter[str]) -> RowSelector:
        """``device``: 'cpu', or 'cuda' (the CUDA provider on ``device_id``, where the
        segments' buffers are)."""
        session = None
        if path is not None and path.is_file():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            providers: list[str | tuple[str, dict[str, object]]] = ["CPUExecutionProvider"]
            if device == "cuda":
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        return cls(session, device, device_id, transfers)

    def select(self, value: ort.OrtValue, rows: np.ndarray,
               out: ort.OrtValue | None = None) -> ort.OrtValue:
        """``value[rows]`` on the device: into ``out`` (same shape) or a new value."""
        rows = rows.astype(np.int64, copy=False)
        if self.session is None:
            picked = np.ascontiguousarray(value.numpy()[rows])
            if self.device != "cpu":
                self.transfers["to_host"] += 1
            return self._upload(picked, out)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input("x", value)
        binding.bind_cpu_input("rows", rows)
        if out is not None:
            binding.bind_ortvalue_output("y", out)
        else:
            binding.bind_output("y", self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        self.transfers["on_device"] += 1
        return out if out is not None else binding.get_outputs()[0]

    def _upload(self, x: np.ndarray, out: ort.OrtValue | None) -> ort.OrtValue:
        if self.device != "cpu":
            self.transfers["to_device"] += 1
        if out is None:
            return ort.OrtValue.ortvalue_from_numpy(x, self.device, self.device_id)
        out.update_inplace(x)
        return out


class Bound:
    """One segment session run with IO binding (see the module doc). Used from one thread."""

    def __init__(self, session: ort.InferenceSession, *, input_name: str,
                 per_sample: tuple[int, ...], outputs: tuple[str | None, str, str],
                 output_shapes: dict[str, tuple[int, ...]], rows: RowSelector,
                 fixed_batch: int = 0) -> None:
        self.session = session
        self.input_name = input_name
        self.act_name, self.logits_name, self.emb_name = outputs
        self.device, self.device_id = rows.device, rows.device_id  # where the rows live
        self.rows = rows
        self.transfers = rows.transfers
        self.fixed = fixed_batch
        self._names = [name for name in outputs if name]
        self._binding: ort.IOBinding | None = None
        if fixed_batch:  # bound once: a CUDA graph replays at these addresses
            self._input = self._alloc([fixed_batch, *per_sample])
            self._buffers = {name: self._alloc([fixed_batch, *output_shapes[name]])
                             for name in self._names}
            self._binding = session.io_binding()
            self._binding.bind_ortvalue_input(input_name, self._input)
            for name in self._names:
                self._binding.bind_ortvalue_output(name, self._buffers[name])

    def _alloc(self, shape: list[int]) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device,
                                                         self.device_id)

    def run(self, xs: Batch) -> Outputs:
        """Run the segment on ``xs`` (host arrays, device rows, or both)."""
        n = len(xs)
        if self.fixed:
            if n > self.fixed:
                raise ValueError(f"batch of {n} over the static batch {self.fixed}")
            assert self._binding is not None
            self._fill(xs)
            self.session.run_with_iobinding(self._binding)
            got = self._buffers
        else:
            binding = self.session.io_binding()
            self._bind_input(binding, xs)
            for name in self._names:
                if name == self.act_name:
                    binding.bind_output(name, self.device, self.device_id)
                else:
                    binding.bind_output(name)  # to the host: the exit decision reads them
            self.session.run_with_iobinding(binding)
            got = dict(zip(self._names, binding.get_outputs(), strict=True))
        logits = got[self.logits_name].numpy()[:n]
        emb = got[self.emb_name].numpy()[:n]
        act = None
        if self.act_name is not None:
            act = DeviceRows(got[self.act_name], self.transfers)
        return Outputs(act, logits, emb)

    def keep(self, act: DeviceRows, rows: Sequence[int]) -> list[Row]:
        """The activations of ``rows`` (those that go on), on the device, out of the run's
        output (which the next run overwrites when buffers are fixed)."""
        idx = np.asarray(rows, np.int64)
        whole = not self.fixed and len(idx) == len(act) and bool((idx == np.arange(len(act))).all())
        kept = act if whole else DeviceRows(self.rows.select(act.value, idx), self.transfers)
        return [Row(kept, i) for i in range(len(idx))]

    @staticmethod
    def _one_batch(xs: Batch) -> tuple[DeviceRows, np.ndarray] | None:
        """The device batch and row indices when every x is a row of the same batch."""
        if isinstance(xs, np.ndarray):
            return None
        first = xs[0] if xs else None
        if not isinstance(first, Row) or not all(isinstance(x, Row) and x.batch is first.batch
                                                 for x in xs):
            return None
        return first.batch, np.array([x.index for x in xs if isinstance(x, Row)], np.int64)

    def _host_batch(self, xs: Batch) -> np.ndarray:
        """Host rows, or rows of several device batches: assembled on the host."""
        if self.device != "cpu":
            self.transfers["to_device"] += 1
        return np.ascontiguousarray(on_host(xs), np.float32)

    def _bind_input(self, binding: ort.IOBinding, xs: Batch) -> None:
        one = self._one_batch(xs)
        if one is None:
            binding.bind_cpu_input(self.input_name, self._host_batch(xs))
            return
        batch, idx = one
        if len(idx) == len(batch) and bool((idx == np.arange(len(batch))).all()):
            binding.bind_ortvalue_input(self.input_name, batch.value)
        else:
            binding.bind_ortvalue_input(self.input_name, self.rows.select(batch.value, idx))

    def _fill(self, xs: Batch) -> None:
        """Put ``xs`` into the fixed input buffer, padded to the static batch (the padding's
        answers are not read)."""
        pad = self.fixed - len(xs)
        one = self._one_batch(xs)
        if one is not None:
            batch, idx = one
            self.rows.select(batch.value, np.concatenate([idx, np.full(pad, idx[0], np.int64)]),
                             self._input)
            return
        x = self._host_batch(xs)
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        self._input.update_inplace(x)
