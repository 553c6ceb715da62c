"""Builders shared by the finetuning tests (``test_finetune``, ``test_ship``,
``test_finetune_slices``): synthetic training images, a tiny hyperprior base checkpoint and
a finetuning recipe. Not a test module: the tests import it as a sibling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from PIL import Image

from qft.models import create_model, save_checkpoint
from qft.settings import DEFAULT_LAMBDA_MULT

#: the training λ every tiny base checkpoint records
LAMBDA = 0.01


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Uniform-noise RGB PNGs ``0.png, 1.png, …`` of the given ``(height, width)`` in
    ``folder`` (created), drawn in order from one generator of seed 0; returns ``folder``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def tiny_base(path: Path) -> Path:
    """A tiny ``mbt2018-mean`` (N 16, M 24, seed 0) whose latents span a few quantization
    steps (``g_a``'s last convolution × 20), saved at ``path`` with λ :data:`LAMBDA`."""
    model = create_model("mbt2018-mean", N=16, M=24, seed=0)
    with torch.no_grad():
        model.g_a[-1].weight.mul_(20)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, "mbt2018-mean", {"N": 16, "M": 24}, extra={"lambda": LAMBDA})
    return path


def write_recipe(path: Path, checkpoint: Path, data_root: Path, steps: int, **quantizer: Any) -> dict[str, Any]:
    """Write a finetuning recipe at ``path``: the decoder of ``checkpoint`` for ``steps``
    steps on ``data_root/train`` (batches of 2 crops of 64, one thread, seed 1, a
    checkpoint every 2 steps), TCQ-8 at the default λ multiplier with automatic weights
    unless ``quantizer`` fields say otherwise; returns the recipe as written."""
    recipe = {
        "checkpoint": str(checkpoint),
        "arch": None,
        "lambda": None,
        "parts": "decoder",
        "requantize_every": 0,
        "quantizer": {
            "method": "tcq8",
            "step": None,
            "lambda_t": None,
            "lambda_mult": DEFAULT_LAMBDA_MULT,
            "reset": "channel",
            "weights": "auto",
            **quantizer,
        },
        "seed": 1,
        "threads": 1,
        "device": "cpu",
        "batch_size": 2,
        "crop": 64,
        "steps": steps,
        "optimizer": {"lr": 1e-3, "clip_max_norm": 1.0},
        "data": {"root": str(data_root), "train": ["train"]},
        "checkpoint_every": 2,
        "log_every": 1,
    }
    path.write_text(yaml.safe_dump(recipe))
    return recipe
