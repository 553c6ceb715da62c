"""CCA: the ``LICAutoencoder`` of LabShuHangGU/CCA (``models/vae.py``; paper
../shared/papers/cca.txt), channel-slice entropy model trained with a conditional
(skip-one-slice) auxiliary entropy model.

qft's own implementation, with the official inference state_dict layout (key names,
shapes, dtypes and order), so a release checkpoint loads unchanged once its training-only
keys are dropped.

- ``g_a``/``g_s``: four 5×5 stride-2 (transposed) convolutions with, between them, three
  residual bottleneck blocks and ``ae_layers[k]`` NAF blocks per stage (channel
  LayerNorm, simple gates, channel attention).
- ``h_a``; ``h_mean_s`` (→ latent means) and ``h_scale_s`` (→ latent scales).
- Entropy model (:class:`~qft.models.slices.ChannelSliceModel`): ``y.split(slices)``
  (uneven); slice ``i``: ``mean_support = mean_NAF_transforms[i](cat[latent_means, ŷ_<i])``,
  ``μ = mean_cc_transforms[i](mean_support)``,
  ``σ = scale_cc_transforms[i](scale_NAF_transforms[i](cat[latent_scales, ŷ_<i]))``; the
  LRP reads ``cat[mean_support, q + μ]``.

Training-only part: checkpoints written by the official ``train.py`` (``cca_training``
on by default) also hold ``aux_entropymodel.*`` (the auxiliary entropy model used only by
the CCA loss: 865 keys, 29.3M parameters). Inference never reads them; a loader drops the
keys starting with one of :data:`TRAINING_ONLY_KEYS` before the strict key check (the
official ``eval.py`` loads with ``strict=False`` instead, which would also hide real
mismatches).

Parameters (``qft init --arch cca --set NAME=VALUE``; defaults = the release, eval.py):

=============  =============================  ==========================================
``M``          320                            channels of ``y``
``slices``     auto: 8,28,56,92,136 at 320    slice sizes (sum M); auto = the release's
                                              proportions ``k^1.7``, k=1…5, floored, the
                                              remainder added to the last
``ae_dim``     192,224,256                    channels of the three g_a/g_s stages
``ae_layers``  4,4,4                          NAF blocks per stage
``em_dim``     224                            width of the NAF slice transforms
``em_layers``  4                              NAF blocks per slice transform
``z_dim``      192                            channels of ``z`` (hard-coded officially)
``cc_dim``     224,128                        hidden widths of the μ/σ and LRP transforms
=============  =============================  ==========================================

A tiny model for tests: ``M=24, slices=2,4,6,6,6, ae_dim=8,8,16, ae_layers=1,1,1,
em_dim=8, em_layers=1, z_dim=8, cc_dim=8,8``.
"""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence

import torch

from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models.sensetime import ResidualBottleneckBlock
from compressai.models.utils import conv, deconv
from torch import Tensor, nn

from qft.errors import UserError

from .registry import Architecture, register_architecture
from .slices import ChannelSliceModel, check_positive_ints, count_indices, is_positive_int, slice_transform

__all__ = ["CCA", "TRAINING_ONLY_KEYS", "complete_cca_params", "infer_cca_params", "release_slices"]

#: Key prefixes of the official training checkpoints that inference never reads (the
#: auxiliary entropy model of the CCA loss); a loader drops them, then loads strictly.
TRAINING_ONLY_KEYS = ("aux_entropymodel.",)

#: exponent of the release's slice proportions ``k**1.7`` (eval.py's ``--prop-slices``)
RELEASE_SLICE_EXPONENT = 1.7


