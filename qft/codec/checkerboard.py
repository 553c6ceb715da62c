"""Coding steps of the checkerboard models: MLIC++ and ELIC (:mod:`qft.codec.steps`).

Both split ``y`` into channel groups (MLIC++: ``slice_num`` equal slices; ELIC: CompressAI's
uneven ``groups``) and each group into two checkerboard halves, coded anchors first. Step
``2k`` is the anchors of group ``k``, step ``2k + 1`` its non-anchors::

    step 2k      μ, σ from ẑ and the final groups < k                   (anchors)
    step 2k + 1  μ, σ from ẑ, the final groups < k and the final anchors of group k

A step's layout is its half squeezed to ``(C_k, H, W/2)``
(:func:`qft.models.layers.squeeze_checkerboard`): row ``r`` holds the half's elements of
latent row ``r``, left to right, as the official MLIC++ stream and CompressAI's
``CheckerboardLatentCodec`` order them; a trellis chain runs along those squeezed rows
(docs/design.md, "Checkerboard steps (MLIC++, ELIC)").

- :class:`MLICppSteps`: :class:`qft.models.mlicpp.MLICPlusPlus` through its public step
  methods (``hyper_context``, ``anchor_parameters``, ``nonanchor_parameters``, ``lrp``);
  anchors at ``(row + col)`` odd; each half's final values carry its LRP.
- :class:`ElicSteps`: CompressAI's ``Elic2022Official`` / ``Elic2022Chandelier`` through
  their own modules (``HyperLatentCodec.h_s``, ``ChannelGroupsLatentCodec`` channel
  contexts and ``merge_y``/``merge_params``, each group's ``CheckerboardLatentCodec``
  ``unembed``/``embed``, ``context_prediction``, ``entropy_parameters``); anchors at the
  parity of the group codecs' ``anchor_parity``; no LRP.

As for the other kinds, the entropy path runs on a CPU copy of the entropy modules
(``g_a``, ``g_s`` not copied) in ``dtype`` (float64: the codec's; float32: the model's
own arithmetic, whose USQ coding equals the model's ``compress``).
"""

from __future__ import annotations

import numpy as np
import torch

from compressai.latent_codecs import (
    ChannelGroupsLatentCodec,
    CheckerboardLatentCodec,
    GaussianConditionalLatentCodec,
    HyperpriorLatentCodec,
)

from qft.codec.steps import LatentSteps, StepContext, channel_slices, check_scale_table, entropy_copy, float32_sigma
from qft.models.layers import scatter_checkerboard, squeeze_checkerboard, unsqueeze_checkerboard
from qft.models.mlicpp import ANCHOR_PARITY, MLICPlusPlus

__all__ = ["CheckerboardSteps", "ElicSteps", "MLICppSteps", "checkerboard_steps"]


