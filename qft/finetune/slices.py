"""The finetuning objective of the models coded step by step with an LRP: the channel-slice
models (TCM, DCAE, CCA; issue 21) and MLIC++ (issue 22).

A latent cache cannot stay genuine for these models: the LRP (trained in every part set)
changes the final values of a step, which are the context of every later step's ``μ``,
``σ``, hence of its quantization. So every training step quantizes its batch as the codec
would with the current weights (docs/design.md, "Finetuning the channel-slice models" and
"Finetuning MLIC++")::

    y = g_a(x), z = h_a(y), ẑ = round(z − medians) + medians        frozen, as the codec codes z
    for each coding step s (the family's order, :class:`TrainingSteps`):
        μ_s, σ_s = parameters from ẑ and the final values of the steps before s
        k, t = quantizer(y_s; μ_s, σ_s detached)     the real trellis.Quantizer on the step's
                                                       layout, t = ŷ − μ
        ŷ_s  = μ_s + t                                 (gradient through μ_s; computed as
                                                        ŷ + (μ_s − sg(μ_s)): the codec's values)
        final_s = ŷ_s + LRP                            the context of the later steps
    x̂ = g_s(final latent)
    loss = λ·255²·MSE(x, x̂)  (+ bpp for decoder+entropy)

The steps, one adapter per family over the model's own public step methods (no copy of a
coding order):

- :class:`ChannelSliceTrainingSteps` (:class:`qft.models.ChannelSliceModel`): one step
  per channel slice, in the layout ``(N, C_i, H, W)``; ``hyper_context``,
  ``slice_parameters``, ``slice_reconstruction``.
- :class:`MLICppTrainingSteps` (:class:`qft.models.mlicpp.MLICPlusPlus`): 10 slices × 2
  checkerboard halves through :meth:`~qft.models.mlicpp.MLICPlusPlus.coding_steps`, the
  traversal the model's ``compress``/``decompress`` run too; each half quantized in the
  squeezed layout ``(N, C, H, W/2)`` of :func:`qft.models.layers.squeeze_checkerboard`,
  the layout and order of the codec's :class:`qft.codec.checkerboard.MLICppSteps`, so a
  trellis chain runs along the same rows as at inference.

``bpp = −Σ log2 P(k) / pixels``, ``P(k)`` the ``N(0, σ²)`` mass of ``k``'s decision cell
in its quantizer class (:func:`qft.finetune.objective.index_cells`, the class from the
coding row, i.e. from TCQ's state), ``σ`` lower-bounded at 0.11 and the mass at 1e-9 by
the model's ``GaussianConditional``. In value that is the cell of the residual domain; its
gradient holds the cell fixed in the ``y`` domain (``[μ₀ + lo, μ₀ + hi)`` under
``N(μ, σ²)``, ``μ₀`` the current value): the encoder re-quantizes every step, so when ``μ``
moves the coded cell stays where ``y`` is, and moving ``μ`` away from ``y`` costs bits (as
the control arm's rate of ``y + u − μ`` does). With the cell fixed in the residual domain
``μ`` had no rate gradient and drifted from ``y`` (docs/design.md). The **control arm** runs the same steps with the
model's own training proxy (:meth:`qft.models.ChannelSliceModel.forward`,
:meth:`qft.models.mlicpp.MLICPlusPlus.forward`): ``ŷ_s = round_ste(y_s − μ_s) + μ_s`` and
the rate of ``y_s + u`` (the mass of ``[y_s + u − μ_s − ½, y_s + u − μ_s + ½)``,
``u ~ U(−½, ½)`` latent-shaped, drawn per batch element from
``default_rng([seed, step, element])``, as the hyperprior control arm draws it, and
gathered into each step's layout as ``y`` is).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from compressai.ops import quantize_ste
from torch import Tensor, nn

from trellis import NUM_SCALES, Quantizer

from qft.codec.steps import channel_slices
from qft.finetune.objective import cell_mass, index_cells
from qft.models import ChannelSliceModel
from qft.models.layers import squeeze_checkerboard, unsqueeze_checkerboard
from qft.models.mlicpp import MLICPlusPlus, half_parity
from qft.threads import set_threads
from qft.train.data import sample_batch

__all__ = [
    "STEP_FAMILIES",
    "ChannelSliceTrainingSteps",
    "MLICppTrainingSteps",
    "SliceObjective",
    "StepCode",
    "TrainingSteps",
    "image_batch",
    "training_steps",
]

#: the architectures :func:`training_steps` takes (for messages)
STEP_FAMILIES = ("tcm", "dcae", "cca", "mlicpp")

#: ``code(channels, layout, μ, scale) -> ŷ``: quantizes one step whose elements are
#: ``layout(t[:, channels])`` of a latent-shaped ``t`` ``(N, C, H, W)`` (``μ``, ``scale`` and
#: the returned ``ŷ`` in that layout)
StepCode = Callable[[slice, Callable[[Tensor], Tensor], Tensor, Tensor], Tensor]


def _whole(t: Tensor) -> Tensor:
    """The layout of a step that codes its channels' whole map."""
    return t


