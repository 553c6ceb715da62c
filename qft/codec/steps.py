"""Coding steps: the order in which an entropy model gives the parameters of its latent.

Every entropy model qft quantizes codes its latent ``y`` ``(C, H, W)`` as a sequence of
*steps*. Step ``i`` yields ``μ, σ`` for its elements from ``ẑ`` and the *final* values of
the earlier steps only; the quantizer (any :class:`trellis.Quantizer`) then chooses that
step's indices, and the step's final values — the dequantized ones, plus a latent
residual prediction (LRP) where the model has one — become context for the later steps
and, at the end, the input of ``g_s``. The decoder runs the same steps on the decoded
indices, so it reproduces every ``μ, σ`` bit for bit (docs/design.md, "Step-wise latent
coding")::

    context = begin(ẑ)
    for i in range(num_steps):
        μ_i, σ_i = parameters(context, i)            # reads only final values of steps < i
        ŷ_i      = quantizer(gather(y, i), μ_i, σ_i)  # encoder; the decoder: dequantize(indices)
        commit(context, i, ŷ_i)                      # final values (LRP) for later steps
    g_s(final(context))

A step's elements form a ``(C_i, H_i, W_i)`` array (its *layout*), whose channels are
those of :meth:`LatentSteps.step_channels`; per-channel quantizer weights apply to them.
One chain of the trellis (``reset="channel"``: one per channel of the step; ``"tensor"``:
one per step) never crosses steps, so the trellis decides a step's indices from that
step's ``μ, σ`` alone, as exactness requires.

Kinds:

- :class:`HyperpriorSteps`: scale and mean-scale hyperpriors, one step (the whole latent).
- :class:`SliceSteps`: channel-slice models with LRP (:class:`qft.models.ChannelSliceModel`:
  TCM, DCAE, CCA), one step per slice.
- :mod:`qft.codec.checkerboard`: channel groups × checkerboard halves (MLIC++, ELIC), two
  steps per group (anchors, non-anchors), each half squeezed to ``(C_k, H, W/2)``.

The entropy path (``h_s``, the slice transforms, the LRP) runs on the CPU in float64 (a
copy of those modules), rounded to float32 where it meets the quantizer, so an encoder on
a GPU and a decoder on a CPU agree; ``dtype=torch.float32`` runs the model's own float32
path instead (the official models' arithmetic; tests compare with their ``compress``).
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trellis import SCALE_TABLE

from qft.models import ChannelSliceModel

__all__ = [
    "STEP_ENTROPY",
    "HyperpriorSteps",
    "LatentSteps",
    "SliceSteps",
    "StepContext",
    "check_scale_table",
    "channel_slices",
    "entropy_copy",
    "float32_sigma",
    "latent_steps",
]

#: Entropy-model kinds (:data:`qft.models.ENTROPY_KINDS`) coded step-wise by qft.
STEP_ENTROPY = ("scale-hyperprior", "mean-scale-hyperprior", "channel-conditional", "channel-checkerboard")


@dataclass
class StepContext:
    """One image's coding state: what :meth:`LatentSteps.contexts` derived from ``ẑ`` (and
    the latent's ``(C, H, W)`` shape) and the final values of the steps committed so far."""

    hyper: Any
    shape: tuple[int, int, int]
    finals: list = field(default_factory=list)
    support: Any = None


