"""The training commands and what each is for, without importing torch: ``offramp --help``
lists them, and only the command that runs loads the training stack."""

from __future__ import annotations

COMMANDS = {
    "build": "train, export and calibrate a recipe into a model bundle",
    "train": "train a recipe's model jointly (optionally the ablation)",
    "models": "the model zoo: options, exit points, FLOPs and activation bytes per cut",
    "datasets": "the datasets and where each is looked for",
    "export": "export a trained model.pt to a bundle of K segments",
    "calibrate": "calibrate a bundle and choose thresholds",
    "compress": "train cut autoencoders and compare wire codecs",
    "import": "split any ONNX image classifier into segments and train exits on it",
}
