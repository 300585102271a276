"""Serving-side model code: bundles, ONNX Runtime sessions, inputs and images, exit scores and
calibration curves. Never imports torch."""
