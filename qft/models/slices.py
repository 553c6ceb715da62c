"""Channel-slice entropy models with latent residual prediction (TCM, DCAE, CCA).

The latent ``y`` is split along its channels into slices ``y_0 … y_{S-1}``, coded in this
order, one coding step per slice. Step ``i``::

    context             = hyper_context(ẑ)                       (once, before step 0)
    μ_i, σ_i, support_i = slice_parameters(i, context, [ŷ_0 … ŷ_{i-1}])
    q_i                 = round(y_i − μ_i)                        (int32 symbols, coded)
    ŷ_i                 = q_i + μ_i + 0.5·tanh(lrp_transforms[i](cat[support_i, q_i + μ_i]))

``μ_i, σ_i`` depend only on ``ẑ`` and the *final* (LRP-corrected) earlier slices, never on
``y_i``; the LRP reads the dequantized slice. The decoder repeats the same computation
from the decoded symbols, so encoder and decoder see bit-identical ``μ, σ`` as long as
both run the entropy path on the same device type with the same weights.

Streams are those of the official implementations (one ``BufferedRansEncoder`` per image
for all slices, symbols appended slice by slice in ``(C, H, W)`` order)::

    compress(x)  -> {"strings": [[y_string per image], z_strings], "shape": (zh, zw)}
    decompress(strings, shape) -> {"x_hat": x̂ clamped to [0, 1]}

``y`` is ``4×`` the size of ``z``; the decoder derives it from ``shape``, so images must be
padded to a multiple of 64 (:func:`qft.codec.pad` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from compressai.ans import BufferedRansEncoder, RansDecoder
from compressai.models import CompressionModel
from compressai.models.utils import conv
from compressai.ops import quantize_ste
from torch import Tensor, nn

from qft.errors import UserError

from .registry import ARCHITECTURES

__all__ = [
    "ChannelSliceModel",
    "check_coding_size",
    "check_positive_ints",
    "count_indices",
    "gaussian_tables",
    "is_positive_int",
    "slice_transform",
]


def slice_transform(in_ch: int, hidden: Sequence[int], out_ch: int) -> nn.Sequential:
    """3×3 conv, GELU, 3×3 conv, GELU, 3×3 conv: the μ, σ and LRP transforms of a slice
    (``hidden``: the two hidden widths, 224 and 128 in the releases)."""
    return nn.Sequential(
        conv(in_ch, hidden[0], kernel_size=3, stride=1),
        nn.GELU(),
        conv(hidden[0], hidden[1], kernel_size=3, stride=1),
        nn.GELU(),
        conv(hidden[1], out_ch, kernel_size=3, stride=1),
    )


def count_indices(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    """How many consecutive indices ``k = 0, 1, …`` have ``pattern.format(k)`` in
    ``state_dict`` (a count of blocks or slices, for reading parameters from shapes)."""
    k = 0
    while pattern.format(k) in state_dict:
        k += 1
    return k


def is_positive_int(value: Any) -> bool:
    """A positive ``int`` (``bool`` excluded), as architecture parameters must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_positive_ints(
    arch: str, params: Mapping[str, Any], ints: Sequence[str] = (), lists: Mapping[str, int] | None = None
) -> dict:
    """A copy of ``params`` in which each key of ``ints`` is checked to be a positive
    ``int``, and each key of ``lists`` a list or tuple of that many positive ``int``s
    (returned as a list).

    Raises:
        UserError: ``"{arch}: {key} must be a positive integer, got …"`` or
            ``"{arch}: {key} must be {length} positive integers, got …"``.
    """
    out = dict(params)
    for key in ints:
        if not is_positive_int(out[key]):
            raise UserError(f"{arch}: {key} must be a positive integer, got {out[key]!r}")
    for key, length in (lists or {}).items():
        value = out[key]
        if not isinstance(value, (list, tuple)) or len(value) != length or not all(map(is_positive_int, value)):
            raise UserError(f"{arch}: {key} must be {length} positive integers, got {value!r}")
        out[key] = list(value)
    return out


