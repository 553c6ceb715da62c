"""The finetuning objective of the channel-slice models (TCM, DCAE, CCA; issue 21).

A latent cache cannot stay genuine for these models: the LRP (trained in every part set)
changes the final values of a slice, which are the context of every later slice's ``μ``,
``σ``, hence of its quantization. So every step quantizes its batch as the codec would
with the current weights (docs/design.md, "Finetuning the channel-slice models")::

    y = g_a(x), z = h_a(y), ẑ = round(z − medians) + medians        frozen, as the codec codes z
    context = hyper_context(ẑ)
    for slice i:
        μ_i, σ_i, support_i = slice_parameters(i, context, [final_0 … final_{i-1}])
        k, t = quantizer(y_i; μ_i, σ_i detached)     the real trellis.Quantizer, t = ŷ − μ
        ŷ_i  = μ_i + t                                 (gradient through μ_i; computed as
                                                        ŷ + (μ_i − sg(μ_i)): the codec's values)
        final_i = slice_reconstruction(i, support_i, ŷ_i)            LRP
    x̂ = g_s(cat[final_0 … final_{S-1}])
    loss = λ·255²·MSE(x, x̂)  (+ bpp for decoder+entropy)

``bpp = −Σ log2 P(k) / pixels``, ``P(k)`` the ``N(0, σ²)`` mass of ``k``'s decision cell
in its quantizer class (:func:`qft.finetune.objective.index_cells`, the class from the
coding row, i.e. from TCQ's state), ``σ`` lower-bounded at 0.11 and the mass at 1e-9 by
the model's ``GaussianConditional``. In value that is the cell of the residual domain; its
gradient holds the cell fixed in the ``y`` domain (``[μ₀ + lo, μ₀ + hi)`` under
``N(μ, σ²)``, ``μ₀`` the current value): the encoder re-quantizes every step, so when ``μ``
moves the coded cell stays where ``y`` is, and moving ``μ`` away from ``y`` costs bits (as
the control arm's rate of ``y + u − μ`` does). With the cell fixed in the residual domain
``μ`` had no rate gradient and drifted from ``y`` (docs/design.md). The **control arm** runs the same steps with the
model's own training proxy (:meth:`qft.models.ChannelSliceModel.forward`):
``ŷ_i = round_ste(y_i − μ_i) + μ_i`` and the rate of ``y_i + u`` (the mass of
``[y_i + u − μ_i − ½, y_i + u − μ_i + ½)``, ``u ~ U(−½, ½)`` drawn per batch element
from ``default_rng([seed, step, element])``, as the hyperprior control arm draws it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from compressai.ops import quantize_ste
from torch import nn

from trellis import NUM_SCALES, Quantizer

from qft.finetune.objective import cell_mass, index_cells
from qft.models import ChannelSliceModel
from qft.threads import set_threads
from qft.train.data import sample_batch

__all__ = ["SliceObjective", "image_batch", "latent_channels"]


def latent_channels(model: ChannelSliceModel) -> int:
    """Channels of ``y`` (all slices)."""
    return sum(model.slice_sizes)


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
    """The loss of a channel-slice model over an :func:`image_batch` (module docstring);
    the module DDP wraps.

    Args:
        model: the :class:`~qft.models.ChannelSliceModel` (shared, not copied); its trained
            parts are set by :func:`qft.finetune.parts.trainable_parameters`.
        parts: ``"decoder"`` (loss: distortion only) or ``"decoder+entropy"`` (+ bpp).
        control: the model's training proxy instead of the quantizer.
        lmbda: λ of ``λ·255²·MSE``.
        quantizer: the inference quantizer (any method), on ``(N, C_i, H, W)`` float32.
        weights: its per-channel distortion weights ``(C,)`` (RDOQ/TCQ), or ``None``.
    """

    def __init__(
        self,
        model: ChannelSliceModel,
        parts: str,
        control: bool,
        lmbda: float,
        quantizer: Quantizer,
        weights: np.ndarray | None = None,
    ):
        super().__init__()
        self.model = model
        self.rate = parts == "decoder+entropy"
        self.control = control
        self.lmbda = lmbda
        self.quantizer = quantizer
        self.weights = None if weights is None else np.asarray(weights, np.float64).reshape(-1, 1, 1)

    @property
    def noise_channels(self) -> int | None:
        """Channels of the noise :func:`image_batch` must draw (the control arm), else ``None``."""
        return latent_channels(self.model) if self.control else None

    def _quantize(
        self, y: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, first: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ŷ, lo, hi)`` of a slice (its channels from ``first`` of ``y``): the quantizer's
        reconstruction and the cells of its indices, on ``y``'s device."""
        q, n = self.quantizer, y.shape[1]
        w = None if self.weights is None else self.weights[first : first + n]
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
            medians = m.z_bottleneck.quantiles[:, :, 1:2]
            z_hat = torch.round(z - medians) + medians  # what the codec's z stream decodes to
        context = m.hyper_context(z_hat)
        finals: list[torch.Tensor] = []
        bits = x.new_zeros(())
        first = 0
        for i, y_i in enumerate(y.split(m.slice_sizes, dim=1)):
            mu, scale, support = m.slice_parameters(i, context, finals)
            sigma = gc.lower_bound_scale(scale)
            if self.control:
                y_hat = quantize_ste(y_i - mu) + mu
                r = y_i + batch["u"][:, first : first + y_i.shape[1]] - mu
                lo, hi = r - 0.5, r + 0.5
            else:
                y_q, lo, hi = self._quantize(y_i, mu, sigma, first)
                shift = mu - mu.detach()  # 0 in value, the gradient of μ
                y_hat = y_q + shift  # = μ + t with t = ŷ − μ fixed, bit-exact ŷ
                lo, hi = lo - shift, hi - shift  # the coded cell stays where y is when μ moves
            with torch.set_grad_enabled(self.rate and torch.is_grad_enabled()):
                mass = cell_mass(lo, hi, sigma)
                if gc.use_likelihood_bound:
                    mass = gc.likelihood_lower_bound(mass)
                bits = bits - torch.log2(mass).sum()
            finals.append(m.slice_reconstruction(i, support, y_hat))
            first += y_i.shape[1]
        x_hat = m.g_s(torch.cat(finals, dim=1))
        bpp = bits / (x.shape[0] * x.shape[2] * x.shape[3])
        mse = torch.mean((x_hat - x) ** 2)
        loss = self.lmbda * 255**2 * mse + (bpp if self.rate else 0.0)
        return {"loss": loss, "mse": mse, "bpp": bpp.detach()}
