"""Latent coding with any :class:`trellis.Quantizer`, step by step (:mod:`qft.codec.steps`).

::

    x ─g_a─▶ y ─h_a─▶ z ─EntropyBottleneck─▶ ẑ ─▶ context
                 │                                   │   for each step i (1 for hyperpriors,
                 │                                   ▼   one per slice for TCM/DCAE/CCA, one
                 │                                       per checkerboard half of each group
                 │                                       for MLIC++/ELIC):
                 │             μ_i, σ_i (CPU, float64 path) from ẑ and final values of steps < i
                 │                                   │
                 └── y_i ──▶ Quantizer (USQ | RDOQ | TCQ-4 | TCQ-8) ──▶ indices, rows ──┐
                                     │ dequantized ŷ_i (+ LRP) = final values of step i    │
                                     └──────────────▶ context                             ▼
                                                    rANS (trellis.rans), one stream ─▶ y stream

``z`` is coded exactly as CompressAI codes it (its ``EntropyBottleneck``). The
entropy-parameter path — ``ẑ`` from the decoded z symbols, ``h_s`` (and the slice
transforms and LRP) in float64 on the CPU, ``μ`` and ``σ`` rounded to float32, ``σ``
lower-bounded at 0.11 — is run identically by encoder and decoder, so the decoder
reproduces the encoder's table rows and ``ŷ`` bit for bit even when the encoder ran the
analysis transforms on a GPU.

**Decoder target** (encoder only, ``target = η > 0``): the quantizer is given
``y + η·s`` instead of ``y``, with ``s`` the damped diagonal Gauss–Newton step towards a
latent that ``g_s`` decodes closer to the image (:func:`target_direction`). It folds the
linear term of the linearised image error, ``−2 (Jᵀ(x − g_s(y)))ᵀ e``, which the
per-channel distortion weights (the quadratic term) leave out, into the quantizer's
target. The decoder needs nothing (docs/design.md, "Decoder target"). ``η`` is a fixed
number, or chosen per image (:class:`RDTarget`, ``--target rd``): every candidate is
quantized and decoded, and the one of least ``λ·255²·MSE + bits per pixel`` (the model's
own RD cost) is coded.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from trellis import NUM_SCALES, PLAIN_CLASS, Quantizer, QuantizeResult, rans, scale_rows

from qft.codec.refine import SGARefine, refine_latents_at, refine_through_trellis
from qft.codec.steps import STEP_ENTROPY, StepContext, latent_steps
from qft.codec.tiling import receptive_radius, scaled, tiled, windows

__all__ = [
    "HYPERPRIOR_ENTROPY",
    "RD_ETAS",
    "QuantizedLatent",
    "LatentCoder",
    "RDTarget",
    "diag_jtj_probes",
    "target_direction",
    "target_record",
    "y_seal",
]

#: Entropy-model kinds (see :class:`qft.models.Architecture`) this coder handles.
HYPERPRIOR_ENTROPY = ("scale-hyperprior", "mean-scale-hyperprior")


#: Levenberg–Marquardt damping of :func:`target_direction`, × the median over channels of ``d``.
TARGET_DAMPING = 1.0
#: Gaussian pixel-space probes per image for ``d`` in :func:`target_direction`.
TARGET_PROBES = 4
#: Tile side (latent positions) of :func:`target_direction`, whose windows carry the
#: transform's halo (2 latents for g_s). 16: the autograd graph of a window (20² latents)
#: stays ≈ 0.15 GB.
TARGET_TILE = 16
#: ``η`` candidates of the per-image choice (:class:`RDTarget`).
RD_ETAS = (0.0, 0.125, 0.25, 0.375)


@dataclass(frozen=True)
class RDTarget:
    """The decoder target chosen per image by the model's RD cost.

    Each ``η`` of ``etas`` is quantized and decoded (``g_s``), and the one of least
    ``lmbda·255²·MSE(x, g_s(ŷ)) + y bits / pixels`` is kept (``ẑ``'s bits are the same for
    all). ``η = 0`` among the candidates means the choice never costs more than no target
    in that measure. ``lmbda``: the model's training λ (the weight of its RD loss).
    """

    lmbda: float
    etas: tuple[float, ...] = RD_ETAS

    def __post_init__(self):
        if not (math.isfinite(self.lmbda) and self.lmbda > 0):
            raise ValueError(f"lmbda must be a positive finite number, got {self.lmbda!r}")
        if not self.etas or not all(math.isfinite(e) and e >= 0 for e in self.etas):
            raise ValueError(f"etas must be non-negative finite numbers, got {self.etas!r}")


def target_record(target: float | RDTarget) -> float | str:
    """A decoder target as settings files, recipes and records write it: ``η``, or ``"rd"``
    for the per-image choice (whose λ is the model's own)."""
    return "rd" if isinstance(target, RDTarget) else float(target)


def diag_jtj_probes(shape: torch.Size, like: torch.Tensor, probes: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Hutchinson's probes of ``diag(JᵀJ)``, ``J`` the Jacobian of a decoder's output with
    respect to its latent ``y``: ``probes`` Gaussian pixel-space probes ``u_k ~ N(0, I)`` of
    ``shape`` (float32, drawn one after the other from ``gen`` on the CPU, then moved to
    ``like``'s device), so that ``v_k = Jᵀu_k`` has ``E[v_k²] = diag(JᵀJ)`` element by
    element.

    The one home of the probes: the decoder target (:func:`target_direction`, its ``v_k``
    tile by tile on one forward pass of each tile) and the per-channel sensitivity
    (:func:`qft.sensitivity.decoder_sensitivity`, one backward pass each of a retained
    whole graph) take their ``v_k`` of these and reduce them each their way."""
    return [torch.randn(shape, generator=gen, dtype=torch.float32).to(like) for _ in range(probes)]


def target_direction(
    g_s: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    seed: int = 0,
) -> np.ndarray:
    """The decoder-target step ``s = g / (d + ρ·median(d))`` of a batch of latents.

    ``g = Jᵀ(x − g_s(y))`` (``J`` the Jacobian of ``g_s`` at ``y``; the residual is zero
    on the ``padding`` ``(left, right, top, bottom)`` that :func:`qft.codec.image.pad`
    added), ``d_c`` the mean over channel ``c`` of ``diag(JᵀJ)`` estimated per image from
    :data:`TARGET_PROBES` seeded Gaussian probes (Hutchinson), ``ρ`` =
    :data:`TARGET_DAMPING`. Minimising ``Σ d e² − 2 g e`` (the linearised image error of a
    latent error ``e``) per element gives ``e = g / d``: ``y + s`` is one diagonal
    Gauss–Newton step towards a latent ``g_s`` decodes closer to ``x``, damped because the
    diagonal model overshoots in channels the decoder barely reads.

    Args:
        g_s: the synthesis transform.
        x: images ``(N, 3, H, W)`` on ``g_s``'s device, ``y``: their latents ``(N, C, h, w)``.

    Returns:
        ``s`` as float32 numpy ``(N, C, h, w)``.
    """
    left, right, top, bottom = padding
    gen = torch.Generator().manual_seed(seed)
    yt = y.detach().float()
    h, w = yt.shape[-2:]
    scale = Fraction(x.shape[-1], w)
    # Jᵀu = Σ_P J_Pᵀ u_P over tiles P of the *image*: the rows of J of a tile's pixels depend
    # only on the latents within the receptive radius of it, so a window of the tile's
    # latents and that halo gives its pixels exactly (qft.codec.tiling), and the backward
    # pass of the tile's cotangent adds J_Pᵀ u_P into the window (overlap-add); the probes
    # are drawn whole, the residual is the tile's own forward pass
    rr = receptive_radius(g_s)
    step, halo = (TARGET_TILE, math.ceil(rr[0])) if rr is not None else (max(h, w), 0)
    mask = torch.zeros_like(x[:, :1])
    mask[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right] = 1
    probes = diag_jtj_probes(x.shape, x, TARGET_PROBES, gen)
    g, *vs = (torch.zeros_like(yt) for _ in range(1 + TARGET_PROBES))
    for rows, cols, keep_rows, keep_cols in windows(h, w, step, halo):
        pixels = (..., scaled(keep_rows, scale), scaled(keep_cols, scale))
        own = (..., scaled(keep_rows, scale, rows.start), scaled(keep_cols, scale, cols.start))
        yw = yt[..., rows, cols].requires_grad_(True)
        with torch.enable_grad():
            out = g_s(yw)[own]
            residual = (x[pixels] - out.detach()) * mask[pixels]
            for k, (u, dest) in enumerate(zip((residual, *(p[pixels] for p in probes)), (g, *vs))):
                (v,) = torch.autograd.grad(out, yw, u, retain_graph=k < TARGET_PROBES)
                dest[..., rows, cols] += v
    d = torch.zeros(y.shape[:2], dtype=torch.float64)
    for v in vs:
        d += v.double().pow(2).mean((2, 3)).cpu() / TARGET_PROBES
    d = d + TARGET_DAMPING * d.median(dim=1, keepdim=True).values
    return (g.double().cpu() / d[:, :, None, None]).float().numpy()


def y_seal(indices: np.ndarray, seal: int = 0) -> int:
    """The seal of a y stream: CRC-32 of its indices (int32, decoding order) continuing
    ``seal``. It binds the stream to the header and to every decoded index, bypass-coded
    escapes included."""
    return zlib.crc32(np.ascontiguousarray(indices, "<i4").reshape(-1), seal)


def _per_channel(weights: np.ndarray | None) -> np.ndarray | None:
    """Per-channel weights ``(C,)`` as the ``(C, 1, 1)`` array the engine broadcasts."""
    return None if weights is None else np.asarray(weights, np.float64).reshape(-1, 1, 1)


@dataclass
class QuantizedLatent:
    """One image's latent after quantization (the encoder side of the codec).

    Attributes:
        y: the analysis output, float32 numpy ``(C, H, W)``.
        context: the coding state after ``ẑ`` (:class:`qft.codec.steps.StepContext`, no
            step committed), from which every quantization of this latent starts.
        result: the quantizer's output over the whole latent, step by step (indices,
            states, rows, dequantized values, table bits), in ``(C, H, W)`` layout.
        mu, sigma: the entropy parameters the steps gave (float32, ``σ >= 0.11``; ``None``
            before quantization: after the first step they depend on it).
        y_final: the latent ``g_s`` decodes: ``result.y_hat`` plus each step's LRP
            (``result.y_hat`` itself for models without one).
        z_string: the coded hyper-latent.
        z_shape: spatial size of ``z``.
        z_bits_estimated: ``-Σ log2`` of the ``EntropyBottleneck`` likelihoods of ``ẑ``.
        direction: the decoder-target step :func:`target_direction` (``None`` when the
            latent was analysed without a target); the quantizer saw ``y + target·direction``.
        target: the ``η`` of that quantization (for an :class:`RDTarget`, the one chosen).
        image: the padded image ``(1, 3, H, W)`` on the model's device and its
            ``padding``, kept with ``direction`` for the per-image choice of ``η``.
    """

    y: np.ndarray
    context: StepContext
    result: QuantizeResult | None
    mu: np.ndarray | None
    sigma: np.ndarray | None
    y_final: np.ndarray | None
    z_string: bytes
    z_shape: tuple[int, int]
    z_bits_estimated: float
    direction: np.ndarray | None = None
    target: float = 0.0
    image: torch.Tensor | None = None
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def y_hat(self) -> np.ndarray:
        """The decoder's latent (:attr:`y_final`)."""
        if self.y_final is None:
            raise ValueError("this latent is not quantized yet")
        return self.y_final


class LatentCoder:
    """Quantizes and codes the latent of any step-wise coded model (hyperpriors, channel
    slices, checkerboard groups; :mod:`qft.codec.steps`) with any quantizer.

    The quantizer is an argument of each call, so one coder (and its float64 copy of the
    entropy path) serves every quantizer.

    Args:
        model: a model with ``g_a``, ``g_s``, a hyper-analysis and a z
            ``EntropyBottleneck``; CDFs up to date (``update(force=True)``).
        entropy: its entropy-model kind, one of :data:`qft.codec.steps.STEP_ENTROPY`.
        dtype: precision of the entropy path (float64: the codec's; float32: the model's
            own arithmetic, e.g. to compare with its ``compress``).

    Where an LRP follows a step, the quantizer measures distortion on the dequantized
    values (target ``y_i``), not on the final ones: measured better by 9–13 % BD
    (docs/design.md, "Step-wise latent coding").
    """

    def __init__(self, model: torch.nn.Module, entropy: str, dtype: torch.dtype = torch.float64):
        if entropy not in STEP_ENTROPY:
            raise ValueError(f"entropy must be one of {STEP_ENTROPY}, got {entropy!r}")
        self.model = model
        self.entropy = entropy
        self.steps = latent_steps(model, entropy, dtype)

    # -- encoder ------------------------------------------------------------------------
    @torch.no_grad()
    def analyse(
        self,
        x: torch.Tensor,
        refine: SGARefine | None = None,
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        stop: int | None = None,
    ):
        """Analysis and hyper-latent coding of a batch ``(N, 3, H, W)`` (``H``, ``W``
        multiples of 64), everything the quantizer needs and nothing it does. With
        ``refine`` (hyperprior models), ``y`` and ``z`` are the latents
        :func:`qft.codec.refine.refine_latents` gives (``padding``: the zero padding of
        ``x``, outside its MSE; ``stop``: run only the first ``stop`` steps of its
        schedule), and ``ẑ`` is coded from the refined ``z``.

        Returns:
            ``(y, contexts, z_strings, z_shape, z_bits)``: float32 numpy ``y``
            ``(N, C, h, w)``, one :class:`~qft.codec.steps.StepContext` per image, the
            coded hyper-latents, their spatial size and ``-Σ log2`` of their
            ``EntropyBottleneck`` likelihoods per image.
        """
        if refine is not None:
            return self._refined(x, refine, padding, (refine.steps if stop is None else stop,))[0]
        y = tiled(self.model.g_a, x)
        return self._code_hyper(y, self.steps.hyper_analysis(y))

    def _refined(self, x: torch.Tensor, refine: SGARefine, padding, stops: tuple[int, ...]) -> list[tuple]:
        """:meth:`analyse`'s tuples after each of ``stops`` steps of one SGA run
        (:func:`qft.codec.refine.refine_latents_at`)."""
        if self.entropy not in HYPERPRIOR_ENTROPY:
            raise ValueError("the SGA refinement needs a hyperprior model")
        return [
            self._code_hyper(y, z) for y, z in refine_latents_at(self.model, x, refine, stops, self.entropy, padding)
        ]

    def _code_hyper(self, y: torch.Tensor, z: torch.Tensor):
        """:meth:`analyse`'s tuple for the latents ``y``, ``z`` of a batch: ``ẑ`` coded."""
        eb = self.steps.z_bottleneck
        z_strings = eb.compress(z)
        z_hat = eb.decompress(z_strings, z.shape[-2:])
        _, z_lik = eb(z, training=False)
        z_bits = -torch.log2(z_lik).flatten(1).sum(1).cpu()
        return y.float().cpu().numpy(), self.steps.contexts(z_hat), z_strings, tuple(z.shape[-2:]), z_bits

    @torch.no_grad()
    def latents(
        self,
        x: torch.Tensor,
        direction: bool = False,
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        refine: SGARefine | None = None,
        stop: int | None = None,
    ) -> list[QuantizedLatent]:
        """:meth:`analyse` of a batch ``(N, 3, H, W)`` as latents to quantize (``result``
        ``None``), with the decoder-target step when ``direction`` (``padding``: the zero
        padding of ``x``, outside the target's residual and the refinement's MSE), refined
        by ``refine`` (:mod:`qft.codec.refine`) when given, by the first ``stop`` steps of
        its schedule when ``stop`` is given."""
        return self._latents(x, self.analyse(x, refine, padding, stop), direction, padding)

    def _latents(self, x: torch.Tensor, analysis: tuple, direction: bool, padding) -> list[QuantizedLatent]:
        """:meth:`latents` from :meth:`analyse`'s tuple for ``x``."""
        y, contexts, z_strings, z_shape, z_bits = analysis
        step = None
        if direction:
            step = target_direction(self.model.g_s, x, torch.from_numpy(y).to(x.device), padding)
        return [
            QuantizedLatent(
                y=y[i],
                context=ctx,
                result=None,
                mu=None,
                sigma=None,
                y_final=None,
                z_string=z_strings[i],
                z_shape=z_shape,
                z_bits_estimated=float(z_bits[i]),
                direction=None if step is None else step[i],
                image=None if step is None else x[i : i + 1],
                padding=tuple(padding),
            )
            for i, ctx in enumerate(contexts)
        ]

    @torch.no_grad()
    def quantize(
        self,
        x: torch.Tensor,
        quantizer: Quantizer,
        weights: np.ndarray | None = None,
        target: float | RDTarget = 0.0,
        padding: tuple[int, int, int, int] = (0, 0, 0, 0),
        refine: SGARefine | None = None,
    ) -> list[QuantizedLatent]:
        """:meth:`latents` and their quantization (:meth:`requantize`), for a batch
        ``(N, 3, H, W)``.

        ``H`` and ``W`` must be multiples of 64. The analysis transforms and the coding of
        ``z`` run on ``x``'s (the model's) device; the entropy parameters and the quantizer
        on the CPU. ``weights``: per-channel distortion weights ``(C,)`` of RDOQ/TCQ
        (encoder only; see :meth:`trellis.Quantizer.quantize`). ``target``: ``η`` of the
        decoder target (module docstring; 0: none) or an :class:`RDTarget`; ``padding``:
        the zero padding of ``x``, outside the target's residual and the choice's MSE;
        ``refine``: an SGA refinement of the latents before quantization
        (:mod:`qft.codec.refine`), which the refined ``y`` is the quantizer's target of;
        for a trellis quantizer its last steps run through the relaxed trellis
        (:meth:`SGARefine.split`, :func:`qft.codec.refine.refine_through_trellis`).
        """
        if refine is None:
            latents = self.latents(x, bool(target), padding)
            return [self.requantize(lat, quantizer, weights, target) for lat in latents]
        if self.entropy not in HYPERPRIOR_ENTROPY:
            raise ValueError("the SGA refinement needs a hyperprior model")
        sga, soft = refine.split(quantizer)
        # one SGA schedule over all the steps: its first `sga` steps, then the trellis's
        latents = self.latents(x, bool(target), padding, refine if sga else None, stop=sga)
        return self._through_trellis(latents, x, quantizer, weights, target, padding, refine, soft)

    @torch.no_grad()
    def quantize_or_usq(
        self,
        x: torch.Tensor,
        quantizer: Quantizer,
        weights: np.ndarray | None,
        padding: tuple[int, int, int, int],
        refine: SGARefine,
    ) -> tuple[list[QuantizedLatent], list[QuantizedLatent]]:
        """``quantize(x, quantizer, weights, 0, padding, refine)`` and ``quantize(x,
        Quantizer("usq"), None, 0, padding, refine)`` (hyperprior models), exactly, from one
        SGA run: the steps SGA-N + USQ's schedule starts with are those the trellis takes
        over from (:func:`qft.codec.refine.refine_latents_at`), so the encoder's USQ
        fallback (:attr:`SGARefine.usq_fallback`) runs them once, not twice."""
        sga, soft = refine.split(quantizer)
        stops = tuple(sorted({s for s in (sga, refine.steps) if s}))
        runs = [self._latents(x, a, False, padding) for a in self._refined(x, refine, padding, stops)]
        own = runs[0] if sga else self.latents(x, False, padding)
        usq = Quantizer("usq")
        return (
            self._through_trellis(own, x, quantizer, weights, 0.0, padding, refine, soft),
            [self.requantize(lat, usq) for lat in runs[-1]],
        )

    def _through_trellis(self, latents, x, quantizer, weights, target, padding, refine, soft):
        """``latents`` after ``soft`` steps through the relaxed trellis of ``quantizer``
        (none: as they are), quantized (:meth:`quantize`)."""
        out = []
        for i, lat in enumerate(latents):
            if soft:
                mu, sigma = self.first_parameters(lat)
                y = refine_through_trellis(
                    self.model, x[i : i + 1], lat.y, mu, sigma, quantizer, weights, refine, soft, padding
                )
                lat = dataclasses.replace(lat, y=y)
            out.append(self.requantize(lat, quantizer, weights, target))
        return out

    def first_parameters(self, lat: QuantizedLatent) -> tuple[np.ndarray, np.ndarray]:
        """``(μ, σ)`` of the first coding step of ``lat`` from its coded ``ẑ`` alone
        (float32, the step's layout; for a hyperprior model, those of the whole latent)."""
        return self.steps.parameters(dataclasses.replace(lat.context, finals=[], support=None), 0)

    @torch.no_grad()
    def requantize(
        self,
        lat: QuantizedLatent,
        quantizer: Quantizer,
        weights: np.ndarray | None = None,
        target: float | RDTarget = 0.0,
    ) -> QuantizedLatent:
        """The same analysis (y, z) quantized with another quantizer (weights, target),
        step by step: each step's ``μ, σ`` come from the final values of the steps before
        it, exactly as the decoder computes them.

        Raises:
            ValueError: ``target`` negative or not finite; a target for a latent analysed
                without the decoder target.
        """
        if isinstance(target, RDTarget):
            return min(
                (self._quantize_rd(lat, quantizer, weights, eta, target.lmbda) for eta in target.etas),
                key=lambda c: c[0],
            )[1]
        if not (np.isfinite(target) and target >= 0):
            raise ValueError(f"target must be a non-negative finite number, got {target!r}")
        if target > 0 and lat.direction is None:
            raise ValueError("this latent was analysed without the decoder target; quantize it with a target first")
        y = lat.y if target == 0 else lat.y + np.float32(target) * lat.direction
        w = _per_channel(weights)
        steps = self.steps
        ctx = dataclasses.replace(lat.context, finals=[], support=None)
        parts, mus, sigmas = [], [], []
        for i in range(steps.num_steps):
            mu, sigma = steps.parameters(ctx, i)
            wi = None if w is None else w[steps.step_channels(i)]
            res = quantizer.quantize(steps.gather(i, y), mu, sigma, weights=wi)
            steps.commit(ctx, i, res.y_hat)
            parts.append(res)
            mus.append(mu)
            sigmas.append(sigma)
        result = QuantizeResult(
            *(self._assemble([getattr(p, f) for p in parts], lat.y.shape) for f in QuantizeResult._fields[:4]),
            bits=float(sum(p.bits for p in parts)),
        )
        mu, sigma = self._assemble(mus, lat.y.shape), self._assemble(sigmas, lat.y.shape)
        y_final = steps.final(ctx)
        return dataclasses.replace(lat, result=result, mu=mu, sigma=sigma, y_final=y_final, target=target)

    def _assemble(self, parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """The steps' arrays (their layouts) as one latent-shaped ``(C, H, W)`` array."""
        out = np.empty(shape, parts[0].dtype)
        for i, part in enumerate(parts):
            self.steps.scatter(i, out, part)
        return out

    def _quantize_rd(
        self, lat: QuantizedLatent, quantizer: Quantizer, weights: np.ndarray | None, eta: float, lmbda: float
    ) -> tuple[float, QuantizedLatent]:
        """``(λ·255²·MSE + y bits / pixels, latent)`` of one candidate ``η`` (MSE of
        ``g_s(ŷ)`` in ``[0, 1]`` on the unpadded image)."""
        if lat.image is None:
            raise ValueError("this latent was analysed without the decoder target; quantize it with a target first")
        q = self.requantize(lat, quantizer, weights, eta)
        left, right, top, bottom = lat.padding
        pixels = (lat.image.shape[-2] - top - bottom) * (lat.image.shape[-1] - left - right)
        return lmbda * 255**2 * self.mse(q.y_hat, lat.image, lat.padding) + q.result.bits / pixels, q

    def render(self, y_hat: np.ndarray, device: torch.device | str) -> torch.Tensor:
        """The decoder's image ``g_s(ŷ)`` ``(1, 3, H, W)`` in ``[0, 1]`` of a latent ``y_hat``
        ``(C, h, w)``, on ``device``, at the padded size (:func:`~qft.codec.image.crop` it)."""
        return tiled(self.model.g_s, torch.from_numpy(y_hat)[None].to(device)).clamp_(0, 1)

    def mse(self, y_hat: np.ndarray, x: torch.Tensor, padding: tuple[int, int, int, int]) -> float:
        """The mean squared error of :meth:`render` of ``y_hat`` against the zero-padded
        image ``x`` ``(1, 3, H, W)`` (``padding``: ``(left, right, top, bottom)``) over the
        unpadded pixels, summed in float64."""
        left, right, top, bottom = padding
        rows, cols = slice(top, x.shape[-2] - bottom), slice(left, x.shape[-1] - right)
        x_hat, x = self.render(y_hat, x.device)[..., rows, cols], x[..., rows, cols]
        # in bands of rows: float64 copies of the whole image cost 24 bytes a pixel each
        sse = sum(
            (x_hat[..., r : r + 256, :] - x[..., r : r + 256, :]).double().pow(2).sum().item()
            for r in range(0, x.shape[-2], 256)
        )
        return sse / x.numel()

    def symbols(self, q: QuantizedLatent) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, rows)`` of a quantized latent, flat, in decoding order (step by
        step, each in its layout)."""
        steps, res = self.steps, q.result
        return tuple(
            np.concatenate([steps.gather(i, a).reshape(-1) for i in range(steps.num_steps)])
            for a in (res.indices, res.rows)
        )

    def encode(self, q: QuantizedLatent, quantizer: Quantizer, seal: int = 0) -> bytes:
        """The y stream of one quantized latent, sealed (:func:`trellis.rans.encode`) with
        :func:`y_seal` of its indices and ``seal`` (the container header's): one rANS
        stream for all steps, in coding order."""
        tab = quantizer.table
        indices, rows = self.symbols(q)
        return rans.encode(indices, rows, tab.cdf, tab.cdf_length, tab.offset, y_seal(indices, seal))

    # -- decoder ------------------------------------------------------------------------
    def decode_z(self, z_string: bytes, z_shape) -> torch.Tensor:
        """``ẑ`` ``(1, N, h, w)`` from the z stream, as CompressAI's
        ``EntropyBottleneck.decompress`` returns it (its stream format; tested equal), but
        decoded by :func:`trellis.rans.decode`, which checks that the stream ends exactly
        with its last symbol and never reads past it: a stream that does not hold
        ``z_shape`` symbols raises instead of decoding garbage (or reading out of bounds).

        Raises:
            trellis.rans.CorruptStreamError: damaged stream, or one of another size.
        """
        eb = self.steps.z_bottleneck
        cdf = np.ascontiguousarray(eb._quantized_cdf.cpu().numpy(), np.int32)
        channels, (h, w) = cdf.shape[0], tuple(int(n) for n in z_shape)
        rows = np.repeat(np.arange(channels, dtype=np.int64), h * w)
        symbols = rans.decode(
            z_string,
            rows,
            1,
            np.zeros((1, 2), np.int64),
            np.zeros(1, np.int64),
            channels,
            cdf,
            np.ascontiguousarray(eb._cdf_length.cpu().numpy(), np.int32),
            np.ascontiguousarray(eb._offset.cpu().numpy(), np.int32),
            name="z stream",
        )
        medians = eb.quantiles[:, :, 1:2].detach().cpu().reshape(1, channels, 1, 1)
        return torch.from_numpy(symbols).reshape(1, channels, h, w).type_as(medians) + medians

    @torch.no_grad()
    def decode(self, z_string: bytes, z_shape, y_stream: bytes, quantizer: Quantizer, seal: int = 0):
        """``(ŷ, indices, states)`` as numpy ``(C, H, W)`` from the two streams; ``ŷ`` is
        the latent ``g_s`` decodes (the final values, LRP included).

        ``z_shape`` is the spatial size of ``z``; the latent's shape follows from the
        steps; ``seal``: the y stream's (:meth:`encode`). The z stream is decoded (and
        checked) first, so a ``z_shape`` the streams do not hold fails before the
        latent-sized arrays are allocated.

        Raises:
            trellis.rans.CorruptStreamError: a stream is damaged or does not fit ``z_shape``.
        """
        z_hat = self.decode_z(z_string, z_shape)
        steps, q = self.steps, quantizer
        (ctx,) = steps.contexts(z_hat)
        tab = q.table
        next_state, state_class = q.selector
        decoder = rans.StreamDecoder(y_stream)
        indices, states = [], []
        for i in range(steps.num_steps):
            mu, sigma = steps.parameters(ctx, i)
            rows = scale_rows(sigma)
            k = decoder.decode(
                rows,
                q.chain_length(mu.shape),
                next_state,
                state_class,
                NUM_SCALES,
                tab.cdf,
                tab.cdf_length,
                tab.offset,
                q.plain_rows,
                PLAIN_CLASS,
            ).reshape(mu.shape)
            y_hat, s = q.dequantize(k, mu, scale_rows=rows)
            steps.commit(ctx, i, y_hat)
            indices.append(k)
            states.append(s)
        decoder.finish(lambda symbols: y_seal(symbols, seal))
        return steps.final(ctx), self._assemble(indices, ctx.shape), self._assemble(states, ctx.shape)
