"""The analysis and synthesis transforms over large images, in tiles.

A whole-image convolution stack holds several full-size activations at once (≈ 200 MB per
megapixel for ``mbt2018-mean``) and works far outside the CPU caches: time per pixel
nearly doubled from 0.4 to 6 MP (benchmarks/codec_scaling.py). :func:`tiled` runs a
transform on overlapping tiles and keeps each tile's centre: the overlap (*halo*) covers
the stack's receptive radius (:func:`receptive_radius`), so every kept output sees exactly
the inputs it sees in the whole image and the result equals the whole-image transform up
to float rounding (the convolution kernels block the sums differently). Only stacks of
convolutions, transposed convolutions and channel-wise layers (GDN, activations) — the
Google-family ``g_a``/``g_s`` — are tiled; any other transform runs whole.
"""

from __future__ import annotations

import math

from fractions import Fraction

import torch

from torch import nn

__all__ = ["TILE", "receptive_radius", "scaled", "tiled", "windows"]

#: Tile side in latent positions (16 × 16 pixels each): measured fastest on the CPU
#: (docs/design.md, "Tiled transforms").
TILE = 16
_POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Identity)


def _pointwise(m: nn.Module) -> bool:
    return isinstance(m, _POINTWISE) or type(m).__name__ == "GDN"


def receptive_radius(transform: nn.Module) -> tuple[Fraction, Fraction] | None:
    """``(radius, scale)`` of a sequential conv stack: how far (in input positions) an
    output depends on its inputs, and output size / input size; ``None`` when the stack
    holds another kind of layer."""
    if not isinstance(transform, nn.Sequential):
        return None
    radius, scale = Fraction(0), Fraction(1)  # in input units; output units per input unit so far
    for m in transform:
        if _pointwise(m):
            continue
        if not isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) or m.dilation != (1, 1) or m.groups != 1:
            return None
        (k, _), (s, _) = m.kernel_size, m.stride
        if isinstance(m, nn.Conv2d):  # output o sees inputs s·o ± (k-1)/2
            radius += Fraction((k - 1) // 2) / scale
            scale /= s
        else:  # output o sees inputs (o ± (k-1)/2) / s
            radius += math.ceil(Fraction(k - 1, 2) / s) / scale
            scale *= s
    return radius, scale


def windows(h: int, w: int, step: int, halo: int):
    """The tiles of an ``h × w`` input: ``(rows, cols, keep_rows, keep_cols)`` per tile —
    the input window (the tile with ``halo`` around it, clipped to the input) and the
    tile's own part, in input coordinates (slices)."""
    for top in range(0, h, step):
        for left in range(0, w, step):
            yield (
                slice(max(top - halo, 0), min(top + step + halo, h)),
                slice(max(left - halo, 0), min(left + step + halo, w)),
                slice(top, min(top + step, h)),
                slice(left, min(left + step, w)),
            )


def scaled(window: slice, scale: Fraction, origin: int = 0) -> slice:
    """An input-coordinate slice as output coordinates, relative to ``origin`` (input)."""
    return slice(int((window.start - origin) * scale), int((window.stop - origin) * scale))


def tiled(transform: nn.Module, x: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """``transform(x)`` for ``x`` ``(N, C, H, W)``, computed in overlapping tiles.

    ``tile``: the tile side in *latent* positions (the smaller side of the transform). A
    transform :func:`receptive_radius` does not know, or an input of at most one tile,
    runs whole.
    """
    rr = receptive_radius(transform)
    if rr is None:
        return transform(x)
    radius, scale = rr
    unit = int(1 / scale) if scale < 1 else 1  # input positions per latent position
    step, halo = tile * unit, math.ceil(radius / unit) * unit
    h, w = x.shape[-2:]
    if h <= step and w <= step:
        return transform(x)
    out = None
    for rows, cols, keep_rows, keep_cols in windows(h, w, step, halo):
        y = transform(x[..., rows, cols])
        if out is None:
            out = y.new_empty(*y.shape[:2], int(h * scale), int(w * scale))
        out[..., scaled(keep_rows, scale), scaled(keep_cols, scale)] = y[
            ..., scaled(keep_rows, scale, rows.start), scaled(keep_cols, scale, cols.start)
        ]
    return out