def release_slices(M: int, num_slices: int = 5) -> list[int]:
    """Slice sizes of the release for ``M`` channels: proportional to ``k**1.7``, floored,
    the remainder added to the last slice (``[8, 28, 56, 92, 136]`` for ``M = 320``)."""
    props = [k**RELEASE_SLICE_EXPONENT for k in range(1, num_slices + 1)]
    sizes = [math.floor(1.0 * M / sum(props) * p) for p in props]
    sizes[-1] += M - sum(sizes)
    return sizes


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(B, C, H, W)`` (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight.view(1, c, 1, 1) * y + self.bias.view(1, c, 1, 1)


class SimpleGate(nn.Module):
    """``a · b`` of the two channel halves."""

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class NAFBlock(nn.Module):
    """NAFNet block: ``x + β·conv1(SCA(SG(dwconv(LN(x)))))``, then ``+ γ·FFN(LN(·))``."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.Conv2d(2 * dim, 2 * dim, 3, 1, 1, groups=2 * dim))
        self.sg = SimpleGate()
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dim, dim, 1))
        self.FFN = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), SimpleGate(), nn.Conv2d(dim, dim, 1))
        self.norm1 = LayerNorm2d(dim)
        self.norm2 = LayerNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        t = self.sg(self.dwconv(self.norm1(x)))
        t = self.conv1(t * self.sca(t))
        x = x + t * self.beta
        return x + self.FFN(self.norm2(x)) * self.gamma


class NAFTransform(nn.Module):
    """``out_conv(in_conv(x) + NAF blocks(in_conv(x)))`` (the official ``blocks``)."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, inter_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(NAFBlock(inter_dim) for _ in range(layers))
        self.in_conv = conv(in_dim, inter_dim, kernel_size=1, stride=1)
        self.out_conv = conv(inter_dim, out_dim, kernel_size=1, stride=1)

    def forward(self, x: Tensor) -> Tensor:
        identity = out = self.in_conv(x)
        for block in self.blocks:
            out = block(out)
        return self.out_conv(out + identity)


class Encoder(nn.Module):
    """``down[k]`` (5×5, stride 2) then stage ``k`` (3 residual bottleneck + NAF blocks),
    ``k = 0…2``; ``down[3]`` to ``M`` channels."""

    def __init__(self, M: int, dims: Sequence[int], layers: Sequence[int]):
        super().__init__()
        widths = [3, *dims, M]
        self.down = nn.ModuleList(conv(widths[i], widths[i + 1], kernel_size=5, stride=2) for i in range(len(dims) + 1))
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResidualBottleneckBlock(d, d) for _ in range(3)], *[NAFBlock(d) for _ in range(n)])
            for d, n in zip(dims, layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for down, stage in zip(self.down, self.blocks):
            x = stage(down(x))
        return self.down[-1](x)


class Decoder(nn.Module):
    """The mirror of :class:`Encoder`: ``up[k]`` (5×5 transposed, stride 2) then NAF +
    3 residual bottleneck blocks, widest stage first."""

    def __init__(self, M: int, dims: Sequence[int], layers: Sequence[int]):
        super().__init__()
        widths = [3, *dims, M]
        self.up = nn.ModuleList(
            deconv(widths[i + 1], widths[i], kernel_size=5, stride=2) for i in reversed(range(len(dims) + 1))
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(*[NAFBlock(d) for _ in range(n)], *[ResidualBottleneckBlock(d, d) for _ in range(3)])
            for d, n in zip(dims[::-1], layers[::-1])
        )

    def forward(self, x: Tensor) -> Tensor:
        for up, stage in zip(self.up, self.blocks):
            x = stage(up(x))
        return self.up[-1](x)


def _hyper_synthesis(z_dim: int, width: int, M: int) -> nn.Sequential:
    return nn.Sequential(
        deconv(z_dim, width, stride=2, kernel_size=5),
        nn.GELU(),
        deconv(width, width, stride=2, kernel_size=5),
        nn.GELU(),
        deconv(width, M, stride=1, kernel_size=3),
    )


class CCA(ChannelSliceModel):
    """CCA's ``LICAutoencoder`` at inference (see the module docstring for the parameters)."""

    z_bottleneck_name = "z_entropy_bottleneck"

    def __init__(
        self,
        M: int = 320,
        slices: Sequence[int] | None = None,
        ae_dim: Sequence[int] = (192, 224, 256),
        ae_layers: Sequence[int] = (4, 4, 4),
        em_dim: int = 224,
        em_layers: int = 4,
        z_dim: int = 192,
        cc_dim: Sequence[int] = (224, 128),
    ):
        super().__init__()
        self.slice_sizes = list(slices) if slices is not None else release_slices(M)
        s = self.slice_sizes
        width = ae_dim[-1]
        self.g_a = Encoder(M, ae_dim, ae_layers)
        self.g_s = Decoder(M, ae_dim, ae_layers)
        self.h_a = nn.Sequential(
            conv(M, width, stride=1, kernel_size=3),
            nn.GELU(),
            conv(width, width, stride=2, kernel_size=5),
            nn.GELU(),
            conv(width, z_dim, stride=2, kernel_size=5),
        )
        self.h_mean_s = _hyper_synthesis(z_dim, width, M)
        self.h_scale_s = _hyper_synthesis(z_dim, width, M)
        support = [M + sum(s[:i]) for i in range(len(s))]
        self.mean_NAF_transforms = nn.ModuleList(NAFTransform(c, c, em_layers, em_dim) for c in support)
        self.scale_NAF_transforms = nn.ModuleList(NAFTransform(c, c, em_layers, em_dim) for c in support)
        self.mean_cc_transforms = nn.ModuleList(slice_transform(c, cc_dim, n) for c, n in zip(support, s))
        self.scale_cc_transforms = nn.ModuleList(slice_transform(c, cc_dim, n) for c, n in zip(support, s))
        self.lrp_transforms = nn.ModuleList(slice_transform(c + n, cc_dim, n) for c, n in zip(support, s))
        self.z_entropy_bottleneck = EntropyBottleneck(z_dim)
        self.gaussian_conditional = GaussianConditional(None)

    def hyper_context(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        """``(latent_means, latent_scales)``."""
        return self.h_mean_s(z_hat), self.h_scale_s(z_hat)

    def slice_parameters(
        self, index: int, context: tuple[Tensor, Tensor], y_hat_slices: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        latent_means, latent_scales = context
        mean_support = self.mean_NAF_transforms[index](torch.cat([latent_means, *y_hat_slices], dim=1))
        scale_support = self.scale_NAF_transforms[index](torch.cat([latent_scales, *y_hat_slices], dim=1))
        mu = self.mean_cc_transforms[index](mean_support)
        return mu, self.scale_cc_transforms[index](scale_support), mean_support


# --------------------------------------------------------------------------- registry

_LISTS = {"ae_dim": 3, "ae_layers": 3, "cc_dim": 2}


def infer_cca_params(state_dict: Mapping[str, Tensor]) -> dict:
    """All CCA parameters, read from the shapes of a state_dict (slices explicit)."""
    cc = "mean_cc_transforms.0.{}.weight"
    return {
        "M": state_dict["g_a.down.3.weight"].shape[0],
        "slices": [
            state_dict[f"mean_cc_transforms.{i}.4.weight"].shape[0]
            for i in range(count_indices(state_dict, "mean_cc_transforms.{}.4.weight"))
        ],
        "ae_dim": [state_dict[f"g_a.down.{i}.weight"].shape[0] for i in range(3)],
        "ae_layers": [count_indices(state_dict, f"g_a.blocks.{i}.{{}}.conv1.weight") - 3 for i in range(3)],
        "em_dim": state_dict["mean_NAF_transforms.0.in_conv.weight"].shape[0],
        "em_layers": count_indices(state_dict, "mean_NAF_transforms.0.blocks.{}.beta"),
        "z_dim": state_dict["z_entropy_bottleneck.quantiles"].shape[0],
        "cc_dim": [state_dict[cc.format(0)].shape[0], state_dict[cc.format(2)].shape[0]],
    }


def complete_cca_params(params: dict) -> dict:
    """Fill ``slices = None`` with the release's proportions; check types and sums."""
    out = check_positive_ints("cca", params, ("em_dim", "em_layers", "z_dim"), _LISTS)
    slices = out["slices"]
    if slices is None:
        slices = release_slices(out["M"])
    if not isinstance(slices, (list, tuple)) or not slices or not all(map(is_positive_int, slices)):
        empty = " (at this M the release's proportions leave a slice empty; give slices)"
        hint = empty if out["slices"] is None else ""
        raise UserError(f"cca: slices must be positive integers summing to M={out['M']}, got {slices!r}{hint}")
    if sum(slices) != out["M"]:
        raise UserError(f"cca: slices {list(slices)} sum to {sum(slices)}, not M={out['M']}")
    out["slices"] = list(slices)
    return out


register_architecture(
    Architecture(
        name="cca",
        cls=CCA,
        entropy="channel-conditional",
        defaults={
            "M": 320,
            "slices": None,
            "ae_dim": [192, 224, 256],
            "ae_layers": [4, 4, 4],
            "em_dim": 224,
            "em_layers": 4,
            "z_dim": 192,
            "cc_dim": [224, 128],
        },
        signature=frozenset(
            {
                "g_a.down.0.weight",
                "g_a.down.1.weight",
                "g_a.down.2.weight",
                "g_a.down.3.weight",
                "g_a.blocks.0.0.conv1.weight",
                "mean_NAF_transforms.0.in_conv.weight",
                "mean_NAF_transforms.0.blocks.0.beta",
                "mean_cc_transforms.0.0.weight",
                "mean_cc_transforms.0.2.weight",
                "mean_cc_transforms.0.4.weight",
                "z_entropy_bottleneck.quantiles",
            }
        ),
        infer_params=infer_cca_params,
        description="CCA (LabShuHangGU): NAF transforms, uneven channel slices + LRP, aux. entropy model in training",
        complete_params=complete_cca_params,
        training_only=TRAINING_ONLY_KEYS,
    )
)
