"""Checkpoint files: atomic writes, safe loading, fp16 export for shipping.

A *training checkpoint* is a dict of plain tensors, numbers, strings, lists and dicts
(model and both optimizer states, step, recipe, timings), so it loads with
``torch.load(path, weights_only=True)``. An *exported model* is a plain CompressAI
state_dict after ``update(force=True)`` with its parameters in fp16 and its buffers
(CDF tables, bounds) unchanged; ``MeanScaleHyperprior.from_state_dict`` loads it.
"""

from __future__ import annotations

import copy
import hashlib

from pathlib import Path
from typing import Any

import torch

from compressai.models import CompressionModel

from qft.errors import UserError
from qft.files import atomic_write

__all__ = [
    "save_atomic",
    "load_training_state",
    "export_state_dict",
    "sha256_file",
    "CHECKPOINT_FORMAT",
]

#: ``format`` field of training checkpoints written by this version
CHECKPOINT_FORMAT = "qft-train/1"


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`qft.files.atomic_write`: a reader (or a crash) never
    sees a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` and check its format."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # unpickling errors have many types
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a qft training checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


@torch.no_grad()
def export_state_dict(model: CompressionModel) -> dict[str, torch.Tensor]:
    """The model's state_dict for shipping.

    Floating-point parameters are cast to fp16; buffers are kept as they are (integer CDF
    tables; float bounds such as GDN's 2^-36 pedestal, which fp16 would flush to zero).
    The EntropyBottleneck quantiles (median and tails of each z channel's learned
    density, which the aux optimizer only approaches slowly) are first solved exactly by
    CompressAI's bisection, ``update(force=True, update_quantiles=True)``; the CDF
    tables are then rebuilt from the fp16-rounded parameters, so the file is
    self-consistent and a plain ``update(force=True)`` reproduces it. ``model`` itself
    is not modified. Loading casts the parameters back to the model's dtype.
    """
    model = copy.deepcopy(model).to("cpu", torch.float32)
    model.update(force=True, update_quantiles=True)
    for p in model.parameters():
        p.copy_(p.half().float())
    model.update(force=True)
    params = {name for name, _ in model.named_parameters()}
    return {
        k: (v.detach().half() if k in params and v.is_floating_point() else v.detach().clone())
        for k, v in model.state_dict().items()
    }


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
