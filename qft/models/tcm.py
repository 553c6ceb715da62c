"""TCM: learned image compression with mixed transformer-CNN architectures (Liu et al., CVPR 2023).

qft's implementation of the model of the official repository (jmliu206/LIC_TCM, class
``TCM``): its ``state_dict()`` has the official keys, shapes and dtypes, so a release
checkpoint (``{"epoch", "state_dict", ...}``, with or without ``module.``) loads unchanged
and strictly through :func:`qft.models.load_checkpoint`; ``N`` is read from the shapes
(releases exist at ``N=64`` and ``N=128``, both ``M=320``).

::

    x ─g_a─▶ y ─h_a─▶ z ─EB─▶ ẑ ─h_mean_s, h_scale_s─▶ (means, scales): M channels each
    y = y_0 … y_4 (M/5 channels each), coded in order; for slice i:
        support_μ = atten_mean[i](cat[means, ŷ_0 … ŷ_{i-1}])       μ_i = cc_mean_transforms[i](support_μ)
        support_σ = atten_scale[i](cat[scales, ŷ_0 … ŷ_{i-1}])     σ_i = cc_scale_transforms[i](support_σ)
        q_i = round(y_i - μ_i)                                       ŷ_i = q_i + μ_i
        ŷ_i += 0.5·tanh(lrp_transforms[i](cat[support_μ, ŷ_i]))     (latent residual prediction)
    x̂ = g_s(cat[ŷ_0 … ŷ_4])

Transforms: ``g_a``/``g_s`` alternate residual (de)convolution blocks with
:class:`ConvTransBlock` (a channel split into a residual CNN branch and a Swin-transformer
branch, window 8, ``W``/``SW`` alternating); the hyper transforms use window 4; the slice
supports go through :class:`SWAtten` (an attention block whose non-local branch is a
Swin pair at 128 channels).

Parameters (``qft init --arch tcm --N 32 --M 40`` gives a small model of 2.9 M weights;
the releases have 45.2 M at ``N=64`` and 76.6 M at ``N=128``):

- ``N``: channels of each branch of the transformer-CNN blocks (the transforms run at
  ``2N``); a multiple of 32 (the attention heads are 8 to 32 channels wide);
- ``M``: channels of ``y``, a multiple of 5 (five equal slices); official 320;
- ``Z``: channels of ``z``; default ``3M/5`` (192 at M=320);
- ``attn_dim``: width of the :class:`SWAtten` blocks, a multiple of 16; default ``2M/5`` (128);
- ``cc_dims``: hidden widths of the μ, σ and LRP transforms; default ``[7M/10, 2M/5]``
  (``[224, 128]``).

The defaults of the last three follow from ``M`` so that ``M=320`` gives the official
model and a smaller ``M`` (a multiple of 40) a proportionally smaller entropy model. The
official code hard-codes 320 and 192 where this one reads ``M`` and ``Z``.

Departure for sizes the official model cannot run: its window attention needs feature
maps whose sides are multiples of the window (8; 4 in the hyper transforms), i.e. images
padded to a multiple of 128 and at least 256 wide and high. Here a map of any size is
padded (zeros, bottom/right) to a multiple of the window, the padded positions are masked
out as keys, and the output is cropped back, so any image padded to a multiple of 64 codes
(qft's padding). On sizes the official model runs, the operations are the official ones,
in the official order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import (
    AttentionBlock,
    ResidualBlock,
    ResidualBlockUpsample,
    ResidualBlockWithStride,
    conv1x1,
    conv3x3,
    subpel_conv3x3,
)
from compressai.models import CompressionModel
from compressai.ops import quantize_ste
from torch import Tensor, nn

from qft.errors import UserError

from .registry import Architecture, register_architecture

__all__ = [
    "WindowAttention",
    "SwinBlock",
    "ConvTransBlock",
    "SWAtten",
    "TCM",
    "infer_tcm_params",
    "complete_tcm_params",
]

#: heads of the transformer blocks are this many channels wide, per stage of g_a, g_s
_HEAD_DIMS = (8, 16, 32, 32, 16, 8)
#: blocks per stage (the official ``config``)
_DEPTH = 2
_WINDOW = 8
_HYPER_WINDOW = 4
_HYPER_HEAD_DIM = 32
_ATTN_HEAD_DIM = 16
NUM_SLICES = 5


class WindowAttention(nn.Module):
    """Multi-head self-attention within ``window × window`` windows, shifted by half a
    window when ``shifted`` (Swin), with a learned relative-position bias per head.

    Input and output ``(B, H, W, C)``. Sides that are not multiples of the window are
    padded (zeros, bottom/right); padded positions are never attended to by real ones, and
    the output is cropped back.
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
        self.relative_position_params = nn.Parameter(
            torch.empty(self.heads, 2 * window - 1, 2 * window - 1)
        )
        nn.init.trunc_normal_(self.relative_position_params, std=0.02)
        self.linear = nn.Linear(dim, dim)
        pos = torch.arange(window)
        rows = pos.repeat_interleave(window)  # row of each position in a window, row-major
        cols = pos.repeat(window)
        self.register_buffer("_rel_rows", rows[:, None] - rows[None, :] + window - 1, persistent=False)
        self.register_buffer("_rel_cols", cols[:, None] - cols[None, :] + window - 1, persistent=False)

    def _windows(self, x: Tensor) -> Tensor:
        """``(B, Hp, Wp, C)`` -> ``(B, windows, window², C)``, windows row-major."""
        B, H, W, C = x.shape
        w = self.window
        x = x.reshape(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, (H // w) * (W // w), w * w, C)

    def _mask(self, height: int, width: int, device: torch.device) -> Tensor | None:
        """``(windows, window², window²)``: True where a query may not attend to a key.

        A shifted window that wraps around the map's edge holds two or four regions that
        are not neighbours: they do not attend to each other. Padded keys are not attended
        to by real queries.
        """
        w = self.window
        hp, wp = height + (-height % w), width + (-width % w)
        nh, nw = hp // w, wp // w
        mask = None
        if self.shifted:
            s = w - w // 2
            m = torch.zeros(nh, nw, w, w, w, w, dtype=torch.bool, device=device)
            m[-1, :, :s, :, s:, :] = True
            m[-1, :, s:, :, :s, :] = True
            m[:, -1, :, :s, :, s:] = True
            m[:, -1, :, s:, :, :s] = True
            mask = m.reshape(nh * nw, w * w, w * w)
        if (hp, wp) != (height, width):
            valid = torch.zeros(1, hp, wp, 1, dtype=torch.bool, device=device)
            valid[:, :height, :width] = True
            if self.shifted:
                valid = torch.roll(valid, shifts=(-(w // 2), -(w // 2)), dims=(1, 2))
            valid = self._windows(valid)[0, :, :, 0]  # (windows, window²)
            padded_key = valid[:, :, None] & ~valid[:, None, :]
            mask = padded_key if mask is None else mask | padded_key
        return mask

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        w = self.window
        ph, pw = -H % w, -W % w
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = H + ph, W + pw
        if self.shifted:
            x = torch.roll(x, shifts=(-(w // 2), -(w // 2)), dims=(1, 2))
        x = self._windows(x)
        n = x.shape[1]
        qkv = self.embedding_layer(x)
        q, k, v = qkv.view(B, n, w * w, 3 * self.heads, self.head_dim).permute(3, 0, 1, 2, 4).chunk(3, dim=0)
        sim = torch.einsum("hbwpc,hbwqc->hbwpq", q, k) * self.scale
        bias = self.relative_position_params[:, self._rel_rows, self._rel_cols]
        sim = sim + bias[:, None, None]
        mask = self._mask(H, W, x.device)
        if mask is not None:
            sim = sim.masked_fill_(mask, float("-inf"))
        probs = F.softmax(sim, dim=-1)
        out = torch.einsum("hbwij,hbwjc->hbwic", probs, v)
        out = out.permute(1, 2, 3, 0, 4).reshape(B, n, w * w, C)
        out = self.linear(out)
        out = out.reshape(B, hp // w, wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp, wp, C)
        if self.shifted:
            out = torch.roll(out, shifts=(w // 2, w // 2), dims=(1, 2))
        return out[:, :H, :W] if ph or pw else out


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on ``(B, H, W, C)``: window attention, then a 4× MLP."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WindowAttention(dim, head_dim, window, shifted)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.msa(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SwinBlock(nn.Module):
    """A window block and a shifted-window block, on ``(B, C, H, W)``."""

    def __init__(self, dim: int, head_dim: int, window: int):
        super().__init__()
        self.block_1 = TransformerBlock(dim, head_dim, window, shifted=False)
        self.block_2 = TransformerBlock(dim, head_dim, window, shifted=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block_2(self.block_1(x.permute(0, 2, 3, 1)))
        return x.permute(0, 3, 1, 2)


class ConvTransBlock(nn.Module):
    """TCM's mixed block on ``2·dim`` channels: a 1×1 conv, then half the channels
    through a residual CNN branch and half through a (shifted-)window transformer block,
    concatenated, a 1×1 conv, plus the input."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.dim = dim
        self.trans_block = TransformerBlock(dim, head_dim, window, shifted)
        self.conv1_1 = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.conv1_2 = nn.Conv2d(2 * dim, 2 * dim, 1)
        self.conv_block = ResidualBlock(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        conv_x, trans_x = torch.split(self.conv1_1(x), (self.dim, self.dim), dim=1)
        conv_x = self.conv_block(conv_x) + conv_x
        trans_x = self.trans_block(trans_x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.conv1_2(torch.cat((conv_x, trans_x), dim=1))


class SWAtten(AttentionBlock):
    """CompressAI's attention block whose non-local branch is a Swin pair, run at
    ``inner`` channels between two 1×1 convs (``channels -> inner -> channels``)."""

    def __init__(self, channels: int, inner: int, head_dim: int, window: int):
        super().__init__(N=inner)
        self.non_local_block = SwinBlock(inner, head_dim, window)
        self.in_conv = conv1x1(channels, inner)
        self.out_conv = conv1x1(inner, channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_conv(x)
        identity = x
        a = self.conv_a(x)
        b = self.conv_b(self.non_local_block(x))
        out = a * torch.sigmoid(b)
        out += identity
        return self.out_conv(out)


def _stage(N: int, head_dim: int, window: int) -> list[nn.Module]:
    """``_DEPTH`` mixed blocks, window then shifted window."""
    return [ConvTransBlock(N, head_dim, window, shifted=bool(i % 2)) for i in range(_DEPTH)]


def _slice_transform(in_ch: int, hidden: Sequence[int], out_ch: int) -> nn.Sequential:
    """3×3 convs ``in -> hidden[0] -> hidden[1] -> out`` with GELUs between."""
    return nn.Sequential(
        conv3x3(in_ch, hidden[0]),
        nn.GELU(),
        conv3x3(hidden[0], hidden[1]),
        nn.GELU(),
        conv3x3(hidden[1], out_ch),
    )


class TCM(CompressionModel):
    """TCM (Liu et al. 2023) with the official state_dict layout; see the module doc.

    ``forward(x)`` returns ``{"x_hat", "likelihoods": {"y", "z"}}`` (training: additive
    noise for the likelihoods, straight-through rounding for ``ŷ`` and ``ẑ``, as the
    official model); ``compress(x)`` returns ``{"strings": [y_strings, z_strings],
    "shape": (zh, zw)}`` with one rANS string per image holding the five slices in order;
    ``decompress(strings, shape)`` returns ``{"x_hat"}``. The slice-wise steps are public
    (:meth:`hyper`, :meth:`slice_params`, :meth:`refine`), so other coders reuse them.
    """

    def __init__(
        self,
        N: int = 128,
        M: int = 320,
        Z: int = 192,
        attn_dim: int = 128,
        cc_dims: Sequence[int] = (224, 128),
    ):
        super().__init__()
        if M % NUM_SLICES:
            raise ValueError(f"M={M} is not a multiple of {NUM_SLICES}")
        self.N, self.M, self.Z = N, M, Z
        self.slice_channels = M // NUM_SLICES
        # (the official model creates it first: the state_dict order follows)
        self.entropy_bottleneck = EntropyBottleneck(Z)
        c = 2 * N
        self.g_a = nn.Sequential(
            ResidualBlockWithStride(3, c, stride=2),
            *_stage(N, _HEAD_DIMS[0], _WINDOW),
            ResidualBlockWithStride(c, c, stride=2),
            *_stage(N, _HEAD_DIMS[1], _WINDOW),
            ResidualBlockWithStride(c, c, stride=2),
            *_stage(N, _HEAD_DIMS[2], _WINDOW),
            conv3x3(c, M, stride=2),
        )
        self.g_s = nn.Sequential(
            ResidualBlockUpsample(M, c, 2),
            *_stage(N, _HEAD_DIMS[3], _WINDOW),
            ResidualBlockUpsample(c, c, 2),
            *_stage(N, _HEAD_DIMS[4], _WINDOW),
            ResidualBlockUpsample(c, c, 2),
            *_stage(N, _HEAD_DIMS[5], _WINDOW),
            subpel_conv3x3(c, 3, 2),
        )
        self.h_a = nn.Sequential(
            ResidualBlockWithStride(M, c, stride=2),
            *_stage(N, _HYPER_HEAD_DIM, _HYPER_WINDOW),
            conv3x3(c, Z, stride=2),
        )
        self.h_mean_s = nn.Sequential(
            ResidualBlockUpsample(Z, c, 2),
            *_stage(N, _HYPER_HEAD_DIM, _HYPER_WINDOW),
            subpel_conv3x3(c, M, 2),
        )
        self.h_scale_s = nn.Sequential(
            ResidualBlockUpsample(Z, c, 2),
            *_stage(N, _HYPER_HEAD_DIM, _HYPER_WINDOW),
            subpel_conv3x3(c, M, 2),
        )
        support = [M + self.slice_channels * i for i in range(NUM_SLICES)]
        self.atten_mean = nn.ModuleList(
            nn.Sequential(SWAtten(ch, attn_dim, _ATTN_HEAD_DIM, _WINDOW)) for ch in support
        )
        self.atten_scale = nn.ModuleList(
            nn.Sequential(SWAtten(ch, attn_dim, _ATTN_HEAD_DIM, _WINDOW)) for ch in support
        )
        self.cc_mean_transforms = nn.ModuleList(
            _slice_transform(ch, cc_dims, self.slice_channels) for ch in support
        )
        self.cc_scale_transforms = nn.ModuleList(
            _slice_transform(ch, cc_dims, self.slice_channels) for ch in support
        )
        self.lrp_transforms = nn.ModuleList(
            _slice_transform(ch + self.slice_channels, cc_dims, self.slice_channels) for ch in support
        )
        self.gaussian_conditional = GaussianConditional(None)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> "TCM":
        """A model with the parameters read from ``state_dict``'s shapes, loaded from it."""
        net = cls(**infer_tcm_params(state_dict))
        net.load_state_dict(state_dict)
        return net

    # ------------------------------------------------------------------ coding steps

    def hyper(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(means, scales)`` of the hyper-synthesis, ``M`` channels each."""
        return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

    def slice_params(
        self, index: int, hyper: tuple[Tensor, Tensor], y_hat_slices: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ, σ, support)`` of slice ``index`` from the hyper output and the final
        (LRP-corrected) earlier slices; ``support`` is what :meth:`refine` reads."""
        means, scales = hyper
        support = self.atten_mean[index](torch.cat([means, *y_hat_slices], dim=1))
        mu = self.cc_mean_transforms[index](support)
        scale_support = self.atten_scale[index](torch.cat([scales, *y_hat_slices], dim=1))
        scale = self.cc_scale_transforms[index](scale_support)
        return mu, scale, support

    def refine(self, index: int, support: Tensor, y_hat_slice: Tensor) -> Tensor:
        """Slice ``index`` after latent residual prediction: ``ŷ + 0.5·tanh(lrp(support, ŷ))``
        (a new tensor)."""
        lrp = self.lrp_transforms[index](torch.cat([support, y_hat_slice], dim=1))
        return y_hat_slice + 0.5 * torch.tanh(lrp)

    # ------------------------------------------------------------------ CompressAI API

    def forward(self, x: Tensor) -> dict:
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.entropy_bottleneck(z)
        z_offset = self.entropy_bottleneck.quantiles[:, :, 1:2]  # the medians, (Z, 1, 1)
        z_hat = quantize_ste(z - z_offset) + z_offset
        hyper = self.hyper(z_hat)
        y_hat_slices, y_likelihoods = [], []
        for index, y_slice in enumerate(y.chunk(NUM_SLICES, 1)):
            mu, scale, support = self.slice_params(index, hyper, y_hat_slices)
            _, likelihoods = self.gaussian_conditional(y_slice, scale, mu)
            y_likelihoods.append(likelihoods)
            y_hat_slices.append(self.refine(index, support, quantize_ste(y_slice - mu) + mu))
        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1))
        return {
            "x_hat": x_hat,
            "likelihoods": {"y": torch.cat(y_likelihoods, dim=1), "z": z_likelihoods},
        }

    def _tables(self) -> tuple[list, list, list]:
        gc = self.gaussian_conditional
        if gc.quantized_cdf.numel() == 0:
            raise RuntimeError("TCM: the CDF tables are not built; call update() first")
        return (
            gc.quantized_cdf.tolist(),
            gc.cdf_length.reshape(-1).int().tolist(),
            gc.offset.reshape(-1).int().tolist(),
        )

    def compress(self, x: Tensor) -> dict:
        """``{"strings": [y_strings, z_strings], "shape": z's (h, w)}``, one string per
        image in each list; the y string holds slices 0…4 in order, each flattened
        ``(C, H, W)``, as the official model's."""
        tables = self._tables()
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        hyper = self.hyper(z_hat)
        y_hat_slices, symbols, indexes = [], [], []
        for index, y_slice in enumerate(y.chunk(NUM_SLICES, 1)):
            mu, scale, support = self.slice_params(index, hyper, y_hat_slices)
            q = self.gaussian_conditional.quantize(y_slice, "symbols", mu)
            symbols.append(q)
            indexes.append(self.gaussian_conditional.build_indexes(scale))
            y_hat_slices.append(self.refine(index, support, q + mu))
        y_strings = []
        for b in range(x.shape[0]):
            encoder = BufferedRansEncoder()
            encoder.encode_with_indexes(
                torch.cat([s[b].reshape(-1) for s in symbols]).tolist(),
                torch.cat([i[b].reshape(-1) for i in indexes]).tolist(),
                *tables,
            )
            y_strings.append(encoder.flush())
        return {"strings": [y_strings, z_strings], "shape": z.size()[-2:]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict:
        """``{"x_hat"}`` in ``[0, 1]`` from :meth:`compress`'s strings and shape."""
        if len(strings) != 2 or len(strings[0]) != len(strings[1]):
            raise ValueError("TCM streams are [y_strings, z_strings], one string per image in each")
        tables = self._tables()
        z_hat = self.entropy_bottleneck.decompress(strings[1], shape)
        hyper = self.hyper(z_hat)
        height, width = 4 * z_hat.shape[2], 4 * z_hat.shape[3]
        decoders = []
        for y_string in strings[0]:
            decoder = RansDecoder()
            decoder.set_stream(y_string)
            decoders.append(decoder)
        y_hat_slices = []
        for index in range(NUM_SLICES):
            mu, scale, support = self.slice_params(index, hyper, y_hat_slices)
            idx = self.gaussian_conditional.build_indexes(scale)
            rv = [
                torch.tensor(d.decode_stream(idx[b].reshape(-1).tolist(), *tables), dtype=torch.int32)
                for b, d in enumerate(decoders)
            ]
            rv = torch.stack(rv).reshape(len(decoders), self.slice_channels, height, width).to(mu.device)
            y_hat_slices.append(self.refine(index, support, self.gaussian_conditional.dequantize(rv, mu)))
        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1)).clamp_(0, 1)
        return {"x_hat": x_hat}


# ---------------------------------------------------------------------------- registry

_TCM_KEYS = frozenset(
    {
        "g_a.0.conv1.weight",
        "g_a.1.trans_block.msa.relative_position_params",
        "g_a.9.weight",
        "h_a.3.weight",
        "h_mean_s.0.subpel_conv.0.weight",
        "atten_mean.0.0.in_conv.weight",
        "cc_mean_transforms.0.0.weight",
        "cc_mean_transforms.0.2.weight",
        "lrp_transforms.0.0.weight",
        "entropy_bottleneck.quantiles",
    }
)


def infer_tcm_params(state_dict: Mapping[str, Tensor]) -> dict:
    """``N``, ``M``, ``Z``, ``attn_dim`` and ``cc_dims`` of a TCM state_dict, from shapes."""
    return {
        "N": state_dict["g_a.0.conv1.weight"].shape[0] // 2,
        "M": state_dict["g_a.9.weight"].shape[0],
        "Z": state_dict["h_a.3.weight"].shape[0],
        "attn_dim": state_dict["atten_mean.0.0.in_conv.weight"].shape[0],
        "cc_dims": [
            state_dict["cc_mean_transforms.0.0.weight"].shape[0],
            state_dict["cc_mean_transforms.0.2.weight"].shape[0],
        ],
    }


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def complete_tcm_params(params: dict) -> dict:
    """Derive ``Z``, ``attn_dim``, ``cc_dims`` left ``None`` from ``M`` and check the
    constraints of the blocks (head widths, five slices)."""
    N, M = params["N"], params["M"]
    if N % 32:
        raise UserError(f"TCM: N must be a multiple of 32 (attention heads of 8 to 32 channels), got {N}")
    if M % NUM_SLICES:
        raise UserError(f"TCM: M must be a multiple of {NUM_SLICES} (five equal slices), got {M}")
    out = dict(params)
    derived = {"Z": 3 * M // 5, "attn_dim": 2 * M // 5, "cc_dims": [7 * M // 10, 2 * M // 5]}
    for key, value in derived.items():
        if out[key] is None:
            if M % 40:
                raise UserError(
                    f"TCM: {key} follows from M only when M is a multiple of 40 (M=320: official); "
                    f"give {key} explicitly at M={M}"
                )
            out[key] = value
    if not _positive(out["Z"]):
        raise UserError(f"TCM: Z must be a positive integer, got {out['Z']!r}")
    if not (_positive(out["attn_dim"]) and out["attn_dim"] % _ATTN_HEAD_DIM == 0):
        raise UserError(f"TCM: attn_dim must be a positive multiple of {_ATTN_HEAD_DIM}, got {out['attn_dim']!r}")
    cc = out["cc_dims"]
    if not (isinstance(cc, (list, tuple)) and len(cc) == 2 and all(_positive(v) for v in cc)):
        raise UserError(f"TCM: cc_dims must be two positive integers, got {cc!r}")
    out["cc_dims"] = list(cc)
    return out


register_architecture(
    Architecture(
        name="tcm",
        cls=TCM,
        entropy="channel-conditional",
        defaults={"N": 128, "M": 320, "Z": None, "attn_dim": None, "cc_dims": None},
        signature=_TCM_KEYS,
        infer_params=infer_tcm_params,
        description="Liu et al. 2023, TCM: transformer-CNN, 5 channel slices + LRP (CVPR 2023)",
        complete_params=complete_tcm_params,
    )
)
