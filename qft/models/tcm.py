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

from collections.abc import Mapping, Sequence

import torch

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
from torch import Tensor, nn

from qft.errors import UserError

from .layers import WindowAttention
from .registry import Architecture, register_architecture
from .slices import ChannelSliceModel, check_positive_ints, is_positive_int, slice_transform

__all__ = [
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


class TCM(ChannelSliceModel):
    """TCM (Liu et al. 2023) with the official state_dict layout; see the module doc.

    A :class:`~qft.models.slices.ChannelSliceModel` of five equal slices: ``forward``,
    ``compress`` and ``decompress`` are the base's (the official streams: one rANS string
    per image holding the five slices in order); the slice-wise steps are the public
    :meth:`hyper_context` and :meth:`slice_parameters` and the base's
    :meth:`slice_reconstruction` (LRP), so other coders reuse them.
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
        self.slice_sizes = [M // NUM_SLICES] * NUM_SLICES
        size = M // NUM_SLICES
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
        support = [M + size * i for i in range(NUM_SLICES)]
        self.atten_mean = nn.ModuleList(nn.Sequential(SWAtten(ch, attn_dim, _ATTN_HEAD_DIM, _WINDOW)) for ch in support)
        self.atten_scale = nn.ModuleList(
            nn.Sequential(SWAtten(ch, attn_dim, _ATTN_HEAD_DIM, _WINDOW)) for ch in support
        )
        self.cc_mean_transforms = nn.ModuleList(slice_transform(ch, cc_dims, size) for ch in support)
        self.cc_scale_transforms = nn.ModuleList(slice_transform(ch, cc_dims, size) for ch in support)
        self.lrp_transforms = nn.ModuleList(slice_transform(ch + size, cc_dims, size) for ch in support)
        self.gaussian_conditional = GaussianConditional(None)

    # ------------------------------------------------------------------ slice steps

    def hyper_context(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(means, scales)`` of the hyper-synthesis, ``M`` channels each."""
        return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

    def slice_parameters(
        self, index: int, context: tuple[Tensor, Tensor], y_hat_slices: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ, σ, support)`` of slice ``index``: ``support = atten_mean[index](cat[means,
        ŷ_<index])`` (what the LRP reads), ``μ`` its ``cc_mean_transforms``; ``σ`` through
        ``atten_scale`` and ``cc_scale_transforms`` from the scales."""
        means, scales = context
        support = self.atten_mean[index](torch.cat([means, *y_hat_slices], dim=1))
        mu = self.cc_mean_transforms[index](support)
        scale_support = self.atten_scale[index](torch.cat([scales, *y_hat_slices], dim=1))
        scale = self.cc_scale_transforms[index](scale_support)
        return mu, scale, support


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
    out = check_positive_ints("TCM", out, ("Z",), {"cc_dims": 2})
    if not (is_positive_int(out["attn_dim"]) and out["attn_dim"] % _ATTN_HEAD_DIM == 0):
        raise UserError(f"TCM: attn_dim must be a positive multiple of {_ATTN_HEAD_DIM}, got {out['attn_dim']!r}")
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
