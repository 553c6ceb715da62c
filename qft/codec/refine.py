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
model was trained on, at its training λ; it is the step-1 rounding's.

**Through the trellis.** A latent refined for the step-1 grid sits on that grid, which the
union grid of a trellis quantizer does not hold: coded by TCQ it loses most of what SGA
gained (docs/design.md, "SGA through the trellis"). For a trellis quantizer the last
``trellis_share`` of the steps therefore relax the trellis itself
(:func:`refine_through_trellis`): ``z`` (hence ``μ, σ``) is fixed at what the SGA steps
gave, and Adam minimises ``λ·255²·MSE(x, g_s(E_p[ŷ])) + (E_p[Σ R] + bits(ẑ)) / pixels``
in ``y``, where ``p(path) ∝ exp(−J(path)/τ)`` is the Gibbs distribution of the trellis
paths under the quantizer's own cost ``J`` (:meth:`trellis.Quantizer.soft_quantize`,
exact table bits, exact gradients) and ``τ`` anneals geometrically over
``SGARefine.trellis_taus`` (default :data:`SOFT_TAU_START` to :data:`SOFT_TAU_END`), where
``p`` is nearly the Viterbi path:
the trellis then codes the latent these steps optimised for. The SGA steps before are the
first ones of a schedule over all the steps, so the trellis takes over a latent that has
not yet hardened onto the step-1 grid; elements in a quantizer's plain rows, which the
trellis leaves, go on with SGA's rounding to the end of that schedule.
"""

from __future__ import annotations

import math

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from trellis import SCALE_TABLE, Quantizer

from qft.codec.image import crop

__all__ = [
    "SGA_LR",
    "SGA_TAU_END",
    "SGA_TAU_START",
    "SOFT_TAU_END",
    "SOFT_TAU_START",
    "TRELLIS_SHARE",
    "SGARefine",
    "refine_latents",
    "refine_latents_at",
    "refine_through_trellis",
    "sga_round",
]

#: Adam's learning rate (the paper's 5e-3).
SGA_LR = 5e-3
#: Temperature of the first step (the paper's upper bound of τ).
SGA_TAU_START = 0.5
#: Temperature of the last step: the relaxation is then within a few % of hard rounding.
SGA_TAU_END = 0.02
#: Temperature of the soft trellis's first step, in the quantizer's cost units (latent
#: squared error): levels a few ``Δ`` apart are all represented (chosen on BSDS500 val
#: against 0.03 and 0.1, with 1.0 about equal: docs/design.md, "SGA through the trellis").
SOFT_TAU_START = 0.3
#: Temperature of its last step: nearly the Viterbi path, which then codes the latent
#: (0.01 measured better than 0.002 and 0.0005).
SOFT_TAU_END = 0.01
#: Share of the steps spent relaxing the trellis when the quantizer is one.
TRELLIS_SHARE = 0.5
_EPS = 1e-5


@dataclass(frozen=True)
class SGARefine:
    """The encoder option "refine the latents by SGA" (:func:`refine_latents`).

    Args:
        lmbda: the model's training λ (weight of ``λ·255²·MSE`` against bits per pixel).
        steps: Adam steps per image (≥ 1).
        seed: seed of the Gumbel noise (the refinement is deterministic given it).
        lr: Adam's learning rate.
        trellis_share: for a trellis quantizer, the share of ``steps`` that relax the
            trellis (:func:`refine_through_trellis`) after the SGA steps, which are the
            first of an SGA schedule over all ``steps``; 0: SGA only.
        trellis_taus: the relaxed trellis's temperatures at its first and last step.
        usq_fallback: for a quantizer other than USQ, the codec also codes the latent of
            SGA over all ``steps`` by USQ and keeps whichever stream has the lower RD cost
            at ``lmbda`` (:meth:`qft.codec.Codec.compress`; both encodes, which share the
            trellis's SGA steps: about 1.6× SGA + USQ's encode time).
    """

    lmbda: float
    steps: int = 200
    seed: int = 0
    lr: float = SGA_LR
    trellis_share: float = TRELLIS_SHARE
    trellis_taus: tuple[float, float] = (SOFT_TAU_START, SOFT_TAU_END)
    usq_fallback: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.lmbda) and self.lmbda > 0):
            raise ValueError(f"lmbda must be a positive finite number, got {self.lmbda!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (0.0 <= self.trellis_share <= 1.0):
            raise ValueError(f"trellis_share must lie in [0, 1], got {self.trellis_share!r}")
        if len(self.trellis_taus) != 2 or not all(math.isfinite(t) and t > 0 for t in self.trellis_taus):
            raise ValueError(f"trellis_taus must be two positive finite temperatures, got {self.trellis_taus!r}")

    def split(self, quantizer: Quantizer) -> tuple[int, int]:
        """``(SGA steps, trellis steps)`` for ``quantizer``: all SGA unless it is a trellis."""
        soft = round(self.steps * self.trellis_share) if quantizer.is_trellis else 0
        return self.steps - soft, soft

    def record(self, quantizer: Quantizer) -> str:
        """As records write it for ``quantizer``: ``"sga-N"``, or ``"sga-A+trellis-B"`` where
        B of the N steps relax the trellis; ``" or usq"`` appended with :attr:`usq_fallback`
        (for a quantizer other than USQ)."""
        sga, soft = self.split(quantizer)
        name = f"sga-{self.steps}" if soft == 0 else f"sga-{sga}+trellis-{soft}"
        return name + " or usq" if self.usq_fallback and quantizer.method != "usq" else name


def _annealed(start: float, end: float, t: int, steps: int) -> float:
    """The temperature of step ``t`` of ``steps``: geometric from ``start`` to ``end``."""
    return start * (end / start) ** (t / max(steps - 1, 1))


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's trainable parameters without gradients for the block, as they were after."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


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
    stop: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents ``(y, z)`` of a batch of images ``(N, 3, H, W)`` refined by SGA (module
    docstring), on ``x``'s (the model's) device, detached float32.

    ``entropy``: ``"scale-hyperprior"`` (``σ = h_s(z)``, ``μ = 0``, ``h_a`` sees ``|y|``) or
    ``"mean-scale-hyperprior"``; ``padding`` ``(left, right, top, bottom)``: the zero
    padding of ``x`` (:func:`qft.codec.image.pad`), outside the MSE; pixels are the
    unpadded ones. ``stop``: run only the first ``stop`` of the ``refine.steps`` steps
    (the temperatures still those of the whole schedule: SGA hands a latent that has not
    yet hardened to the relaxed trellis, :func:`refine_through_trellis`). The model's
    parameters are left untouched (no gradients kept)."""
    return refine_latents_at(model, x, refine, (refine.steps if stop is None else stop,), entropy, padding)[0]


