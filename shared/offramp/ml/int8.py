"""INT8 calibration tables for TensorRT, one per segment, from the bundle's validation split.

TensorRT runs a network in INT8 only with the range of every tensor in it. ONNX Runtime's
calibration tool (``onnxruntime.quantization``) measures them: each segment runs on the
validation images (segment k on what segments 1..k-1 made of them), and the largest magnitude
each tensor reached is written in the table format ONNX Runtime's TensorRT provider reads.
The tables go into the bundle (:meth:`~offramp.model.bundle.Bundle.int8_table`); a worker with
``OFFRAMP_WORKER_TRT_PRECISION=int8`` copies each into its engine's cache folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    create_calibrator,
    write_calibration_table,
)

from offramp.ml.data import Split
from offramp.model.bundle import Bundle
from offramp.model.inputs import normalise
from offramp.model.sessions import SegmentRunner


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # untyped base
    def __init__(self, name: str, batches: Iterator[np.ndarray]) -> None:
        self.name, self.batches = name, batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.batches, None)
        return None if x is None else {self.name: x}


def write_int8_tables(bundle: Bundle, split: Split, samples: int = 512,
                      batch: int = 64) -> list[Path]:
    """Measure every segment's tensor ranges on (up to) ``samples`` images of ``split`` and
    write its table into the bundle; records what was used in the manifest."""
    x = normalise(split.images[:samples], bundle.manifest.input)
    count = len(x)
    bundle.int8_table(1).parent.mkdir(exist_ok=True)
    written = []
    for spec in bundle.manifest.segments:
        with tempfile.TemporaryDirectory() as tmp:
            calibrator = create_calibrator(bundle.path(spec.file),
                                           augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                           calibrate_method=CalibrationMethod.MinMax,
                                           providers=["CPUExecutionProvider"])
            calibrator.collect_data(_Batches(spec.input.name, (x[i:i + batch] for i in
                                                               range(0, len(x), batch))))
            write_calibration_table(dict(calibrator.compute_data().items()), dir=tmp)
            target = bundle.int8_table(spec.index)
            shutil.copyfile(Path(tmp) / "calibration.flatbuffers", target)
            written.append(target)
        if spec.activation is not None:  # what the next segment is calibrated on
            runner = SegmentRunner(bundle, spec.index, threads=0)
            parts = [runner.run(x[i:i + batch]).activation for i in range(0, len(x), batch)]
            x = np.concatenate([p for p in parts if p is not None])
    bundle.manifest.metrics["int8_calibration"] = {"samples": count, "split": "validation",
                                                   "method": "minmax"}
    bundle.save()
    return written
