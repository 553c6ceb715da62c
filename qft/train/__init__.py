"""Training of the reference models (``qft train``).

- :mod:`qft.train.recipe`: YAML recipes, validated into :class:`Recipe`.
- :mod:`qft.train.data`: preloaded images and per-step deterministic batches.
- :mod:`qft.train.scaffold`: what every training loop shares (resume, log, progress,
  atomic saves, summary), used by ``qft train`` and ``qft finetune``.
- :mod:`qft.train.loop`: CompressAI's standard rate-distortion training, exact resume.
- :mod:`qft.train.checkpoint`: atomic training checkpoints, fp16 export for shipping.
"""

from qft.train.checkpoint import (
    export_state_dict,
    load_training_state,
    save_atomic,
    sha256_file,
)
from qft.train.loop import build_model, rd_forward, train, train_point
from qft.train.recipe import RatePoint, Recipe, lambda_tag, load_recipe
from qft.train.scaffold import resolve_device

__all__ = [
    "Recipe",
    "RatePoint",
    "load_recipe",
    "lambda_tag",
    "build_model",
    "rd_forward",
    "resolve_device",
    "train",
    "train_point",
    "save_atomic",
    "load_training_state",
    "export_state_dict",
    "sha256_file",
]
