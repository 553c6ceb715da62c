"""Encoder-side latent refinement of hyperprior models: SGA.

Stochastic Gumbel annealing (Yang, Bamler & Mandt, NeurIPS 2020, "Improving inference
for neural image compression"): per image, the latents ``y`` and ``z`` that ``g_a`` and
``h_a`` give are only the starting point; Adam then minimises the model's own RD loss

    λ·255²·MSE(x, g_s(ỹ)) + (bits(ỹ | ẑ) + bits(z̃)) / pixels

in ``y`` and ``z``, where the rounding of ``r = y − μ`` (of ``z − median`` for ``z``) is
relaxed: each element is ``⌊r⌋`` or ``⌊r⌋ + 1`` with probabilities ``∝ exp(−atanh(d)/τ)``
(``d`` the distance to that integer), sampled by a Gumbel-softmax of temperature ``τ``,
which anneals geometrically from :data:`SGA_TAU_START` to :data:`SGA_TAU_END` over the
steps, where the relaxation is nearly hard rounding. The refined latents are then coded
as any other (:meth:`qft.codec.latent.LatentCoder.latents`): ``z`` by the
``EntropyBottleneck``, ``y`` by any quantizer (USQ rounds it; a trellis takes it as its
target). The decoder needs nothing: the stream format is unchanged.

The rates are the model's (the ``EntropyBottleneck``'s and ``GaussianConditional``'s
likelihoods, ``σ`` bounded below at 0.11 as the coder does), so the loss is the one the
model was trained on, at its training λ; it is the step-1 rounding's, whichever quantizer
codes the result.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from trellis import SCALE_TABLE

__all__ = ["SGA_LR", "SGA_TAU_END", "SGA_TAU_START", "SGARefine", "refine_latents", "sga_round"]

#: Adam's learning rate (the paper's 5e-3).
SGA_LR = 5e-3
#: Temperature of the first step (the paper's upper bound of τ).
SGA_TAU_START = 0.5
#: Temperature of the last step: the relaxation is then within a few % of hard rounding.
SGA_TAU_END = 0.02
_EPS = 1e-5


@dataclass(frozen=True)
class SGARefine:
    """The encoder option "refine the latents by SGA" (:func:`refine_latents`).

    Args:
        lmbda: the model's training λ (weight of ``λ·255²·MSE`` against bits per pixel).
        steps: Adam steps per image (≥ 1).
        seed: seed of the Gumbel noise (the refinement is deterministic given it).
        lr: Adam's learning rate.
    """

    lmbda: float
    steps: int = 200
    seed: int = 0
    lr: float = SGA_LR

    def __post_init__(self):
        if not (math.isfinite(self.lmbda) and self.lmbda > 0):
            raise ValueError(f"lmbda must be a positive finite number, got {self.lmbda!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")

    def record(self) -> str:
        """As records write it: ``"sga-N"``."""
        return f"sga-{self.steps}"


def sga_round(r: torch.Tensor, tau: float, gen: torch.Generator) -> torch.Tensor:
    """The stochastic Gumbel-annealed rounding of ``r`` at temperature ``tau``: a
    differentiable value between ``⌊r⌋`` and ``⌊r⌋ + 1`` (Gumbel noise drawn from ``gen``
    on the CPU, then moved to ``r``'s device)."""
    lo = torch.floor(r).detach()
    frac = r - lo  # in [0, 1): distance to ⌊r⌋; 1 − frac to ⌊r⌋ + 1
    logits = torch.stack(
        (
            -torch.atanh(frac.clamp(-1 + _EPS, 1 - _EPS)) / tau,
            -torch.atanh((1 - frac).clamp(-1 + _EPS, 1 - _EPS)) / tau,
        ),
        dim=-1,
    )
    u = torch.rand(logits.shape, generator=gen, dtype=torch.float32).to(r.device)
    gumbel = -torch.log((-torch.log(u.clamp(1e-10, 1.0))).clamp_min(1e-10))
    p_up = torch.softmax((logits + gumbel) / tau, dim=-1)[..., 1]
    return lo + p_up


def refine_latents(
    model: torch.nn.Module,
    x: torch.Tensor,
    refine: SGARefine,
    entropy: str = "mean-scale-hyperprior",
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents ``(y, z)`` of a batch of images ``(N, 3, H, W)`` refined by SGA (module
    docstring), on ``x``'s (the model's) device, detached float32.

    ``entropy``: ``"scale-hyperprior"`` (``σ = h_s(z)``, ``μ = 0``, ``h_a`` sees ``|y|``) or
    ``"mean-scale-hyperprior"``; ``padding`` ``(left, right, top, bottom)``: the zero
    padding of ``x`` (:func:`qft.codec.image.pad`), outside the MSE; pixels are the
    unpadded ones. The model's parameters are left untouched (no gradients kept)."""
    left, right, top, bottom = padding
    rows, cols = slice(top, x.shape[-2] - bottom), slice(left, x.shape[-1] - right)
    pixels = (x.shape[-2] - top - bottom) * (x.shape[-1] - left - right)
    eb = model.entropy_bottleneck
    medians = eb.quantiles[:, :, 1:2].detach().reshape(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(refine.seed)
    with torch.no_grad():
        y0 = model.g_a(x)
        z0 = model.h_a(torch.abs(y0) if entropy == "scale-hyperprior" else y0)
    y = y0.detach().float().clone().requires_grad_(True)
    z = z0.detach().float().clone().requires_grad_(True)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam([y, z], lr=refine.lr)
    try:
        with torch.enable_grad():
            for t in range(refine.steps):
                tau = SGA_TAU_START * (SGA_TAU_END / SGA_TAU_START) ** (t / max(refine.steps - 1, 1))
                z_t = medians + sga_round(z - medians, tau, gen)
                # the EntropyBottleneck's density runs on (channels, 1, elements)
                z_lik = eb._likelihood(z_t.transpose(0, 1).reshape(z_t.shape[1], 1, -1))[0]
                p = model.h_s(z_t)
                sigma, mu = (p, torch.zeros_like(p)) if entropy == "scale-hyperprior" else p.chunk(2, 1)
                sigma = sigma.clamp_min(float(SCALE_TABLE[0]))
                r_t = sga_round(y - mu, tau, gen)
                y_lik = model.gaussian_conditional._likelihood(r_t, sigma)
                bits = -(torch.log2(y_lik.clamp_min(1e-9)).sum() + torch.log2(z_lik.clamp_min(1e-9)).sum())
                x_t = model.g_s(mu + r_t)
                mse = (x_t[..., rows, cols] - x[..., rows, cols]).pow(2).mean()
                loss = refine.lmbda * 255**2 * mse + bits / (pixels * x.shape[0])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return y.detach(), z.detach()