class TrainingSteps:
    """A family's coding steps on the torch side, differentiable and batched: the same
    order, parameters, layouts and LRP as the codec's :mod:`qft.codec.steps`."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def latent_channels(self) -> int:
        """Channels of ``y``."""
        raise NotImplementedError

    @property
    def z_bottleneck(self) -> nn.Module:
        """The ``EntropyBottleneck`` of ``z`` (frozen)."""
        raise NotImplementedError

    def final_latent(self, z_hat: Tensor, code: StepCode) -> Tensor:
        """The latent ``g_s`` decodes ``(N, C, H, W)``: every step in coding order,
        its ``μ, σ`` from ``ẑ`` and the final values of the earlier steps, its values
        ``code(…)``, its final values with the LRP."""
        raise NotImplementedError


class ChannelSliceTrainingSteps(TrainingSteps):
    """One step per slice of a :class:`qft.models.ChannelSliceModel` (its whole map)."""

    @property
    def latent_channels(self) -> int:
        return sum(self.model.slice_sizes)

    @property
    def z_bottleneck(self) -> nn.Module:
        return self.model.z_bottleneck

    def final_latent(self, z_hat: Tensor, code: StepCode) -> Tensor:
        m = self.model
        context = m.hyper_context(z_hat)
        finals: list[Tensor] = []
        for i, channels in enumerate(channel_slices(m.slice_sizes)):
            mu, scale, support = m.slice_parameters(i, context, finals)
            finals.append(m.slice_reconstruction(i, support, code(channels, _whole, mu, scale)))
        return torch.cat(finals, dim=1)


class MLICppTrainingSteps(TrainingSteps):
    """The ``2 · slice_num`` checkerboard steps of MLIC++ through the model's own
    :meth:`~qft.models.mlicpp.MLICPlusPlus.coding_steps`, each half in its squeezed
    layout."""

    @property
    def latent_channels(self) -> int:
        return self.model.M

    @property
    def z_bottleneck(self) -> nn.Module:
        return self.model.entropy_bottleneck

    def final_latent(self, z_hat: Tensor, code: StepCode) -> Tensor:
        slices = channel_slices([self.model.slice_ch] * self.model.slice_num)

        def code_half(anchors: bool, index: int, scales: Tensor, means: Tensor) -> Tensor:
            parity = half_parity(anchors)
            layout = partial(squeeze_checkerboard, parity=parity)
            return unsqueeze_checkerboard(code(slices[index], layout, layout(means), layout(scales)), parity)

        return self.model.coding_steps(z_hat, code_half)


def training_steps(model: nn.Module) -> TrainingSteps | None:
    """The training steps of ``model`` (:data:`STEP_FAMILIES`), or ``None`` when it is not
    finetuned step by step (a hyperprior model trains on a latent cache)."""
    if isinstance(model, ChannelSliceModel):
        return ChannelSliceTrainingSteps(model)
    if isinstance(model, MLICPlusPlus):
        return MLICppTrainingSteps(model)
    return None


def image_batch(
    images: Sequence[np.ndarray],
    seed: int,
    step: int,
    batch_size: int,
    crop: int,
    elements: Sequence[int],
    noise_channels: int | None = None,
) -> dict[str, torch.Tensor]:
    """This process's share ``elements`` of the global batch of ``step``
    (:func:`qft.train.data.sample_batch`: random crops and flips from ``(seed, step)``):
    ``x`` ``(len(elements), 3, crop, crop)`` in [0, 1] and, with ``noise_channels`` (the
    control arm), ``u`` ``(len(elements), noise_channels, crop/16, crop/16)``, element
    ``b``'s from ``default_rng([seed, step, b])`` — so a batch does not depend on how the
    global batch is split over processes."""
    x = sample_batch(images, seed, step, batch_size, crop)[list(elements)]
    out = {"x": x.contiguous()}
    if noise_channels is not None:
        shape = (noise_channels, crop // 16, crop // 16)
        u = [np.random.default_rng([seed, step, b]).uniform(-0.5, 0.5, shape) for b in elements]
        out["u"] = torch.from_numpy(np.stack(u).astype(np.float32))
    return out


class SliceObjective(nn.Module):
    """The loss of a model coded step by step (a channel-slice model or MLIC++) over an
    :func:`image_batch` (module docstring); the module DDP wraps.

    Args:
        model: the model (shared, not copied; one of :data:`STEP_FAMILIES`); its trained
            parts are set by :func:`qft.finetune.parts.trainable_parameters`.
        parts: ``"decoder"`` (loss: distortion only) or ``"decoder+entropy"`` (+ bpp).
        control: the model's training proxy instead of the quantizer.
        lmbda: λ of ``λ·255²·MSE``.
        quantizer: the inference quantizer (any method), on each step's layout, float32.
        weights: its per-channel distortion weights ``(C,)`` (RDOQ/TCQ), or ``None``.

    Raises:
        ValueError: a model that is not coded step by step (:func:`training_steps`).
    """

    def __init__(
        self,
        model: nn.Module,
        parts: str,
        control: bool,
        lmbda: float,
        quantizer: Quantizer,
        weights: np.ndarray | None = None,
    ):
        super().__init__()
        steps = training_steps(model)
        if steps is None:
            raise ValueError(
                f"{type(model).__name__} is not finetuned step by step (those: {', '.join(STEP_FAMILIES)})"
            )
        self.model = model
        self.steps = steps
        self.rate = parts == "decoder+entropy"
        self.control = control
        self.lmbda = lmbda
        self.quantizer = quantizer
        self.weights = None if weights is None else np.asarray(weights, np.float64).reshape(-1, 1, 1)

    @property
    def noise_channels(self) -> int | None:
        """Channels of the noise :func:`image_batch` must draw (the control arm), else ``None``."""
        return self.steps.latent_channels if self.control else None

    def _quantize(
        self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, channels: slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ŷ, lo, hi)`` of a step (its ``channels`` of ``y``, in its layout): the
        quantizer's reconstruction and the cells of its indices, on ``y``'s device."""
        q = self.quantizer
        w = None if self.weights is None else self.weights[channels]
        mu_np = mu.detach().float().cpu().numpy()
        threads = torch.get_num_threads()
        res = q.quantize(y.float().cpu().numpy(), mu_np, sigma.detach().float().cpu().numpy(), weights=w)
        set_threads(threads, numba=False)  # Numba's first parallel kernel resets torch's count
        lo, hi = index_cells(res.indices, res.rows // NUM_SCALES, q)
        return tuple(torch.from_numpy(a).to(y.device) for a in (res.y_hat, lo, hi))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss", "mse", "bpp"}``; ``bpp`` (of ``y``) is reported for both part sets,
        in the loss for ``decoder+entropy`` only."""
        m, x = self.model, batch["x"]
        gc = m.gaussian_conditional
        with torch.no_grad():
            y = m.g_a(x)
            z = m.h_a(y)
            medians = self.steps.z_bottleneck.quantiles[:, :, 1:2]
            z_hat = torch.round(z - medians) + medians  # what the codec's z stream decodes to
        bits = x.new_zeros(())

        def code(channels: slice, layout: Callable[[Tensor], Tensor], mu: Tensor, scale: Tensor) -> Tensor:
            nonlocal bits
            y_s = layout(y[:, channels])
            sigma = gc.lower_bound_scale(scale)
            if self.control:
                y_hat = quantize_ste(y_s - mu) + mu
                r = y_s + layout(batch["u"][:, channels]) - mu
                lo, hi = r - 0.5, r + 0.5
            else:
                y_q, lo, hi = self._quantize(y_s, mu, sigma, channels)
                shift = mu - mu.detach()  # 0 in value, the gradient of μ
                y_hat = y_q + shift  # = μ + t with t = ŷ − μ fixed, bit-exact ŷ
                lo, hi = lo - shift, hi - shift  # the coded cell stays where y is when μ moves
            with torch.set_grad_enabled(self.rate and torch.is_grad_enabled()):
                mass = cell_mass(lo, hi, sigma)
                if gc.use_likelihood_bound:
                    mass = gc.likelihood_lower_bound(mass)
                bits = bits - torch.log2(mass).sum()
            return y_hat

        x_hat = m.g_s(self.steps.final_latent(z_hat, code))
        bpp = bits / (x.shape[0] * x.shape[2] * x.shape[3])
        mse = torch.mean((x_hat - x) ** 2)
        loss = self.lmbda * 255**2 * mse + (bpp if self.rate else 0.0)
        return {"loss": loss, "mse": mse, "bpp": bpp.detach()}
