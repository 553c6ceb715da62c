"""Building blocks shared by several model families: Swin window attention (TCM, DCAE)
and the checkerboard layout (MLIC++'s coding, and qft's checkerboard coding steps of
MLIC++ and ELIC in :mod:`qft.codec.checkerboard`).

One home for what the families' transforms have in common; blocks that only one family
uses stay in its module.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from torch import Tensor, nn

__all__ = [
    "WindowAttention",
    "checkerboard_mask",
    "scatter_checkerboard",
    "squeeze_checkerboard",
    "unsqueeze_checkerboard",
]


# ---------------------------------------------------------------------------- checkerboard
#
# A checkerboard half is the set of positions whose ``(row + col) % 2`` is its *parity*.
# Squeezed, it is ``(…, H, W/2)``: row ``r`` holds the half's elements of row ``r``, left to
# right (columns ``(r + parity) % 2, +2, …``), the order of the official MLIC++ stream and
# of CompressAI's ``CheckerboardLatentCodec.unembed``. The functions take torch tensors and
# numpy arrays alike.


def _half_columns(parity: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(rows, columns)`` of the half of ``parity`` on even and on odd rows."""
    if parity not in (0, 1):
        raise ValueError(f"checkerboard parity must be 0 or 1, got {parity!r}")
    return (slice(0, None, 2), slice(parity, None, 2)), (slice(1, None, 2), slice(1 - parity, None, 2))


def checkerboard_mask(height: int, width: int, parity: int, device: torch.device | None = None) -> Tensor:
    """``(height, width)`` bool, true where ``(row + col) % 2 == parity``."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (rows + cols) % 2 == parity


def squeeze_checkerboard(x, parity: int):
    """``(…, H, W) -> (…, H, W/2)``: the half of ``parity``, each row left to right.
    ``W`` must be even."""
    if x.shape[-1] % 2:
        raise ValueError(f"a checkerboard half needs an even width, got {x.shape[-1]}")
    shape = (*x.shape[:-1], x.shape[-1] // 2)
    out = np.empty(shape, x.dtype) if isinstance(x, np.ndarray) else x.new_empty(shape)
    for rows, cols in _half_columns(parity):
        out[..., rows, :] = x[..., rows, cols]
    return out


def scatter_checkerboard(out, half, parity: int) -> None:
    """Writes a squeezed half ``(…, H, W/2)`` into the positions of ``parity`` of ``out``
    ``(…, H, W)`` (inverse of :func:`squeeze_checkerboard`); the other half is untouched."""
    for rows, cols in _half_columns(parity):
        out[..., rows, cols] = half[..., rows, :]


def unsqueeze_checkerboard(x, parity: int):
    """Inverse of :func:`squeeze_checkerboard`, zeros at the other half's positions."""
    shape = (*x.shape[:-1], 2 * x.shape[-1])
    out = np.zeros(shape, x.dtype) if isinstance(x, np.ndarray) else x.new_zeros(shape)
    scatter_checkerboard(out, x, parity)
    return out


class WindowAttention(nn.Module):
    """Multi-head self-attention within ``window × window`` windows, shifted by half a
    window when ``shifted`` (Swin: cyclic roll, masked across the wrap), with a learned
    relative-position bias per head (``relative_position_params``, the official key).

    Input and output ``(B, H, W, C)``. Sides that are not multiples of the window are
    padded (zeros, bottom/right); padded positions are never attended to by real ones, and
    the output is cropped back. On sides that are multiples of the window, the operations
    are the official TCM/DCAE ones, in the official order (``einsum``s, scale after the
    product, bias, ``-inf`` mask, softmax), so outputs are bitwise theirs.
    """

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not a multiple of the head width {head_dim}")
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.window = window
        self.shifted = shifted
        self.scale = head_dim**-0.5
        self.embedding_layer = nn.Linear(dim, 3 * dim)
        self.relative_position_params = nn.Parameter(torch.empty(self.heads, 2 * window - 1, 2 * window - 1))
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(dim, dim)
        cells = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), -1)
        cells = cells.reshape(-1, 2)  # (row, column) of each position in a window, row-major
        self.register_buffer("relative_index", cells[:, None] - cells[None, :] + window - 1, persistent=False)

    def relative_bias(self) -> Tensor:
        """``(heads, window², window²)``: the bias of each (query, key) pair of a window."""
        return self.relative_position_params[:, self.relative_index[..., 0], self.relative_index[..., 1]]

    def windows(self, x: Tensor) -> Tensor:
        """``(B, H, W, C)`` -> ``(B, windows, window², C)``, windows row-major (``H`` and
        ``W`` multiples of the window)."""
        b, height, width, c = x.shape
        p = self.window
        x = x.reshape(b, height // p, p, width // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (height // p) * (width // p), p * p, c)

    def mask(self, height: int, width: int, device: torch.device) -> Tensor | None:
        """``(windows, window², window²)``, true where a query may not attend to a key, for
        a ``height × width`` map: across the wrap of a shifted window (the two or four
        regions of a window that wraps around the map's edge are not neighbours in the
        image), and from a real position to a padded one; ``None`` when nothing is masked."""
        p = self.window
        padded_h, padded_w = height + -height % p, width + -width % p
        rows, cols = padded_h // p, padded_w // p
        mask = None
        if self.shifted:
            s = p - p // 2
            wrap = torch.zeros(rows, cols, p, p, p, p, dtype=torch.bool, device=device)
            wrap[-1, :, :s, :, s:, :] = True
            wrap[-1, :, s:, :, :s, :] = True
            wrap[:, -1, :, :s, :, s:] = True
            wrap[:, -1, :, s:, :, :s] = True
            mask = wrap.reshape(rows * cols, p * p, p * p)
        if (padded_h, padded_w) != (height, width):
            real = torch.zeros(1, padded_h, padded_w, 1, dtype=torch.bool, device=device)
            real[:, :height, :width] = True
            if self.shifted:
                real = torch.roll(real, shifts=(-(p // 2), -(p // 2)), dims=(1, 2))
            real = self.windows(real)[0, :, :, 0]
            padded_key = real[:, :, None] & ~real[:, None, :]
            mask = padded_key if mask is None else mask | padded_key
        return mask

    def forward(self, x: Tensor) -> Tensor:
        p, shift = self.window, self.window // 2
        b, height, width, c = x.shape
        pad_h, pad_w = -height % p, -width % p
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if self.shifted:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        rows, cols = (height + pad_h) // p, (width + pad_w) // p
        x = self.windows(x)
        qkv = self.embedding_layer(x)
        qkv = qkv.reshape(b, rows * cols, p * p, 3 * self.heads, self.head_dim).permute(3, 0, 1, 2, 4)
        q, k, v = qkv.chunk(3, dim=0)
        sim = torch.einsum("hbwpc,hbwqc->hbwpq", q, k) * self.scale
        sim = sim + self.relative_bias()[:, None, None]
        mask = self.mask(height, width, x.device)
        if mask is not None:
            sim = sim.masked_fill_(mask, float("-inf"))
        probs = F.softmax(sim, dim=-1)
        out = torch.einsum("hbwij,hbwjc->hbwic", probs, v)
        out = out.permute(1, 2, 3, 0, 4).reshape(b, rows * cols, p * p, c)
        out = self.linear(out)
        out = out.reshape(b, rows, cols, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, rows * p, cols * p, c)
        if self.shifted:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out[:, :height, :width] if pad_h or pad_w else out
