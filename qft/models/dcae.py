"""DCAE: Lu et al., "Learned Image Compression with Dictionary-based Entropy Model",
CVPR 2025 (official code: LabShuHangGU/DCAE, ``models/dcae.py``, class ``DCAE``).

qft's own implementation, with the official state_dict layout (key names, shapes, dtypes
and order), so a release checkpoint loads unchanged.

- ``g_a``/``g_s``: residual bottleneck blocks with stride/upsampling and Swin blocks
  (window 8, window attention with relative position bias, alternating W / shifted-W,
  convolutional-GLU MLP); ``h_a``, ``h_z_s1`` (→ latent scales), ``h_z_s2`` (→ latent
  means): the same blocks at window 4, head width 32.
- Entropy model (:class:`~qft.models.slices.ChannelSliceModel`): ``y.chunk(num_slices)``;
  slice ``i`` builds ``query = cat[latent_scales, latent_means, ŷ_<i]``, reads the learned
  dictionary ``dt`` (``dict_num × 32·dict_head_num``, image-independent) by
  multi-scale cross attention, ``support = cat[query, dict_info]`` feeds
  ``cc_mean_transforms[i]``, ``cc_scale_transforms[i]`` and the LRP.

Parameters (``qft init --arch dcae --set NAME=VALUE``; defaults = the release):

===============  =======================  ============================================
``N``            192                      channels of the hyper transforms
``M``            320                      channels of ``y`` (a multiple of num_slices)
``num_slices``   5                        channel slices of ``y`` (equal sizes)
``z_dim``        192                      channels of ``z`` (hard-coded 192 officially)
``feature_dim``  96,144,256               channels of the three g_a/g_s stages
``block_num``    1,2,12                   Swin blocks per stage
``head_dim``     8,16,32,32,16,8          attention head width, g_a stages then g_s
``dict_num``     128                      dictionary entries
``dict_head_num`` 20                      dictionary heads (dictionary width 32 × this)
``cc_dim``       224,128                  hidden widths of the μ/σ and LRP transforms
===============  =======================  ============================================

``N`` must be a multiple of 32 (head width of the hyper Swin blocks) and each stage width
a multiple of its heads' widths. A tiny model for tests: ``N=32, M=40, z_dim=16,
feature_dim=16,16,16, block_num=1,1,2, head_dim=8,8,8,8,8,8, dict_num=8,
dict_head_num=1, cc_dim=16,16``.

Where the official code fails, this one does not: window attention on a map that is not
larger than its window and a multiple of it (the official Swin block pads such inputs by
one row/column and then fails, e.g. on a 64×64 image, or 128×128 at the hyper transforms)
pads the map bottom/right, masks the padded keys and crops back (as qft's TCM). On every
input the official code accepts, the two compute the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models.sensetime import ResidualBottleneckBlock
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from qft.errors import UserError

from .layers import WindowAttention
from .registry import Architecture, register_architecture
from .slices import ChannelSliceModel, check_positive_ints, count_indices, slice_transform

__all__ = ["DCAE", "complete_dcae_params", "infer_dcae_params"]

#: width of one dictionary head (``dict_dim = 32 * dict_head_num``, as officially)
DICT_HEAD_DIM = 32
#: window and head width of the Swin blocks of the hyper transforms
HYPER_WINDOW, HYPER_HEAD_DIM = 4, 32
#: window of the Swin blocks of g_a / g_s
WINDOW = 8


class ResidualBottleneckBlockWithStride(nn.Module):
    """5×5 stride-2 convolution, then three residual bottleneck blocks."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = conv(in_ch, out_ch, kernel_size=5, stride=2)
        self.res1 = ResidualBottleneckBlock(out_ch, out_ch)
        self.res2 = ResidualBottleneckBlock(out_ch, out_ch)
        self.res3 = ResidualBottleneckBlock(out_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.res3(self.res2(self.res1(self.conv(x))))


class ResidualBottleneckBlockWithUpsample(nn.Module):
    """Three residual bottleneck blocks, then a 5×5 stride-2 transposed convolution."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.res1 = ResidualBottleneckBlock(in_ch, in_ch)
        self.res2 = ResidualBottleneckBlock(in_ch, in_ch)
        self.res3 = ResidualBottleneckBlock(in_ch, in_ch)
        self.conv = deconv(in_ch, out_ch, kernel_size=5, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.res3(self.res2(self.res1(x))))


class DWConv(nn.Module):
    """3×3 depthwise convolution of a ``(B, H, W, C)`` tensor."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class ConvolutionalGLU(nn.Module):
    """Gated MLP of a ``(B, H, W, C)`` tensor: ``fc2(GELU(dwconv(a)) · v)``,
    ``a, v = fc1(x).chunk(2)``, hidden width ``hidden // 2``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden //= 2
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x, v = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.act(self.dwconv(x)) * v)


class Scale(nn.Module):
    """Learned per-channel scale of the last dimension."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class SwinGLUBlock(nn.Module):
    """``x·s1 + WMSA(LN(x))``, then ``x·s2 + ConvGLU(LN(x))`` on ``(B, H, W, C)``
    (the official ``ResScaleConvolutionGateBlock``)."""

    def __init__(self, dim: int, head_dim: int, window: int, shifted: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.msa = WindowAttention(dim, head_dim, window, shifted)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = ConvolutionalGLU(dim, 4 * dim)
        self.res_scale_1 = Scale(dim)
        self.res_scale_2 = Scale(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.res_scale_1(x) + self.msa(self.ln1(x))
        return self.res_scale_2(x) + self.mlp(self.ln2(x))


class SwinStage(nn.Module):
    """``x + conv3×3(blocks(x))``, blocks alternating plain and shifted windows (the
    official ``SwinBlockWithConvMulti``)."""

    def __init__(self, dim: int, head_dim: int, window: int, blocks: int):
        super().__init__()
        self.layers = nn.ModuleList(SwinGLUBlock(dim, head_dim, window, i % 2 == 1) for i in range(blocks))
        self.conv = conv(dim, dim, kernel_size=3, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        t = x.permute(0, 2, 3, 1)
        for layer in self.layers:
            t = layer(t)
        return self.conv(t.permute(0, 3, 1, 2)) + x


class SpatialAttention(nn.Module):
    """``sigmoid(conv7×7([mean_c(x), max_c(x)]))``, one map ``(B, 1, H, W)``."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.max(dim=1, keepdim=True)[0]], dim=1)
        return torch.sigmoid(self.conv1(stats))


class ConvWithDW(nn.Module):
    """1×1 conv, GELU, 3×3 depthwise conv, GELU, 1×1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_trans = nn.Conv2d(dim, dim, 1)
        self.act1 = nn.GELU()
        self.dw_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.act2 = nn.GELU()
        self.out_trans = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_trans(self.act2(self.dw_conv(self.act1(self.in_trans(x)))))


class DenseBlock(nn.Module):
    """Three chained ``GELU → ConvWithDW`` layers; ``proj`` (1×1) of all four outputs."""

    def __init__(self, dim: int, layers: int = 3):
        super().__init__()
        self.conv_layers = nn.ModuleList(nn.Sequential(nn.GELU(), ConvWithDW(dim)) for _ in range(layers))
        self.proj = nn.Conv2d(dim * (layers + 1), dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        outputs = [x]
        for layer in self.conv_layers:
            outputs.append(layer(outputs[-1]))
        return self.proj(torch.cat(outputs, dim=1))


class MultiScaleAggregation(nn.Module):
    """``s = conv1×1(x)``, ``d = dense(s)``, ``d · spatial_attention(d)`` on ``(B, H, W, C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.s = nn.Conv2d(dim, dim, 1)
        self.spatial_atte = SpatialAttention()
        self.dense = DenseBlock(dim)

    def forward(self, x: Tensor) -> Tensor:
        s = self.dense(self.s(x.permute(0, 3, 1, 2)))
        return (s * self.spatial_atte(s)).permute(0, 2, 3, 1)


class DictionaryCrossAttention(nn.Module):
    """Multi-scale dictionary cross attention (the official
    ``MutiScaleDictionaryCrossAttentionGLU``): the query ``(B, C_in, H, W)`` is projected
    to the dictionary width, refined by :class:`MultiScaleAggregation`, and attends, per
    head, over the dictionary entries; a ConvGLU MLP and a projection to ``out_dim``
    follow. Returns ``(B, out_dim, H, W)``."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, mlp_rate: int = 4):
        super().__init__()
        dim = DICT_HEAD_DIM * heads
        self.heads = heads
        self.scale = nn.Parameter(torch.ones(heads, 1, 1))
        self.x_trans = nn.Linear(in_dim, dim)
        self.ln_scale = nn.LayerNorm(dim)
        self.msa = MultiScaleAggregation(dim)
        self.lnx = nn.LayerNorm(dim)
        self.q_trans = nn.Linear(dim, dim)
        self.dict_ln = nn.LayerNorm(dim)
        self.k = nn.Linear(dim, dim)
        self.linear = nn.Linear(dim, dim)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = ConvolutionalGLU(dim, mlp_rate * dim)
        self.output_trans = nn.Sequential(nn.Linear(dim, out_dim))
        self.res_scale_1 = Scale(dim)
        self.res_scale_2 = Scale(dim)
        self.res_scale_3 = Scale(dim)

    def forward(self, x: Tensor, dictionary: Tensor) -> Tensor:
        b, _, height, width = x.shape
        e = self.heads
        x = self.x_trans(x.permute(0, 2, 3, 1))
        x = self.msa(self.ln_scale(x)) + self.res_scale_1(x)
        shortcut = x
        q = self.q_trans(self.lnx(x)).permute(0, 3, 1, 2)
        q = q.reshape(b, e, -1, height, width).permute(0, 1, 3, 4, 2).reshape(b, e, height * width, -1)
        dictionary = self.dict_ln(dictionary)
        n = dictionary.shape[1]
        k = self.k(dictionary).reshape(b, n, e, -1).permute(0, 2, 1, 3)
        v = dictionary.reshape(b, n, e, -1).permute(0, 2, 1, 3)
        sim = torch.einsum("benc,bedc->bend", q, k) * self.scale
        probs = F.softmax(sim, dim=-1)
        out = torch.einsum("bend,bedc->benc", probs, v)
        out = out.reshape(b, e, height, width, -1).permute(0, 2, 3, 1, 4).reshape(b, height, width, -1)
        out = self.linear(out) + self.res_scale_2(shortcut)
        out = self.mlp(self.ln_mlp(out)) + self.res_scale_3(out)
        return self.output_trans(out).permute(0, 3, 1, 2)


class DCAE(ChannelSliceModel):
    """DCAE (see the module docstring for the parameters)."""

    z_bottleneck_name = "entropy_bottleneck"

    def __init__(
        self,
        N: int = 192,
        M: int = 320,
        num_slices: int = 5,
        z_dim: int = 192,
        feature_dim: Sequence[int] = (96, 144, 256),
        block_num: Sequence[int] = (1, 2, 12),
        head_dim: Sequence[int] = (8, 16, 32, 32, 16, 8),
        dict_num: int = 128,
        dict_head_num: int = 20,
        cc_dim: Sequence[int] = (224, 128),
    ):
        super().__init__()
        self.slice_sizes = [M // num_slices] * num_slices
        size = M // num_slices
        f, n, h = list(feature_dim), list(block_num), list(head_dim)
        self.dt = nn.Parameter(torch.randn(dict_num, DICT_HEAD_DIM * dict_head_num))
        self.dt_cross_attention = nn.ModuleList(
            DictionaryCrossAttention(2 * M + size * i, M, dict_head_num) for i in range(num_slices)
        )
        self.g_a = nn.Sequential(
            ResidualBottleneckBlockWithStride(3, f[0]),
            SwinStage(f[0], h[0], WINDOW, n[0]),
            ResidualBottleneckBlockWithStride(f[0], f[1]),
            SwinStage(f[1], h[1], WINDOW, n[1]),
            ResidualBottleneckBlockWithStride(f[1], f[2]),
            SwinStage(f[2], h[2], WINDOW, n[2]),
            conv(f[2], M, kernel_size=5, stride=2),
        )
        self.g_s = nn.Sequential(
            deconv(M, f[2], kernel_size=5, stride=2),
            SwinStage(f[2], h[3], WINDOW, n[2]),
            ResidualBottleneckBlockWithUpsample(f[2], f[1]),
            SwinStage(f[1], h[4], WINDOW, n[1]),
            ResidualBottleneckBlockWithUpsample(f[1], f[0]),
            SwinStage(f[0], h[5], WINDOW, n[0]),
            ResidualBottleneckBlockWithUpsample(f[0], 3),
        )
        self.h_a = nn.Sequential(
            ResidualBottleneckBlockWithStride(M, N),
            SwinStage(N, HYPER_HEAD_DIM, HYPER_WINDOW, 1),
            conv(N, z_dim, kernel_size=3, stride=2),
        )
        self.h_z_s1 = self._hyper_synthesis(N, M, z_dim)
        self.h_z_s2 = self._hyper_synthesis(N, M, z_dim)
        support = [3 * M + size * i for i in range(num_slices)]
        self.cc_mean_transforms = nn.ModuleList(slice_transform(c, cc_dim, size) for c in support)
        self.cc_scale_transforms = nn.ModuleList(slice_transform(c, cc_dim, size) for c in support)
        self.lrp_transforms = nn.ModuleList(slice_transform(c + size, cc_dim, size) for c in support)
        self.entropy_bottleneck = EntropyBottleneck(z_dim)
        self.gaussian_conditional = GaussianConditional(None)

    @staticmethod
    def _hyper_synthesis(N: int, M: int, z_dim: int) -> nn.Sequential:
        return nn.Sequential(
            deconv(z_dim, N, kernel_size=3, stride=2),
            SwinStage(N, HYPER_HEAD_DIM, HYPER_WINDOW, 1),
            ResidualBottleneckBlockWithUpsample(N, M),
        )

    def hyper_context(self, z_hat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(latent_scales, latent_means, dictionary repeated over the batch)``."""
        return self.h_z_s1(z_hat), self.h_z_s2(z_hat), self.dt.repeat(z_hat.shape[0], 1, 1)

    def slice_parameters(
        self, index: int, context: tuple[Tensor, Tensor, Tensor], y_hat_slices: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        latent_scales, latent_means, dictionary = context
        query = torch.cat([latent_scales, latent_means, *y_hat_slices], dim=1)
        support = torch.cat([query, self.dt_cross_attention[index](query, dictionary)], dim=1)
        return self.cc_mean_transforms[index](support), self.cc_scale_transforms[index](support), support


# --------------------------------------------------------------------------- registry

_LISTS = {"feature_dim": 3, "block_num": 3, "head_dim": 6, "cc_dim": 2}


def infer_dcae_params(state_dict: Mapping[str, Tensor]) -> dict:
    """All DCAE parameters, read from the shapes of a state_dict."""
    feature_dim = [state_dict[f"g_a.{i}.conv.weight"].shape[0] for i in (0, 2, 4)]
    block_num = [count_indices(state_dict, f"g_a.{i}.layers.{{}}.ln1.weight") for i in (1, 3, 5)]
    stages = [("g_a", 1, 0), ("g_a", 3, 1), ("g_a", 5, 2), ("g_s", 1, 2), ("g_s", 3, 1), ("g_s", 5, 0)]
    head_dim = [
        feature_dim[d] // state_dict[f"{t}.{i}.layers.0.msa.relative_position_params"].shape[0] for t, i, d in stages
    ]
    heads = state_dict["dt_cross_attention.0.scale"].shape[0]
    cc = "cc_mean_transforms.0.{}.weight"
    return {
        "N": state_dict["h_a.0.conv.weight"].shape[0],
        "M": state_dict["g_a.6.weight"].shape[0],
        "num_slices": count_indices(state_dict, "cc_mean_transforms.{}.0.weight"),
        "z_dim": state_dict["entropy_bottleneck.quantiles"].shape[0],
        "feature_dim": feature_dim,
        "block_num": block_num,
        "head_dim": head_dim,
        "dict_num": state_dict["dt"].shape[0],
        "dict_head_num": heads,
        "cc_dim": [state_dict[cc.format(0)].shape[0], state_dict[cc.format(2)].shape[0]],
    }


def complete_dcae_params(params: dict) -> dict:
    """Check the DCAE parameters (types, list lengths, divisibility); lists as lists."""
    out = check_positive_ints("dcae", params, ("num_slices", "z_dim", "dict_num", "dict_head_num"), _LISTS)
    if out["M"] % out["num_slices"]:
        raise UserError(f"dcae: M={out['M']} is not a multiple of num_slices={out['num_slices']}")
    if out["N"] % HYPER_HEAD_DIM:
        raise UserError(f"dcae: N={out['N']} is not a multiple of {HYPER_HEAD_DIM} (the hyper transforms' head width)")
    stage_dims = out["feature_dim"] + out["feature_dim"][::-1]
    for dim, head in zip(stage_dims, out["head_dim"]):
        if dim % head:
            raise UserError(f"dcae: stage width {dim} is not a multiple of its head width {head} (head_dim)")
    return out


register_architecture(
    Architecture(
        name="dcae",
        cls=DCAE,
        entropy="channel-conditional",
        defaults={
            "N": 192,
            "M": 320,
            "num_slices": 5,
            "z_dim": 192,
            "feature_dim": [96, 144, 256],
            "block_num": [1, 2, 12],
            "head_dim": [8, 16, 32, 32, 16, 8],
            "dict_num": 128,
            "dict_head_num": 20,
            "cc_dim": [224, 128],
        },
        signature=frozenset(
            {
                "dt",
                "dt_cross_attention.0.scale",
                "g_a.0.conv.weight",
                "g_a.2.conv.weight",
                "g_a.4.conv.weight",
                "g_a.6.weight",
                "g_a.1.layers.0.msa.relative_position_params",
                "g_a.3.layers.0.msa.relative_position_params",
                "g_a.5.layers.0.msa.relative_position_params",
                "g_s.1.layers.0.msa.relative_position_params",
                "g_s.3.layers.0.msa.relative_position_params",
                "g_s.5.layers.0.msa.relative_position_params",
                "h_a.0.conv.weight",
                "h_z_s1.0.weight",
                "cc_mean_transforms.0.0.weight",
                "cc_mean_transforms.0.2.weight",
                "entropy_bottleneck.quantiles",
            }
        ),
        infer_params=infer_dcae_params,
        description="Lu et al. 2025, DCAE: dictionary cross-attention, channel slices + LRP (CVPR 2025)",
        complete_params=complete_dcae_params,
    )
)