def check_coding_size(model: nn.Module, x: Tensor) -> None:
    """Guard of the step-coded models' own ``compress``.

    Raises:
        ValueError: ``x``'s height or width is not a multiple of 64 (the decoder derives
            y's size from z's, so the image must be padded first).
    """
    if x.shape[-2] % 64 or x.shape[-1] % 64:
        raise ValueError(
            f"{type(model).__name__}.compress needs H and W multiples of 64 "
            f"(the decoder derives y's size from z's), got {tuple(x.shape[-2:])}; pad the image"
        )


def gaussian_tables(model: nn.Module, z_bottleneck: nn.Module) -> tuple[list, list, list]:
    """The Gaussian CDF tables of ``model.gaussian_conditional`` as CompressAI's rANS coder
    takes them (``cdf``, ``cdf_lengths``, ``offsets``).

    Raises:
        ValueError: the tables (or those of ``z_bottleneck``) are not built yet.
    """
    gc = model.gaussian_conditional
    if gc.quantized_cdf.numel() == 0 or z_bottleneck.quantized_cdf.numel() == 0:
        raise ValueError(f"{type(model).__name__}: CDF tables not built; run update(force=True) first")
    return (
        gc.quantized_cdf.tolist(),
        gc.cdf_length.reshape(-1).int().tolist(),
        gc.offset.reshape(-1).int().tolist(),
    )


