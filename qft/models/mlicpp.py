"""MLIC++ (Jiang & Wang 2023, "MLIC++: Linear complexity multi-reference entropy modeling
for learned image compression"), with the state_dict layout of the official
``MLICPlusPlus`` (JiangWeibeta/MLIC, ``MLIC++/models/mlicpp.py``).

The latent ``y`` (``M`` channels) is split into ``slice_num`` equal slices, and each slice
into two checkerboard halves: **anchors at (row + col) odd** (``[0::2, 1::2]`` and
``[1::2, 0::2]``, the opposite of ELIC's), then non-anchors. That makes
``2 · slice_num`` coding steps, in the order s0-anchor, s0-nonanchor, s1-anchor, …::

    hyper, hyper_means = h_s(ẑ), h_s(ẑ).chunk(2)[1]          (640 channels; scales first)
    slice i, anchors:
        gI, cc = global_inter_context[i](ŷ_<i), channel_context[i](ŷ_<i)      (i > 0)
        σ, μ   = entropy_parameters_anchor[i](cat[gI, cc, hyper]).chunk(2)   (hyper only at i = 0)
        â      = (round(a − μ) + μ)  at anchors, 0 elsewhere
        â     += anchors · lrp_anchor[i](cat[hyper_means, ŷ_<i, â])          (0.5·tanh inside)
    slice i, non-anchors:
        lc     = local_context[i](â)           (masked 5×5 window attention over the anchors)
        gA     = global_intra_context[i](ŷ_{i−1}, â)                          (i > 0)
        σ, μ   = entropy_parameters_nonanchor[i](cat[lc, gA, gI, cc, hyper]).chunk(2)
        n̂      = (round(n − μ) + μ)  at non-anchors, 0 elsewhere
        n̂     += non-anchors · lrp_nonanchor[i](cat[hyper_means, ŷ_<i, â + n̂])
        ŷ_i    = â + n̂

Every context reads final (LRP-corrected) values only, so the decoder repeats the
encoder's ``μ, σ`` from the decoded symbols.

Two official weight generations share the key names and differ in shapes: the 2024-04
weights (``generation="2024-04"``: a 3-conv LRP ``in → 224 → 128 → 32``, ``g_s`` opening
with ``ResidualBlock(M, M)``) and the 2023-09 ones (``"2023-09"``: the 4-conv LRP ramp of
``LatentResidualPredictionOld``, ``g_s`` opening with ``ResidualBlock(M, N)`` and a skip
conv). :func:`infer_mlicpp_params` tells them apart from the shapes.

Streams are the official ones (one ``BufferedRansEncoder`` per image; each half's symbols
appended in the squeezed ``(C, H, W/2)`` layout of
:func:`qft.models.layers.squeeze_checkerboard`, in coding
order), coded on whatever device the model is on, the CPU included::

    compress(x)  -> {"strings": [[y_string per image], z_strings], "shape": (zh, zw)}
    decompress(strings, shape) -> {"x_hat": x̂ clamped to [0, 1]}

``y`` is ``4×`` the size of ``z``; the decoder derives it from ``shape``, so images must be
padded to a multiple of 64 (:func:`qft.codec.pad` does).

The transforms' residual blocks are the official ones: CompressAI's block structure with
GELU in place of LeakyReLU, and a GELU after the second convolution of the plain block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN, conv1x1, conv3x3, subpel_conv3x3
from compressai.models import CompressionModel
from compressai.ops import quantize_ste
from torch import Tensor, nn

from qft.errors import UserError

from .layers import checkerboard_mask, squeeze_checkerboard, unsqueeze_checkerboard
from .registry import Architecture, register_architecture
from .slices import check_coding_size, check_positive_ints, count_indices, gaussian_tables

__all__ = [
    "MLICPlusPlus",
    "LocalContext",
    "LinearGlobalInterContext",
    "LinearGlobalIntraContext",
    "ANCHOR_PARITY",
    "anchor_mask",
    "half_parity",
    "infer_mlicpp_params",
    "complete_mlicpp_params",
    "GENERATIONS",
]

#: checkerboard parity of the anchors: ``(row + col)`` odd (ELIC's are even)
ANCHOR_PARITY = 1
#: the official weight generations, newest first
GENERATIONS = ("2024-04", "2023-09")
#: side of the local-context attention window (the official ``LocalContext`` default)
_WINDOW = 5
#: heads of the local context and of the global intra context (official defaults)
_LOCAL_HEADS = 2


# ---------------------------------------------------------------------------- checkerboard


def anchor_mask(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """``(height, width)`` bool, true at the anchors: ``(row + col)`` odd."""
    return checkerboard_mask(height, width, ANCHOR_PARITY, device)


def half_parity(anchors: bool) -> int:
    """The checkerboard parity (:func:`qft.models.layers.checkerboard_mask`) of the anchors
    (``anchors``) or of the non-anchors."""
    return ANCHOR_PARITY if anchors else 1 - ANCHOR_PARITY


def _keep(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` at ``mask``, exact zeros elsewhere."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------- transforms


class ResidualBlockWithStride(nn.Module):
    """Strided 3×3 conv, GELU, 3×3 conv, GDN, plus a strided 1×1 skip (official block)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride=stride)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.gdn = GDN(out_ch)
        self.skip = conv1x1(in_ch, out_ch, stride=stride) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.skip is None else self.skip(x)
        return self.gdn(self.conv2(self.act(self.conv1(x)))) + identity