class CheckerboardSteps(LatentSteps):
    """Two steps per channel group (anchors, then non-anchors), each in the squeezed
    layout of its half. Subclasses set :attr:`anchor_parity` and :attr:`slices` (each
    group's channels, twice: once per half)."""

    #: ``(row + col) % 2`` of the anchors
    anchor_parity: int
    dtype: torch.dtype

    def parity(self, index: int) -> int:
        """The checkerboard parity of step ``index``'s half."""
        return self.anchor_parity if index % 2 == 0 else 1 - self.anchor_parity

    def gather(self, index: int, array: np.ndarray) -> np.ndarray:
        return squeeze_checkerboard(array[self.slices[index]], self.parity(index))

    def scatter(self, index: int, out: np.ndarray, part: np.ndarray) -> None:
        scatter_checkerboard(out[self.slices[index]], part, self.parity(index))

    def half(self, index: int, part: np.ndarray) -> torch.Tensor:
        """Step ``index``'s values ``part`` (its layout) on the full map ``(1, C_k, H, W)``
        in ``dtype``, zeros at the other half."""
        return unsqueeze_checkerboard(torch.from_numpy(part)[None].to(self.dtype), self.parity(index))

    def groups(self, ctx: StepContext) -> list[torch.Tensor]:
        """The final values of every group whose two halves are committed, ``(1, C_k, H,
        W)`` each in ``dtype``."""
        return [
            self.half(2 * k, ctx.finals[2 * k]) + self.half(2 * k + 1, ctx.finals[2 * k + 1])
            for k in range(len(ctx.finals) // 2)
        ]

    def squeezed(self, index: int, full: torch.Tensor) -> torch.Tensor:
        """Step ``index``'s half of a full map ``(1, C, H, W)``, as ``(C, H, W/2)``."""
        return squeeze_checkerboard(full[0], self.parity(index))

    def check_order(self, ctx: StepContext, index: int) -> None:
        """Raises ``ValueError`` unless exactly the steps before ``index`` are committed."""
        if len(ctx.finals) != index:
            raise ValueError(f"parameters of step {index} asked after {len(ctx.finals)} committed steps")


class MLICppSteps(CheckerboardSteps):
    """The ``2 · slice_num`` steps of MLIC++ (module docstring), with its LRP: the final
    anchors are ``â + lrp_anchor(…, â)``, the final non-anchors ``n̂ + lrp_nonanchor(…, â + n̂)``
    (at their own positions; :meth:`MLICPlusPlus.lrp`)."""

    anchor_parity = ANCHOR_PARITY

    def __init__(self, model: MLICPlusPlus, dtype: torch.dtype = torch.float64):
        check_scale_table(model, model.gaussian_conditional)
        self.model, self.dtype = model, dtype
        self.entropy_model = entropy_copy(model, dtype, skip=(model.g_a, model.g_s))
        self.z_bottleneck = model.entropy_bottleneck
        self.slices = channel_slices([model.slice_ch] * model.slice_num, repeat=2)

    def hyper_analysis(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.h_a(y)

    @torch.no_grad()
    def contexts(self, z_hat: torch.Tensor) -> list[StepContext]:
        z = z_hat.to("cpu", self.dtype)
        shape = (self.model.M, 4 * z.shape[-2], 4 * z.shape[-1])
        return [StepContext(self.entropy_model.hyper_context(z[i : i + 1]), shape) for i in range(z.shape[0])]

    def _shared(self, ctx: StepContext, k: int, earlier: list[torch.Tensor]) -> list[torch.Tensor]:
        """The anchor step's inter and channel contexts of slice ``k`` (kept in
        ``ctx.support`` by that step; recomputed when the support is another slice's)."""
        if ctx.support is not None and ctx.support[0] == k:
            return ctx.support[1]
        return self.entropy_model.anchor_parameters(k, ctx.hyper[0], earlier)[2]

    @torch.no_grad()
    def parameters(self, ctx: StepContext, index: int) -> tuple[np.ndarray, np.ndarray]:
        self.check_order(ctx, index)
        k, nonanchor = divmod(index, 2)
        em, hyper, earlier = self.entropy_model, ctx.hyper[0], self.groups(ctx)
        if nonanchor:
            shared = self._shared(ctx, k, earlier)
            anchors = self.half(index - 1, ctx.finals[-1])
            scales, means = em.nonanchor_parameters(k, hyper, earlier, anchors, shared)
        else:
            scales, means, shared = em.anchor_parameters(k, hyper, earlier)
            ctx.support = (k, shared)
        return self.squeezed(index, means).float().numpy(), float32_sigma(self.squeezed(index, scales))

    @torch.no_grad()
    def correction(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> np.ndarray:
        k, nonanchor = divmod(index, 2)
        values = self.half(index, y_hat)
        if nonanchor:
            values = self.half(index - 1, ctx.finals[index - 1]) + values
        residual = self.entropy_model.lrp(k, not nonanchor, ctx.hyper[1], self.groups(ctx), values)
        return self.squeezed(index, values + residual).float().numpy()


class ElicSteps(CheckerboardSteps):
    """The ``2 · len(groups)`` steps of CompressAI's ELIC models (module docstring), as
    their ``compress`` computes them: the side parameters ``h_s(ẑ)`` (with the channel
    context of the earlier groups for ``k > 0``, ``merge_params``) split into the halves by
    the group codec's ``unembed``; anchors from a zero spatial context, non-anchors from
    ``context_prediction`` of the embedded final anchors; ``entropy_parameters`` on the
    squeezed halves; ``σ, μ`` in the order of the Gaussian codec's ``chunks``."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.float64):
        codec = getattr(model, "latent_codec", None)
        groups = codec["y"] if isinstance(codec, HyperpriorLatentCodec) else None
        if not isinstance(groups, ChannelGroupsLatentCodec) or not all(
            isinstance(c, CheckerboardLatentCodec) and isinstance(c["y"], GaussianConditionalLatentCodec)
            for c in groups.latent_codec.values()
        ):
            raise ValueError(
                f"{type(model).__name__} is not an ELIC model (a hyperprior latent codec of channel groups, "
                "each a checkerboard codec of a Gaussian conditional)"
            )
        parities = {c.anchor_parity for c in groups.latent_codec.values()}
        if len(parities) != 1:
            raise ValueError(f"{type(model).__name__}: its groups' anchor parities differ ({sorted(parities)})")
        for c in groups.latent_codec.values():
            check_scale_table(model, c["y"].gaussian_conditional)
        self.anchor_parity = {"even": 0, "odd": 1}[parities.pop()]
        self.model, self.dtype = model, dtype
        hyper = codec["hyper"]
        self.codec = entropy_copy(codec, dtype, skip=(hyper.h_a,))
        self.z_bottleneck = hyper.entropy_bottleneck
        self.slices = channel_slices(groups.groups, repeat=2)

    def hyper_analysis(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.latent_codec["hyper"].h_a(y)

    @torch.no_grad()
    def contexts(self, z_hat: torch.Tensor) -> list[StepContext]:
        z = z_hat.to("cpu", self.dtype)
        side = self.codec["hyper"].h_s(z)
        shape = (self.slices[-1].stop, 4 * z.shape[-2], 4 * z.shape[-1])
        return [StepContext(side[i : i + 1], shape) for i in range(z.shape[0])]

    def _side(self, ctx: StepContext, k: int) -> torch.Tensor:
        """Group ``k``'s context parameters, split into the halves ``(2, 1, C', H, W/2)``
        (kept in ``ctx.support`` by its anchor step)."""
        if ctx.support is not None and ctx.support[0] == k:
            return ctx.support[1]
        groups = self.codec["y"]
        params = ctx.hyper
        if k:
            channel = groups.channel_context[f"y{k}"](groups.merge_y(*self.groups(ctx)))
            params = groups.merge_params(channel, params)
        side = groups.latent_codec[f"y{k}"].unembed(params)
        ctx.support = (k, side)
        return side

    @torch.no_grad()
    def parameters(self, ctx: StepContext, index: int) -> tuple[np.ndarray, np.ndarray]:
        self.check_order(ctx, index)
        k, nonanchor = divmod(index, 2)
        side = self._side(ctx, k)
        cb = self.codec["y"].latent_codec[f"y{k}"]
        if nonanchor:
            anchors = torch.from_numpy(ctx.finals[-1])[None].to(self.dtype)
            halves = torch.stack([anchors, torch.zeros_like(anchors)])
            spatial = cb.unembed(cb.context_prediction(cb.embed(halves)))[1]
        else:
            h, w = side.shape[-2:]
            spatial = side.new_zeros((1, cb.context_prediction.out_channels, h, w))
        gaussian = cb["y"]
        params = gaussian.entropy_parameters(cb.entropy_parameters(cb.merge(spatial, side[nonanchor])))
        named = dict(zip(gaussian.chunks, params.chunk(2, dim=1), strict=True))
        return named["means"][0].float().numpy(), float32_sigma(named["scales"][0])

    def correction(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> None:
        return None


def checkerboard_steps(model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> CheckerboardSteps:
    """The coding steps of a ``channel-checkerboard`` model: MLIC++ or ELIC.

    Raises:
        ValueError: neither an :class:`MLICPlusPlus` nor an ELIC model.
    """
    if isinstance(model, MLICPlusPlus):
        return MLICppSteps(model, dtype)
    return ElicSteps(model, dtype)
