"""Helpers of the latent-domain benchmarks (``adapted_tables``, ``latent_gain``, ``decoder_target``)."""

from __future__ import annotations

import math

import torch

from qft.codec import HyperpriorLatentCoder


def finite(x: float) -> float | None:
    """``None`` for NaN (a point outside the USQ sweep's quality range): JSON has no NaN."""
    return None if math.isnan(x) else x


def top_left(x: torch.Tensor) -> torch.Tensor:
    """The top-left crop of an image batch with sides multiples of 64 (no padding to score)."""
    return x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]


def analyse(coder: HyperpriorLatentCoder, images: list[torch.Tensor]) -> list[tuple]:
    """``(x, y, μ, σ, ẑ bits)`` per image (numpy ``(C, h, w)`` latents)."""
    out = []
    for x in images:
        y, mu, sigma, _, _, z_bits = coder.analyse(x)
        out.append((x, y[0], mu[0], sigma[0], float(z_bits[0])))
    return out