class ResidualBlock(nn.Module):
    """3×3 conv, GELU, 3×3 conv, GELU, plus the input (through a 1×1 conv when the widths
    differ)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.act = nn.GELU()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = conv1x1(in_ch, out_ch) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.skip is None else self.skip(x)
        return self.act(self.conv2(self.act(self.conv1(x)))) + identity


class ResidualBlockUpsample(nn.Module):
    """Sub-pixel 3×3 conv (×2), GELU, 3×3 conv, inverse GDN, plus a sub-pixel skip."""

    def __init__(self, in_ch: int, out_ch: int, upsample: int = 2):
        super().__init__()
        self.subpel_conv = subpel_conv3x3(in_ch, out_ch, upsample)
        self.act = nn.GELU()
        self.conv = conv3x3(out_ch, out_ch)
        self.igdn = GDN(out_ch, inverse=True)
        self.upsample = subpel_conv3x3(in_ch, out_ch, upsample)

    def forward(self, x: Tensor) -> Tensor:
        return self.igdn(self.conv(self.act(self.subpel_conv(x)))) + self.upsample(x)


class AnalysisTransform(nn.Module):
    def __init__(self, N: int, M: int):
        super().__init__()
        self.analysis_transform = nn.Sequential(
            ResidualBlockWithStride(3, N),
            ResidualBlock(N, N),
            ResidualBlockWithStride(N, N),
            ResidualBlock(N, N),
            ResidualBlockWithStride(N, N),
            ResidualBlock(N, N),
            conv3x3(N, M, stride=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.analysis_transform(x)


class SynthesisTransform(nn.Module):
    """``first`` is the width after the opening residual block: ``M`` (2024-04 weights)
    or ``N`` (2023-09)."""

    def __init__(self, N: int, M: int, first: int):
        super().__init__()
        self.synthesis_transform = nn.Sequential(
            ResidualBlock(M, first),
            ResidualBlockUpsample(first, N),
            ResidualBlock(N, N),
            ResidualBlockUpsample(N, N),
            ResidualBlock(N, N),
            ResidualBlockUpsample(N, N),
            ResidualBlock(N, N),
            subpel_conv3x3(N, 3, 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.synthesis_transform(x)


class HyperAnalysis(nn.Module):
    def __init__(self, N: int, M: int):
        super().__init__()
        self.reduction = nn.Sequential(
            conv3x3(M, N),
            nn.GELU(),
            conv3x3(N, N),
            nn.GELU(),
            conv3x3(N, N, stride=2),
            nn.GELU(),
            conv3x3(N, N),
            nn.GELU(),
            conv3x3(N, N, stride=2),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.reduction(x)


class HyperSynthesis(nn.Module):
    """``ẑ`` (``N`` channels) to ``2M`` channels: the scales, then the means."""

    def __init__(self, N: int, M: int):
        super().__init__()
        wide = M * 3 // 2
        self.increase = nn.Sequential(
            conv3x3(N, M),
            nn.GELU(),
            subpel_conv3x3(M, M, 2),
            nn.GELU(),
            conv3x3(M, wide),
            nn.GELU(),
            subpel_conv3x3(wide, wide, 2),
            nn.GELU(),
            conv3x3(wide, 2 * M),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.increase(x)


def _gelu_stack(make, widths: Sequence[int]) -> nn.Sequential:
    """``make(in, out)`` layers through ``widths`` with a GELU between consecutive ones."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        if k:
            layers.append(nn.GELU())
        layers.append(make(a, b))
    return nn.Sequential(*layers)