class ChannelSliceModel(CompressionModel):
    """Base of the channel-slice models: ``forward``, ``compress`` and ``decompress``.

    A subclass builds ``g_a``, ``g_s``, ``h_a``, the z ``EntropyBottleneck`` (attribute
    named by :attr:`z_bottleneck_name`), ``gaussian_conditional``, ``lrp_transforms``, sets
    :attr:`slice_sizes`, and implements :meth:`hyper_context` and :meth:`slice_parameters`.
    """

    #: attribute name of the EntropyBottleneck of ``z`` (as in the official state_dict)
    z_bottleneck_name = "entropy_bottleneck"

    #: channels of each slice of ``y``, in coding order
    slice_sizes: list[int]

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> ChannelSliceModel:
        """CompressAI's constructor from a complete state_dict: a model at the parameters
        its registered architecture's ``infer_params`` reads from the shapes, loaded with
        CompressAI's ``load_state_dict`` (legacy EntropyBottleneck names accepted;
        training-only keys must be dropped first)."""
        arch = next((a for a in ARCHITECTURES.values() if a.cls is cls), None)
        if arch is None:
            raise TypeError(f"{cls.__name__} is not a registered architecture; build it from its parameters")
        model = cls(**arch.infer_params(state_dict))
        model.load_state_dict(state_dict)
        return model

    @property
    def z_bottleneck(self):
        return getattr(self, self.z_bottleneck_name)

    @property
    def num_slices(self) -> int:
        return len(self.slice_sizes)

    def hyper_context(self, z_hat: Tensor) -> Any:
        """What every slice step reads from ``ẑ`` (the hyper-synthesis outputs)."""
        raise NotImplementedError

    def slice_parameters(
        self, index: int, context: Any, y_hat_slices: Sequence[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(μ, σ, support)`` of slice ``index`` from the hyper context and the final
        values of the earlier slices; ``support`` is what the slice's LRP reads besides
        the dequantized slice."""
        raise NotImplementedError

    def slice_reconstruction(self, index: int, support: Tensor, y_hat_slice: Tensor) -> Tensor:
        """The final slice: dequantized values plus the latent residual prediction
        ``0.5·tanh(lrp_transforms[index](cat[support, ŷ]))``."""
        lrp = self.lrp_transforms[index](torch.cat([support, y_hat_slice], dim=1))
        return y_hat_slice + 0.5 * torch.tanh(lrp)

    # ------------------------------------------------------------------ training / estimate

    def forward(self, x: Tensor) -> dict:
        """``{"x_hat", "likelihoods": {"y", "z"}}``; ``ŷ`` by straight-through rounding
        around ``μ`` (the coding path's values), likelihoods with uniform noise in
        training mode (CompressAI's ``GaussianConditional``/``EntropyBottleneck``)."""
        y = self.g_a(x)
        z = self.h_a(y)
        _, z_likelihoods = self.z_bottleneck(z)
        medians = self.z_bottleneck.quantiles[:, :, 1:2]
        z_hat = quantize_ste(z - medians) + medians
        context = self.hyper_context(z_hat)
        y_hat_slices: list[Tensor] = []
        likelihoods = []
        for i, y_slice in enumerate(y.split(self.slice_sizes, dim=1)):
            mu, scale, support = self.slice_parameters(i, context, y_hat_slices)
            _, slice_likelihoods = self.gaussian_conditional(y_slice, scale, mu)
            likelihoods.append(slice_likelihoods)
            y_hat_slice = quantize_ste(y_slice - mu) + mu
            y_hat_slices.append(self.slice_reconstruction(i, support, y_hat_slice))
        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1))
        return {
            "x_hat": x_hat,
            "likelihoods": {"y": torch.cat(likelihoods, dim=1), "z": z_likelihoods},
        }

    # ------------------------------------------------------------------ coding (USQ)

    def compress(self, x: Tensor) -> dict:
        """Code images ``(B, 3, H, W)``, ``H`` and ``W`` multiples of 64, with rounding
        around ``μ`` (USQ); one y string and one z string per image."""
        check_coding_size(self, x)
        cdf, cdf_lengths, offsets = gaussian_tables(self, self.z_bottleneck)
        gc = self.gaussian_conditional
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.z_bottleneck.compress(z)
        z_hat = self.z_bottleneck.decompress(z_strings, z.shape[-2:])
        context = self.hyper_context(z_hat)
        encoders = [BufferedRansEncoder() for _ in range(y.shape[0])]
        y_hat_slices: list[Tensor] = []
        for i, y_slice in enumerate(y.split(self.slice_sizes, dim=1)):
            mu, scale, support = self.slice_parameters(i, context, y_hat_slices)
            indexes = gc.build_indexes(scale)
            symbols = gc.quantize(y_slice, "symbols", mu)
            for b, encoder in enumerate(encoders):
                encoder.encode_with_indexes(
                    symbols[b].reshape(-1).tolist(), indexes[b].reshape(-1).tolist(), cdf, cdf_lengths, offsets
                )
            y_hat_slices.append(self.slice_reconstruction(i, support, gc.dequantize(symbols, mu)))
        y_strings = [encoder.flush() for encoder in encoders]
        return {"strings": [y_strings, z_strings], "shape": z.shape[-2:]}

    def decompress(self, strings: Sequence[Sequence[bytes]], shape: Sequence[int]) -> dict:
        """Decode :meth:`compress`'s ``strings`` given ``z``'s spatial ``shape``."""
        if len(strings) != 2 or len(strings[0]) != len(strings[1]):
            raise ValueError("expected strings [[y_string per image], [z_string per image]]")
        cdf, cdf_lengths, offsets = gaussian_tables(self, self.z_bottleneck)
        gc = self.gaussian_conditional
        z_hat = self.z_bottleneck.decompress(strings[1], shape)
        context = self.hyper_context(z_hat)
        height, width = 4 * z_hat.shape[2], 4 * z_hat.shape[3]
        decoders = []
        for y_string in strings[0]:
            decoder = RansDecoder()
            decoder.set_stream(y_string)
            decoders.append(decoder)
        y_hat_slices: list[Tensor] = []
        for i, channels in enumerate(self.slice_sizes):
            mu, scale, support = self.slice_parameters(i, context, y_hat_slices)
            indexes = gc.build_indexes(scale)
            symbols = torch.stack(
                [
                    torch.tensor(
                        decoder.decode_stream(indexes[b].reshape(-1).tolist(), cdf, cdf_lengths, offsets),
                        dtype=torch.int32,
                    ).reshape(channels, height, width)
                    for b, decoder in enumerate(decoders)
                ]
            ).to(mu.device)
            y_hat_slices.append(self.slice_reconstruction(i, support, gc.dequantize(symbols, mu)))
        x_hat = self.g_s(torch.cat(y_hat_slices, dim=1)).clamp_(0, 1)
        return {"x_hat": x_hat}
