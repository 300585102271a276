"""Training, export, calibration and compression of multi-exit models (needs the ``train`` extra:
torch, onnx, scikit-learn). Serving code never imports this package."""