class EntropyParameters(nn.Module):
    """1×1 convs ``in → hidden… → out`` with GELUs (the official ``EntropyParameters``)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        self.fusion = _gelu_stack(lambda a, b: nn.Conv2d(a, b, 1), [in_dim, *hidden, out_dim])

    def forward(self, x: Tensor) -> Tensor:
        return self.fusion(x)


class ChannelContext(nn.Module):
    """3×3 convs ``in → hidden… → out`` with GELUs over the earlier slices (the official
    attribute is spelled ``fushion``)."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        self.fushion = _gelu_stack(lambda a, b: nn.Conv2d(a, b, 3, padding=1), [in_dim, *hidden, out_dim])

    def forward(self, x: Tensor) -> Tensor:
        return self.fushion(x)


class LatentResidualPrediction(nn.Module):
    """``0.5·tanh`` of 3×3 convs ``in → hidden… → out`` with GELUs."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int):
        super().__init__()
        self.lrp_transform = _gelu_stack(lambda a, b: conv3x3(a, b), [in_dim, *hidden, out_dim])

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * torch.tanh(self.lrp_transform(x))


def old_lrp_hidden(in_dim: int, out_dim: int) -> list[int]:
    """Hidden widths of the 2023-09 LRP: ``in`` ramped towards ``out`` in quarters."""
    diff = abs(out_dim - in_dim)
    return [in_dim - diff // 4, in_dim - diff // 2, in_dim - diff * 3 // 4]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------- contexts


def _relative_position_index(window: int) -> Tensor:
    """``(window², window²)`` int64: the row of ``relative_position_table`` of each
    (query, key) pair of a window, ``(Δrow + w − 1)·(2w − 1) + Δcol + w − 1``."""
    cells = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (cells[:, :, None] - cells[:, None, :]).permute(1, 2, 0) + window - 1
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class LocalContext(nn.Module):
    """Masked window attention over the anchors of a slice: every position attends to the
    anchors in the ``5 × 5`` window around it (other positions, and those outside the
    map, get a ``−100`` logit), then a ``5 × 5`` conv fuses the window to ``2·dim``
    channels, a linear projection and a residual MLP follow.

    Input ``(B, dim, H, W)`` (the LRP-corrected anchors, zeros at non-anchors), output
    ``(B, 2·dim, H, W)``; the official operations in the official order.
    """

    def __init__(self, dim: int, window: int = _WINDOW, heads: int = _LOCAL_HEADS, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"local context: {dim} channels do not split into {heads} heads")
        self.dim, self.window, self.heads = dim, window, heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.relative_position_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_table, std=0.02)
        self.proj = nn.Linear(2 * dim, 2 * dim)
        self.mlp = Mlp(2 * dim, int(2 * dim * mlp_ratio), 2 * dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(2 * dim)
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.fusion = nn.Conv2d(dim, 2 * dim, kernel_size=window)

    def unfold(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, H·W, C, w, w)``: the zero-padded window around each position."""
        b, c, h, w = x.shape
        p = self.window
        return F.unfold(x, p, padding=(p - 1) // 2).transpose(1, 2).reshape(b, h * w, c, p, p)

    def mask(self, height: int, width: int, device: torch.device) -> Tensor:
        """``(H·W, w², w²)``: ``0`` where query and key are both anchors, ``−100`` elsewhere."""
        anchors = anchor_mask(height, width, device).float()[None, None]
        cells = self.unfold(anchors).reshape(height * width, -1, 1)
        both = cells @ cells.transpose(1, 2)
        return torch.where(both == 0, torch.tensor(-100.0, device=device), torch.tensor(0.0, device=device))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        length, p2 = h * w, self.window**2
        tokens = self.norm1(x.reshape(b, c, length).transpose(1, 2))
        qkv = self.qkv_proj(tokens).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2)
        windows = self.unfold(torch.cat([qkv[0], qkv[1], qkv[2]], dim=1))  # (B, L, 3C, w, w)
        windows = windows.reshape(b, length, 3, c, p2).permute(2, 0, 1, 3, 4)
        # heads interleave over the channels: channel = d·heads + head
        q, k, v = (t.reshape(b, length, self.head_dim, self.heads, p2).permute(0, 1, 3, 4, 2) for t in windows)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_table[self.relative_position_index.reshape(-1)].reshape(p2, p2, -1)
        attn = attn + bias.permute(2, 0, 1)[None, None]
        attn = attn + self.mask(h, w, x.device)[None, :, None]
        out = attn.softmax(dim=-1) @ v  # (B, L, heads, w², head_dim)
        p = self.window
        out = out.reshape(b, length, self.heads, p, p, self.head_dim).permute(0, 1, 3, 4, 2, 5)
        out = out.reshape(b * length, p, p, c).permute(0, 3, 1, 2)
        out = self.proj(self.fusion(out).reshape(b, length, 2 * c))
        out = out + self.mlp(self.norm2(out))
        return out.transpose(1, 2).reshape(b, 2 * c, h, w)