class LatentSteps:
    """The coding steps of one model (base: channel-slice layouts, see module docstring).

    Subclasses set :attr:`slices` (the channels of each step, in coding order) and
    implement :meth:`hyper_analysis`, :meth:`contexts`, :meth:`parameters` and
    :meth:`correction`.
    """

    #: channels of each step, in coding order
    slices: list[slice]
    #: the model's EntropyBottleneck of ``z``
    z_bottleneck: torch.nn.Module

    @property
    def num_steps(self) -> int:
        return len(self.slices)

    def step_channels(self, index: int) -> slice:
        """The channels of ``y`` that step ``index`` codes (its per-channel weights)."""
        return self.slices[index]

    def gather(self, index: int, array: np.ndarray) -> np.ndarray:
        """Step ``index``'s elements of a latent-shaped ``(C, H, W)`` array, in its layout."""
        return array[self.slices[index]]

    def scatter(self, index: int, out: np.ndarray, part: np.ndarray) -> None:
        """Writes step ``index``'s elements ``part`` (its layout) into ``out`` ``(C, H, W)``."""
        out[self.slices[index]] = part

    def hyper_analysis(self, y: torch.Tensor) -> torch.Tensor:
        """``z`` from ``y`` (``h_a``)."""
        raise NotImplementedError

    def contexts(self, z_hat: torch.Tensor) -> list[StepContext]:
        """One fresh :class:`StepContext` per image of ``ẑ`` ``(N, Z, h, w)``."""
        raise NotImplementedError

    def parameters(self, ctx: StepContext, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(μ, σ)`` of step ``index`` (float32, its layout, ``σ >= 0.11``), from ``ctx``,
        which must hold the final values of steps ``0 … index-1``."""
        raise NotImplementedError

    def correction(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> np.ndarray | None:
        """The final values of step ``index`` for its dequantized values ``y_hat`` (float32,
        its layout): ``y_hat`` plus the LRP; ``None`` when the model has no LRP (the final
        values are ``y_hat``). Pure: ``ctx`` is not changed."""
        raise NotImplementedError

    def commit(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> None:
        """Records the dequantized values of step ``index`` (after :meth:`parameters` of
        that step) as final values for the later steps."""
        if len(ctx.finals) != index:
            raise ValueError(f"step {index} committed after {len(ctx.finals)} steps")
        fixed = self.correction(ctx, index, y_hat)
        ctx.finals.append(y_hat if fixed is None else fixed)

    def final(self, ctx: StepContext) -> np.ndarray:
        """The latent ``g_s`` decodes (float32 ``(C, H, W)``), once every step is committed."""
        if len(ctx.finals) != self.num_steps:
            raise ValueError(f"{len(ctx.finals)} of {self.num_steps} steps committed")
        out = np.empty(ctx.shape, np.float32)
        for i, part in enumerate(ctx.finals):
            self.scatter(i, out, part)
        return out


def check_scale_table(model: torch.nn.Module, gaussian_conditional: torch.nn.Module) -> None:
    """Raises ``ValueError`` unless the ``GaussianConditional``'s scale table (where built)
    is CompressAI's default, which qft's coding tables (:data:`trellis.SCALE_TABLE`) are."""
    table = gaussian_conditional.scale_table
    if table.numel() and not np.allclose(table.cpu().numpy(), SCALE_TABLE, rtol=1e-6):
        raise ValueError(
            f"{type(model).__name__}: its GaussianConditional scale table is not CompressAI's default, "
            "which qft's coding tables are"
        )


def entropy_copy(module: torch.nn.Module, dtype: torch.dtype, skip: tuple[torch.nn.Module, ...] = ()):
    """A copy of ``module`` on the CPU in ``dtype``, in eval mode, without its submodules
    ``skip`` (``None`` in the copy: the analysis/synthesis transforms the entropy path
    never runs, so they cost neither the copy nor its memory)."""
    return copy.deepcopy(module, memo={id(m): None for m in skip}).to("cpu", dtype).eval()


def channel_slices(sizes, repeat: int = 1) -> list[slice]:
    """Consecutive channel slices of the given ``sizes``, each listed ``repeat`` times
    (the steps that code it)."""
    bounds = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) for _ in range(repeat)]


def float32_sigma(sigma: torch.Tensor) -> np.ndarray:
    """σ as float32 numpy, lower-bounded at the smallest table scale (0.11), as
    CompressAI's ``GaussianConditional`` bounds it."""
    return np.maximum(sigma.to("cpu", torch.float32).numpy(), SCALE_TABLE[0])


class HyperpriorSteps(LatentSteps):
    """One step over the whole latent: ``μ, σ`` from ``h_s(ẑ)`` (``σ = h_s(ẑ)``, ``μ = 0``
    for ``"scale-hyperprior"``; ``σ, μ = h_s(ẑ).chunk(2, 1)`` for ``"mean-scale-hyperprior"``),
    no LRP."""

    def __init__(self, model: torch.nn.Module, entropy: str, dtype: torch.dtype = torch.float64):
        if entropy not in ("scale-hyperprior", "mean-scale-hyperprior"):
            raise ValueError(f"not a hyperprior entropy kind: {entropy!r}")
        self.model, self.entropy, self.dtype = model, entropy, dtype
        self.z_bottleneck = model.entropy_bottleneck
        self.h_s = entropy_copy(model.h_s, dtype)
        self.slices = [slice(None)]

    def hyper_analysis(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.h_a(torch.abs(y) if self.entropy == "scale-hyperprior" else y)

    @torch.no_grad()
    def contexts(self, z_hat: torch.Tensor) -> list[StepContext]:
        p = self.h_s(z_hat.to("cpu", self.dtype))
        if self.entropy == "scale-hyperprior":
            sigma, mu = p, torch.zeros_like(p)
        else:
            sigma, mu = p.chunk(2, 1)
        mu, sigma = mu.float().numpy(), float32_sigma(sigma)
        return [StepContext((mu[i], sigma[i]), mu.shape[1:]) for i in range(mu.shape[0])]

    def parameters(self, ctx: StepContext, index: int) -> tuple[np.ndarray, np.ndarray]:
        return ctx.hyper

    def correction(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> None:
        return None


class SliceSteps(LatentSteps):
    """One step per channel slice of a :class:`qft.models.ChannelSliceModel`, through its
    public step methods (``hyper_context``, ``slice_parameters``, ``slice_reconstruction``)
    on a copy of its entropy modules (everything but ``g_a`` and ``g_s``) in ``dtype``."""

    def __init__(self, model: ChannelSliceModel, dtype: torch.dtype = torch.float64):
        check_scale_table(model, model.gaussian_conditional)
        self.model, self.dtype = model, dtype
        self.entropy_model = entropy_copy(model, dtype, skip=(model.g_a, model.g_s))
        self.z_bottleneck = model.z_bottleneck
        self.slices = channel_slices(model.slice_sizes)

    def hyper_analysis(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.h_a(y)

    @torch.no_grad()
    def contexts(self, z_hat: torch.Tensor) -> list[StepContext]:
        z = z_hat.to("cpu", self.dtype)
        shape = (sum(self.model.slice_sizes), 4 * z.shape[-2], 4 * z.shape[-1])
        return [StepContext(self.entropy_model.hyper_context(z[i : i + 1]), shape) for i in range(z.shape[0])]

    def _finals(self, ctx: StepContext) -> list[torch.Tensor]:
        return [torch.from_numpy(f)[None].to(self.dtype) for f in ctx.finals]

    @torch.no_grad()
    def parameters(self, ctx: StepContext, index: int) -> tuple[np.ndarray, np.ndarray]:
        mu, sigma, ctx.support = self.entropy_model.slice_parameters(index, ctx.hyper, self._finals(ctx))
        return mu[0].float().numpy(), float32_sigma(sigma[0])

    @torch.no_grad()
    def correction(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> np.ndarray:
        if ctx.support is None:
            raise ValueError(f"step {index}: parameters() first")
        y = torch.from_numpy(y_hat)[None].to(self.dtype)
        return self.entropy_model.slice_reconstruction(index, ctx.support, y)[0].float().numpy()

    def commit(self, ctx: StepContext, index: int, y_hat: np.ndarray) -> None:
        super().commit(ctx, index, y_hat)
        ctx.support = None


def latent_steps(model: torch.nn.Module, entropy: str, dtype: torch.dtype = torch.float64) -> LatentSteps:
    """The coding steps of ``model``, whose entropy-model kind is ``entropy``.

    Raises:
        ValueError: a kind qft does not code step-wise (:data:`STEP_ENTROPY`), a
            ``channel-conditional`` model that is not a :class:`ChannelSliceModel`, or a
            ``channel-checkerboard`` one that is neither MLIC++ nor ELIC.
    """
    if entropy in ("scale-hyperprior", "mean-scale-hyperprior"):
        return HyperpriorSteps(model, entropy, dtype)
    if entropy == "channel-conditional":
        if not isinstance(model, ChannelSliceModel):
            raise ValueError(f"{type(model).__name__} is not a ChannelSliceModel")
        return SliceSteps(model, dtype)
    if entropy == "channel-checkerboard":
        # imported here: the checkerboard steps build on this module's base class
        from qft.codec.checkerboard import checkerboard_steps

        return checkerboard_steps(model, dtype)
    raise ValueError(f"entropy kind {entropy!r} is not coded step-wise (those: {', '.join(STEP_ENTROPY)})")
