"""Training data: images preloaded once as uint8 arrays, batches drawn per step.

The batch of step ``s`` depends only on ``(seed, s)``: image choice, crop position and
flips come from ``numpy.random.default_rng([seed, s])``. Nothing about the data pipeline
has to be saved in a checkpoint for a resumed run to see the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from qft.codec.image import list_images, read_rgb
from qft.errors import UserError

__all__ = [
    "load_images",
    "sample_batch",
    "center_crops",
]


def load_images(root: str | Path, splits: Sequence[str], limit: int | None = None) -> list[np.ndarray]:
    """Decode the images of ``root/<split>/`` for each split into RGB uint8 HxWx3 arrays
    (:func:`qft.codec.read_rgb`: a conversion to RGB is announced with a warning).

    Args:
        root: dataset folder (e.g. ``../shared/data/bsds500``).
        splits: sub-folders to read, in order.
        limit: keep only the first ``limit`` images (after concatenating the splits).
    """
    files = [f for s in splits for f in list_images(Path(root) / s, recursive=False)]
    if limit is not None:
        files = files[:limit]
    return [read_rgb(f) for f in files]


def _to_tensor(patches: list[np.ndarray]) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 patches as a contiguous ``(N, 3, H, W)`` float batch. Not the
    channels-last view the permute gives: on it TCM's transformer blocks corrupt the heap
    in torch 2.14's CPU backward (a crash in the first step; contiguous input is fine)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(patches)))
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def sample_batch(images: Sequence[np.ndarray], seed: int, step: int, batch_size: int, crop: int) -> torch.Tensor:
    """The training batch of ``step``: random crops with random horizontal and vertical
    flips, as a float tensor ``[batch_size, 3, crop, crop]`` in [0, 1].

    Fully determined by ``(seed, step)``.
    """
    rng = np.random.default_rng([seed, step])
    patches = []
    for i in rng.integers(len(images), size=batch_size):
        img = images[i]
        h, w = img.shape[:2]
        if h < crop or w < crop:
            raise UserError(f"training image of {w}x{h} pixels is smaller than the {crop}-pixel crop")
        top, left = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
        p = img[top : top + crop, left : left + crop]
        if rng.random() < 0.5:
            p = p[:, ::-1]
        if rng.random() < 0.5:
            p = p[::-1]
        patches.append(p)
    return _to_tensor(patches)


def center_crops(images: Sequence[np.ndarray], crop: int) -> torch.Tensor:
    """Centre ``crop``x``crop`` crops of all ``images`` as one float batch (validation)."""
    patches = []
    for img in images:
        h, w = img.shape[:2]
        if h < crop or w < crop:
            raise UserError(f"validation image of {w}x{h} pixels is smaller than the {crop}-pixel crop")
        top, left = (h - crop) // 2, (w - crop) // 2
        patches.append(img[top : top + crop, left : left + crop])
    return _to_tensor(patches)