def _qkv_branch(dim: int) -> nn.Sequential:
    """1×1 conv, then a depthwise 3×3 conv."""
    return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 3, padding=1, groups=dim))


def _linear_attention(queries: Tensor, keys: Tensor, values: Tensor, heads: int) -> Tensor:
    """Efficient (linear) attention per head on ``(B, dim, L)``: keys softmaxed over
    positions, queries over channels, ``(keysᵀ values)ᵀ queries``; heads are consecutive
    channel blocks. Returns ``(B, dim, L)``."""
    head_dim = queries.shape[1] // heads
    out = []
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        key = keys[:, part].softmax(dim=2)
        query = queries[:, part].softmax(dim=1)
        context = key @ values[:, part].transpose(1, 2)
        out.append(context.transpose(1, 2) @ query)
    return torch.cat(out, dim=1)


def inter_heads(dim: int) -> int:
    """Heads of the global inter context over ``dim`` channels: the official
    ``dim // 32`` (32-channel heads), or 1 where that is 0 or does not divide ``dim``
    (only at widths the official model cannot be built at)."""
    heads = dim // 32
    return heads if heads and dim % heads == 0 else 1


class LinearGlobalInterContext(nn.Module):
    """Linear attention over all positions of the earlier slices ``ŷ_<i`` (``dim``
    channels), to ``out_dim`` channels: a 5×5 reprojection to ``1.5·out_dim``, then a
    1×1 skip plus a depthwise MLP."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dim, self.heads = dim, inter_heads(dim)
        self.keys, self.queries, self.values = _qkv_branch(dim), _qkv_branch(dim), _qkv_branch(dim)
        mid = out_dim * 3 // 2
        self.reprojection = nn.Conv2d(dim, mid, 5, padding=2)
        self.mlp = nn.Sequential(
            nn.Conv2d(mid, 2 * out_dim, 1),
            nn.GELU(),
            nn.Conv2d(2 * out_dim, 2 * out_dim, 3, padding=1, groups=2 * out_dim),
            nn.GELU(),
            nn.Conv2d(2 * out_dim, out_dim, 1),
        )
        self.skip = nn.Conv2d(mid, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        flat = [branch(x).reshape(b, self.dim, h * w) for branch in (self.queries, self.keys, self.values)]
        attention = self.reprojection(_linear_attention(*flat, self.heads).reshape(b, self.dim, h, w))
        return self.skip(attention) + self.mlp(attention)


class LinearGlobalIntraContext(nn.Module):
    """Linear attention from the non-anchors to the anchors, with the attention map taken
    from the previous slice ``ŷ_{i−1}`` (queries at its non-anchors, keys at its anchors)
    and the values from the current slice's anchors ``â``. Output ``2·dim`` channels at
    the non-anchor positions' map (``(B, 2·dim, H, W)``)."""

    def __init__(self, dim: int, heads: int = _LOCAL_HEADS):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.keys, self.queries, self.values = _qkv_branch(dim), _qkv_branch(dim), _qkv_branch(dim)
        self.reprojection = nn.Conv2d(dim, 2 * dim, 5, padding=2)
        self.mlp = nn.Sequential(
            nn.Conv2d(2 * dim, 4 * dim, 1),
            nn.GELU(),
            nn.Conv2d(4 * dim, 4 * dim, 3, padding=1, groups=4 * dim),
            nn.GELU(),
            nn.Conv2d(4 * dim, 2 * dim, 1),
        )

    def forward(self, previous: Tensor, anchors_hat: Tensor) -> Tensor:
        b, c, h, w = previous.shape
        anchors = anchor_mask(h, w, previous.device)
        a, n = half_parity(True), half_parity(False)
        queries = squeeze_checkerboard(self.queries(_keep(previous, ~anchors)), n).reshape(b, c, -1)
        keys = squeeze_checkerboard(self.keys(_keep(previous, anchors)), a).reshape(b, c, -1)
        values = squeeze_checkerboard(self.values(anchors_hat), a).reshape(b, c, -1)
        head_dim = c // self.heads
        out = []
        for k in range(self.heads):
            part = slice(k * head_dim, (k + 1) * head_dim)
            key = unsqueeze_checkerboard(keys[:, part].softmax(dim=2).reshape(b, head_dim, h, w // 2), a)
            value = unsqueeze_checkerboard(values[:, part].reshape(b, head_dim, h, w // 2), a)
            query = unsqueeze_checkerboard(queries[:, part].softmax(dim=1).reshape(b, head_dim, h, w // 2), n)
            context = key.reshape(b, head_dim, -1) @ value.reshape(b, head_dim, -1).transpose(1, 2)
            out.append((context.transpose(1, 2) @ query.reshape(b, head_dim, -1)).reshape(b, head_dim, h, w))
        attention = self.reprojection(torch.cat(out, dim=1))
        return attention + self.mlp(attention)


# ---------------------------------------------------------------------------- model


class MLICPlusPlus(CompressionModel):
    """MLIC++ with the official state_dict layout of either weight generation; see the
    module doc for the coding steps and streams. The steps are public
    (:meth:`hyper_context`, :meth:`anchor_parameters`, :meth:`nonanchor_parameters`,
    :meth:`lrp`), so other coders reuse them.

    Args:
        N: channels of the transforms and of ``z``.
        M: channels of ``y``; a multiple of ``slice_num``.
        slice_num: channel slices (10 in the releases).
        generation: ``"2024-04"`` or ``"2023-09"`` (the LRP and the first synthesis block).
        ep_hidden: hidden widths of the entropy-parameter nets (official ``(320, 256, 128)``).
        cc_hidden: hidden widths of the channel contexts (official ``(192, 128)``).
        lrp_hidden: hidden widths of the 2024-04 LRP (official ``(224, 128)``); the 2023-09
            LRP's follow from its input width.
    """

    def __init__(
        self,
        N: int = 192,
        M: int = 320,
        slice_num: int = 10,
        generation: str = "2024-04",
        ep_hidden: Sequence[int] = (320, 256, 128),
        cc_hidden: Sequence[int] = (192, 128),
        lrp_hidden: Sequence[int] = (224, 128),
    ):
        super().__init__()
        if M % slice_num:
            raise ValueError(f"M={M} is not a multiple of slice_num={slice_num}")
        if generation not in GENERATIONS:
            raise ValueError(f"unknown MLIC++ generation {generation!r} (one of {', '.join(GENERATIONS)})")
        ch = M // slice_num
        self.N, self.M, self.slice_num, self.slice_ch, self.generation = N, M, slice_num, ch, generation
        self.entropy_bottleneck = EntropyBottleneck(N)
        self.g_a = AnalysisTransform(N, M)
        self.g_s = SynthesisTransform(N, M, M if generation == "2024-04" else N)
        self.h_a = HyperAnalysis(N, M)
        self.h_s = HyperSynthesis(N, M)
        self.gaussian_conditional = GaussianConditional(None)
        self.local_context = nn.ModuleList(LocalContext(ch) for _ in range(slice_num))
        # index 0 has no earlier slices: an empty slot, as in the official ModuleList
        self.channel_context = nn.ModuleList(
            ChannelContext(ch * i, cc_hidden, 4 * ch) if i else None for i in range(slice_num)
        )
        self.global_inter_context = nn.ModuleList(
            LinearGlobalInterContext(ch * i, 2 * ch) if i else None for i in range(slice_num)
        )
        self.global_intra_context = nn.ModuleList(LinearGlobalIntraContext(ch) if i else None for i in range(slice_num))
        self.entropy_parameters_anchor = nn.ModuleList(
            EntropyParameters(2 * M + (6 * ch if i else 0), ep_hidden, 2 * ch) for i in range(slice_num)
        )
        self.entropy_parameters_nonanchor = nn.ModuleList(
            EntropyParameters(2 * M + (10 * ch if i else 2 * ch), ep_hidden, 2 * ch) for i in range(slice_num)
        )

        def lrp(i: int) -> LatentResidualPrediction:
            in_dim = M + (i + 1) * ch
            hidden = lrp_hidden if generation == "2024-04" else old_lrp_hidden(in_dim, ch)
            return LatentResidualPrediction(in_dim, hidden, ch)

        self.lrp_anchor = nn.ModuleList(lrp(i) for i in range(slice_num))
        self.lrp_nonanchor = nn.ModuleList(lrp(i) for i in range(slice_num))

    # ------------------------------------------------------------------ coding steps

    def hyper_context(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(hyper, hyper_means)``: ``h_s(ẑ)`` (``2M`` channels, scales first) and its
        means half, which every LRP reads."""
        hyper = self.h_s(z_hat)
        return hyper, hyper.chunk(2, dim=1)[1]

    def anchor_parameters(
        self, index: int, hyper: Tensor, y_hat_slices: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(σ, μ, shared)`` of the anchors of slice ``index`` on the full map (zeros at
        the non-anchors); ``shared``: the global inter and channel contexts of the earlier
        slices, which the non-anchor step reads too (empty for slice 0)."""
        if index == 0:
            shared: list[Tensor] = []
        else:
            earlier = torch.cat(list(y_hat_slices), dim=1)
            shared = [self.global_inter_context[index](earlier), self.channel_context[index](earlier)]
        scales, means = self.entropy_parameters_anchor[index](torch.cat([*shared, hyper], dim=1)).chunk(2, dim=1)
        anchors = anchor_mask(*scales.shape[-2:], device=scales.device)
        return _keep(scales, anchors), _keep(means, anchors), shared

    def nonanchor_parameters(
        self, index: int, hyper: Tensor, y_hat_slices: Sequence[Tensor], anchors_hat: Tensor, shared: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(σ, μ)`` of the non-anchors of slice ``index`` (zeros at the anchors), from the
        final anchors ``â`` of the slice and the anchor step's ``shared`` contexts."""
        local = self.local_context[index](anchors_hat)
        parts = (
            [local, hyper]
            if index == 0
            else [local, self.global_intra_context[index](y_hat_slices[-1], anchors_hat), *shared, hyper]
        )
        scales, means = self.entropy_parameters_nonanchor[index](torch.cat(parts, dim=1)).chunk(2, dim=1)
        nonanchors = ~anchor_mask(*scales.shape[-2:], device=scales.device)
        return _keep(scales, nonanchors), _keep(means, nonanchors)

    def lrp(
        self, index: int, anchors: bool, hyper_means: Tensor, y_hat_slices: Sequence[Tensor], values: Tensor
    ) -> Tensor:
        """The latent residual prediction of one half, at that half's positions only:
        ``(lrp_anchor or lrp_nonanchor)[index](cat[hyper_means, ŷ_<index, values])``,
        ``values`` the slice's dequantized values so far."""
        net = (self.lrp_anchor if anchors else self.lrp_nonanchor)[index]
        residual = net(torch.cat([hyper_means, *y_hat_slices, values], dim=1))
        mask = anchor_mask(*values.shape[-2:], device=values.device)
        return _keep(residual, mask if anchors else ~mask)

    # ------------------------------------------------------------------ training / estimate

    def forward(self, x: Tensor) -> dict:
        """``{"x_hat", "likelihoods": {"y", "z"}}``; ``ŷ`` by straight-through rounding
        around ``μ``, half by half in the coding order (the coding path's values),
        likelihoods with uniform noise in training mode."""
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        medians = self.entropy_bottleneck.quantiles[:, :, 1:2]
        z_hat = quantize_ste(z - medians) + medians
        hyper, hyper_means = self.hyper_context(z_hat)
        anchors = anchor_mask(*y.shape[-2:], device=y.device)
        y_hat_slices: list[Tensor] = []
        likelihoods = []
        for i, y_slice in enumerate(y.chunk(self.slice_num, dim=1)):
            scales_a, means_a, shared = self.anchor_parameters(i, hyper, y_hat_slices)
            a_hat = quantize_ste(_keep(y_slice, anchors) - means_a) + means_a
            a_hat = a_hat + self.lrp(i, True, hyper_means, y_hat_slices, a_hat)
            scales_n, means_n = self.nonanchor_parameters(i, hyper, y_hat_slices, a_hat, shared)
            _, slice_likelihoods = self.gaussian_conditional(y_slice, scales_a + scales_n, means_a + means_n)
            likelihoods.append(slice_likelihoods)
            n_hat = quantize_ste(_keep(y_slice, ~anchors) - means_n) + means_n
            y_hat = a_hat + n_hat
            y_hat_slices.append(y_hat + self.lrp(i, False, hyper_means, y_hat_slices, y_hat))
        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1))
        return {"x_hat": x_hat, "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods}}

    # ------------------------------------------------------------------ coding (USQ)

    def coding_steps(self, z_hat: Tensor, code_half) -> Tensor:
        """The final ``ŷ`` (LRP included) by the ``2 · slice_num`` coding steps in order:
        the one torch home of MLIC++'s coding order, shared by :meth:`compress`,
        :meth:`decompress` and finetuning (:mod:`qft.finetune.slices`).
        ``code_half(anchors, index, scales, means)`` codes (or decodes, or quantizes for
        training) one half of slice ``index`` and returns its dequantized values on the
        full map (zeros at the other half), from ``σ, μ`` on the full map (zeros at the
        other half); gradients flow through whatever it returns."""
        hyper, hyper_means = self.hyper_context(z_hat)
        y_hat_slices: list[Tensor] = []
        for i in range(self.slice_num):
            scales, means, shared = self.anchor_parameters(i, hyper, y_hat_slices)
            a_hat = code_half(True, i, scales, means)
            a_hat = a_hat + self.lrp(i, True, hyper_means, y_hat_slices, a_hat)
            scales, means = self.nonanchor_parameters(i, hyper, y_hat_slices, a_hat, shared)
            y_hat = a_hat + code_half(False, i, scales, means)
            y_hat_slices.append(y_hat + self.lrp(i, False, hyper_means, y_hat_slices, y_hat))
        return torch.cat(y_hat_slices, dim=1)

    def compress(self, x: Tensor) -> dict:
        """Code images ``(B, 3, H, W)``, ``H`` and ``W`` multiples of 64, with rounding
        around ``μ`` (USQ); one y string and one z string per image."""
        check_coding_size(self, x)
        tables = gaussian_tables(self, self.entropy_bottleneck)
        gc = self.gaussian_conditional
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        y_slices = y.chunk(self.slice_num, dim=1)
        encoders = [BufferedRansEncoder() for _ in range(y.shape[0])]

        def code_half(anchors: bool, index: int, scales: Tensor, means: Tensor) -> Tensor:
            means = squeeze_checkerboard(means, half_parity(anchors))
            indexes = gc.build_indexes(squeeze_checkerboard(scales, half_parity(anchors)))
            symbols = gc.quantize(squeeze_checkerboard(y_slices[index], half_parity(anchors)), "symbols", means)
            for b, encoder in enumerate(encoders):
                encoder.encode_with_indexes(symbols[b].reshape(-1).tolist(), indexes[b].reshape(-1).tolist(), *tables)
            return unsqueeze_checkerboard(gc.dequantize(symbols, means), half_parity(anchors))

        self.coding_steps(z_hat, code_half)
        return {"strings": [[encoder.flush() for encoder in encoders], z_strings], "shape": z.shape[-2:]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict:
        """Decode :meth:`compress`'s ``strings`` given ``z``'s spatial ``shape``."""
        if len(strings) != 2 or len(strings[0]) != len(strings[1]):
            raise ValueError("expected strings [[y_string per image], [z_string per image]]")
        tables = gaussian_tables(self, self.entropy_bottleneck)
        gc = self.gaussian_conditional
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        decoders = []
        for y_string in strings[0]:
            decoder = RansDecoder()
            decoder.set_stream(y_string)
            decoders.append(decoder)

        def code_half(anchors: bool, index: int, scales: Tensor, means: Tensor) -> Tensor:
            means = squeeze_checkerboard(means, half_parity(anchors))
            indexes = gc.build_indexes(squeeze_checkerboard(scales, half_parity(anchors)))
            symbols = torch.stack(
                [
                    torch.tensor(
                        decoder.decode_stream(indexes[b].reshape(-1).tolist(), *tables), dtype=torch.int32
                    ).reshape(means.shape[1:])
                    for b, decoder in enumerate(decoders)
                ]
            ).to(means.device)
            return unsqueeze_checkerboard(gc.dequantize(symbols, means), half_parity(anchors))

        x_hat = self.g_s(self.coding_steps(z_hat, code_half)).clamp_(0, 1)
        return {"x_hat": x_hat}


# ---------------------------------------------------------------------------- registry

_MLICPP_KEYS = frozenset(
    {
        "g_a.analysis_transform.0.conv1.weight",
        "g_a.analysis_transform.6.weight",
        "g_s.synthesis_transform.0.conv1.weight",
        "h_s.increase.0.weight",
        "local_context.0.relative_position_table",
        "entropy_parameters_anchor.0.fusion.0.weight",
        "entropy_parameters_anchor.0.fusion.2.weight",
        "entropy_parameters_anchor.0.fusion.4.weight",
        "entropy_parameters_nonanchor.0.fusion.0.weight",
        "lrp_anchor.0.lrp_transform.0.weight",
        "lrp_anchor.0.lrp_transform.2.weight",
        "entropy_bottleneck.quantiles",
    }
)


def infer_mlicpp_params(state_dict: Mapping[str, Tensor]) -> dict:
    """``N``, ``M``, ``slice_num``, ``generation`` and the hidden widths of an MLIC++
    state_dict, from its shapes: the 2023-09 generation is the one whose LRP has a fourth
    conv (``lrp_anchor.0.lrp_transform.6``)."""
    slice_num = count_indices(state_dict, "lrp_anchor.{}.lrp_transform.0.weight")
    old = "lrp_anchor.0.lrp_transform.6.weight" in state_dict
    params = {
        "N": state_dict["g_a.analysis_transform.0.conv1.weight"].shape[0],
        "M": state_dict["g_a.analysis_transform.6.weight"].shape[0],
        "slice_num": slice_num,
        "generation": GENERATIONS[1] if old else GENERATIONS[0],
        "ep_hidden": [state_dict[f"entropy_parameters_anchor.0.fusion.{k}.weight"].shape[0] for k in (0, 2, 4)],
    }
    if slice_num > 1:
        params["cc_hidden"] = [state_dict[f"channel_context.1.fushion.{k}.weight"].shape[0] for k in (0, 2)]
    if not old:
        params["lrp_hidden"] = [state_dict[f"lrp_anchor.0.lrp_transform.{k}.weight"].shape[0] for k in (0, 2)]
    return params


def complete_mlicpp_params(params: dict) -> dict:
    """Check the constraints between the parameters (equal slices of an even width,
    a known generation, three and two hidden widths)."""
    out = check_positive_ints("MLIC++", params, ("slice_num",), {"ep_hidden": 3, "cc_hidden": 2, "lrp_hidden": 2})
    M, slices = out["M"], out["slice_num"]
    if M % slices or (M // slices) % _LOCAL_HEADS:
        raise UserError(
            f"MLIC++: M must split into slice_num equal slices of an even width, got M={M}, slice_num={slices}"
        )
    if out["generation"] not in GENERATIONS:
        raise UserError(f"MLIC++: generation must be one of {', '.join(GENERATIONS)}, got {out['generation']!r}")
    return out


register_architecture(
    Architecture(
        name="mlicpp",
        cls=MLICPlusPlus,
        entropy="channel-checkerboard",
        defaults={
            "N": 192,
            "M": 320,
            "slice_num": 10,
            "generation": "2024-04",
            "ep_hidden": [320, 256, 128],
            "cc_hidden": [192, 128],
            "lrp_hidden": [224, 128],
        },
        signature=_MLICPP_KEYS,
        infer_params=infer_mlicpp_params,
        description="Jiang & Wang 2023, MLIC++: 10 channel slices × checkerboard, local/global/channel contexts + LRP",
        complete_params=complete_mlicpp_params,
    )
)