def refine_latents_at(
    model: torch.nn.Module,
    x: torch.Tensor,
    refine: SGARefine,
    stops: tuple[int, ...],
    entropy: str = "mean-scale-hyperprior",
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`refine_latents` after each of ``stops`` steps of one run of the schedule
    (ascending, each in ``[1, refine.steps]``): the ``k``-th pair is exactly
    ``refine_latents(..., stop=stops[k])``, at the cost of the last stop alone (the
    encoder's USQ fallback shares the trellis's SGA head with SGA + USQ this way)."""
    if not stops or any(not 1 <= s <= refine.steps for s in stops) or list(stops) != sorted(set(stops)):
        raise ValueError(f"stop must lie in [1, {refine.steps}] (the refinement's steps), ascending, got {stops!r}")
    x_ref = crop(x, padding)
    pixels = x_ref.shape[-2] * x_ref.shape[-1]
    eb = model.entropy_bottleneck
    medians = eb.quantiles[:, :, 1:2].detach().reshape(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(refine.seed)
    with torch.no_grad():
        y0 = model.g_a(x)
        z0 = model.h_a(torch.abs(y0) if entropy == "scale-hyperprior" else y0)
    y = y0.detach().float().clone().requires_grad_(True)
    z = z0.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([y, z], lr=refine.lr)
    out = []
    with _frozen(model), torch.enable_grad():
        for t in range(stops[-1]):
            tau = _annealed(SGA_TAU_START, SGA_TAU_END, t, refine.steps)
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
            mse = (crop(x_t, padding) - x_ref).pow(2).mean()
            loss = refine.lmbda * 255**2 * mse + bits / (pixels * x.shape[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if t + 1 in stops:
                out.append((y.detach().clone(), z.detach().clone()))
    return out


class _SoftTrellis(torch.autograd.Function):
    """``(E_p[ŷ], E_p[R])`` of the soft trellis as a function of ``y`` (one image, CPU
    arithmetic in float64; the gradient is the exact one of ``soft_quantize``)."""

    @staticmethod
    def forward(ctx, y, mu, sigma, quantizer, weights, tau):
        arr = y.detach().cpu().double().numpy()[0]
        out = quantizer.soft_quantize(arr, mu, sigma, tau=tau, weights=weights)
        ctx.args = (arr, mu, sigma, quantizer, weights, tau)
        return (
            torch.from_numpy(out.y_hat).to(y)[None],
            torch.from_numpy(out.bits).to(y)[None],
        )

    @staticmethod
    def backward(ctx, g_hat, g_bits):
        arr, mu, sigma, quantizer, weights, tau = ctx.args
        g = g_hat[0].detach().cpu().double().numpy()
        rho = g_bits[0].detach().cpu().double().numpy()
        out = quantizer.soft_quantize(arr, mu, sigma, tau=tau, weights=weights, g=g, rho=rho)
        return torch.from_numpy(out.grad).to(g_hat)[None], None, None, None, None, None


def _plain_bits(quantizer: Quantizer, coding_rows: np.ndarray, plain: np.ndarray, r: torch.Tensor) -> torch.Tensor:
    """The table bits of the plain elements (mask ``plain``, their ``coding_rows``) at
    SGA-rounded residuals ``r`` ``(1, C, h, w)``, interpolated between those of ``⌊r⌋``
    and ``⌊r⌋ + 1`` as ``r`` lies between them (0 elsewhere): the rate SGA's rounding
    expects, which the coder's table spends, with a gradient however far in the tail."""
    lo = torch.floor(r.detach())
    k = lo[0].cpu().numpy()[plain].astype(np.int64)
    table = quantizer.table
    b_lo, b_hi = np.zeros(plain.shape), np.zeros(plain.shape)
    b_lo[plain] = table.index_bits(coding_rows, k)
    b_hi[plain] = table.index_bits(coding_rows, k + 1)
    b_lo, b_hi = (torch.from_numpy(b).to(r)[None] for b in (b_lo, b_hi))
    return b_lo + (r - lo) * (b_hi - b_lo)


def refine_through_trellis(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: np.ndarray,
    mu: np.ndarray,
    sigma: np.ndarray,
    quantizer: Quantizer,
    weights: np.ndarray | None,
    refine: SGARefine,
    steps: int,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> np.ndarray:
    """``y`` (float32 ``(C, h, w)``) after ``steps`` Adam steps through the relaxed trellis
    of ``quantizer`` (module docstring), for one image ``x`` ``(1, 3, H, W)`` whose
    entropy parameters ``mu``, ``sigma`` (``(C, h, w)``, from its coded ``ẑ``) stay fixed;
    ``weights``: the quantizer's per-channel distortion weights ``(C,)`` or ``None``. The
    last ``steps`` of ``refine.steps``: with plain rows the plain elements, which the
    trellis leaves, go on with SGA's rounding at the temperatures of those steps of its
    schedule (their rates the coder's table bits, as the trellis elements'). The
    hyper-latent's bits are a constant of this loss and left out. The model's parameters
    are left untouched."""
    if not 1 <= steps <= refine.steps:
        raise ValueError(f"steps must lie in [1, {refine.steps}] (the refinement's steps), got {steps!r}")
    x_ref = crop(x, padding)
    pixels = x_ref.shape[-2] * x_ref.shape[-1]
    w = None if weights is None else np.asarray(weights, np.float64).reshape(-1, 1, 1)
    yt = torch.tensor(np.asarray(y, np.float32), device=x.device)[None].requires_grad_(True)
    opt = torch.optim.Adam([yt], lr=refine.lr)
    if quantizer.plain_rows:
        # the plain elements go on with SGA's schedule (the trellis leaves them)
        plain_np, coding_rows = quantizer.plain_elements(sigma)
        plain = torch.from_numpy(plain_np).to(x.device)[None]
        mu_t = torch.tensor(np.asarray(mu, np.float32), device=x.device)[None]
        gen = torch.Generator().manual_seed(refine.seed + 1)
    with _frozen(model), torch.enable_grad():
        for t in range(steps):
            tau = _annealed(*refine.trellis_taus, t, steps)
            y_hat, bits = _SoftTrellis.apply(yt, mu, sigma, quantizer, w, tau)
            if quantizer.plain_rows:
                sga_tau = _annealed(SGA_TAU_START, SGA_TAU_END, refine.steps - steps + t, refine.steps)
                r_t = sga_round(yt - mu_t, sga_tau, gen)
                y_hat = torch.where(plain, mu_t + r_t, y_hat)
                bits = torch.where(plain, _plain_bits(quantizer, coding_rows, plain_np, r_t), bits)
            mse = (crop(model.g_s(y_hat), padding) - x_ref).pow(2).mean()
            loss = refine.lmbda * 255**2 * mse + bits.sum() / pixels
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return yt.detach()[0].float().cpu().numpy()
