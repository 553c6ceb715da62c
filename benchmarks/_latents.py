"""Helpers of the latent-domain benchmarks (``adapted_tables``, ``latent_gain``, ``decoder_target``)."""

from __future__ import annotations

import math

from collections.abc import Iterator
from pathlib import Path

import torch

from qft.codec import HyperpriorLatentCoder, list_images, read_image
from qft.models import ARCHITECTURES, LoadedCheckpoint, load_checkpoint

from finetune_runs import base_entries  # sibling script

#: USQ steps of the reference sweep the rate changes are measured against.
USQ_STEPS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)


def finite(x: float) -> float | None:
    """``None`` for NaN (a point outside the USQ sweep's quality range): JSON has no NaN."""
    return None if math.isnan(x) else x


def top_left(x: torch.Tensor) -> torch.Tensor:
    """The top-left crop of an image batch with sides multiples of 64 (no padding to score)."""
    return x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]


def read_images(folder: str | Path, n: int) -> list[torch.Tensor]:
    """The first ``n`` images of ``folder``, :func:`top_left` cropped."""
    return [top_left(read_image(f)) for f in list_images(folder)[:n]]


def checkpoints(specs: list[str] | None) -> Iterator[tuple[str, LoadedCheckpoint, HyperpriorLatentCoder]]:
    """``(spec, checkpoint, coder)`` of each checkpoint (default: the shipped base models),
    the model in eval mode."""
    for spec in specs or [Path(e["file"]).stem for e in base_entries()]:
        ck = load_checkpoint(spec)
        yield spec, ck, HyperpriorLatentCoder(ck.model.eval(), ARCHITECTURES[ck.arch].entropy)


def analyse(coder: HyperpriorLatentCoder, images: list[torch.Tensor]) -> list[tuple]:
    """``(x, y, μ, σ, ẑ bits)`` per image (numpy ``(C, h, w)`` latents)."""
    out = []
    for x in images:
        y, mu, sigma, _, _, z_bits = coder.analyse(x)
        out.append((x, y[0], mu[0], sigma[0], float(z_bits[0])))
    return out
