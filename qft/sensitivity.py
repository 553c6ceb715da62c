"""Per-channel decoder sensitivity of step-coded models: distortion weights for the trellis.

A latent error does not cost the same in every channel: the synthesis transform ``g_s``
maps some channels to large image changes and ignores others. For a latent ``ŷ`` of
``M`` channels (``ŷ`` = the USQ-quantized latent of an image, the codec's operating
point: the latent ``g_s`` decodes, for channel-slice models the final values with their
latent residual prediction) the *sensitivity* of channel ``c`` is

.. math::

    s_c = \\frac{\\operatorname{MSE}_{pix}\\big(g_s(ŷ + e_c),\\ g_s(ŷ)\\big)}
               {\\operatorname{MSE}_c(e_c)}

where ``e_c`` is quantization-sized noise (i.i.d. uniform in ``[-Δ/2, Δ/2)``, ``Δ`` =
``step``) on every position of channel ``c`` and zero elsewhere, the numerator is the
mean squared difference over the ``P = 3·H·W`` values of the decoded image (the model's
``[0, 1]`` output, not clamped) and the denominator the mean of ``e_c²`` over the
``h·w`` positions of channel ``c``. ``s_c`` is averaged over images (and noise draws).
To first order, with ``J`` the Jacobian of ``g_s`` at ``ŷ`` and ``J_c`` its columns of
channel ``c``, ``s_c = ‖J_c‖_F² / P``, independent of ``Δ``; and for independent
zero-mean errors in all channels

.. math::

    \\operatorname{MSE}_{pix} \\approx \\sum_c s_c\\,\\operatorname{MSE}_c(e),

so ``Σ_c s_c Σ_{i∈c} e_i²`` is (``h·w`` times) the image MSE the latent error causes: the
per-channel distortion weight of the trellis objective ``Σ w (r - t)² + λ R`` of
:meth:`trellis.Quantizer.quantize`. Per latent element, one unit of latent squared error
in channel ``c`` costs ``s_c · P / (h·w)`` units of image squared error (``768 s_c``
for a 16× downsampling with 3 colours).

Two estimators:

``"exact"``
    ``s_c`` as defined: one perturbed decoder pass per channel, noise draw and image
    (copies batched along the batch dimension), under ``torch.no_grad``. Cost: ``M ×
    probes`` decoder passes per image. It includes the decoder's nonlinearity at the
    given ``Δ``.

``"vjp"``
    Hutchinson's estimator of the linearised ``s_c``: for ``K = probes`` Gaussian
    pixel-space probes ``u_k ~ N(0, I_P)``, ``g_k = Jᵀ u_k`` by one backward pass each
    (one forward pass per image, graph retained), and ``E[Σ_{i∈c} g_{k,i}²] = ‖J_c‖_F²``,
    so ``ŝ_c = (1/K) Σ_k Σ_{i∈c} g_{k,i}² / P``. All channels come from the same ``K``
    passes: cost ``1 + K`` passes per image, whatever ``M``. ``step`` is not used.

Example::

    >>> from qft.models import load_checkpoint
    >>> from qft.codec import list_images
    >>> model = load_checkpoint("mbt2018-mean-0.013.pth").model
    >>> s = decoder_sensitivity(model, list_images("bsds500/val")[:8])
    >>> w = normalise_weights(s)
    >>> Quantizer("tcq8", step=0.7, lam=0.005).quantize(y, mu, sigma, weights=w[:, None, None])
"""

from __future__ import annotations

import os

from collections.abc import Sequence

import numpy as np
import torch

from tqdm import tqdm

from trellis import Quantizer

from qft.codec.image import pad, read_image, to_tensor
from qft.codec.latent import LatentCoder, QuantizedLatent, diag_jtj_probes
from qft.codec.steps import STEP_ENTROPY
from qft.models import ARCHITECTURES
from qft.threads import set_threads

__all__ = [
    "METHODS",
    "center_crop",
    "channel_rates",
    "decoder_sensitivity",
    "estimate_weights",
    "image_tensor",
    "normalise_weights",
    "usq_latent",
]

#: Estimators of :func:`decoder_sensitivity`.
METHODS = ("vjp", "exact")

#: Perturbed copies per decoder pass of the ``exact`` estimator, per device type. On the
#: CPU a batch of 1–2 is the fastest per pass (N=64/M=96, 256² crop, one thread: 0.046 s
#: per pass at batch 1 or 2, 0.055 s at 8, 0.065 s at 16); GPUs want wide batches.
EXACT_BATCH = {"cpu": 2, "cuda": 16}


def _entropy_kind(model: torch.nn.Module) -> str:
    for arch in ARCHITECTURES.values():
        if type(model) is arch.cls and arch.entropy in STEP_ENTROPY:
            return arch.entropy
    raise ValueError(
        f"decoder sensitivity needs a step-wise coded model (entropy {', '.join(STEP_ENTROPY)}: "
        f"bmshj2018-hyperprior, mbt2018-mean, tcm, dcae, cca), got {type(model).__name__}"
    )


def center_crop(x: torch.Tensor, crop: int | None) -> torch.Tensor:
    """Centre crop of ``(1, 3, H, W)`` to ``crop`` (each side at most its largest multiple
    of 64), then zero padding to a multiple of 64 (only for sides below 64 or ``crop=None``)."""
    if crop is not None:
        h, w = x.shape[-2:]
        th = min(crop, h // 64 * 64) if h >= 64 else h
        tw = min(crop, w // 64 * 64) if w >= 64 else w
        top, left = (h - th) // 2, (w - tw) // 2
        x = x[..., top : top + th, left : left + tw]
    return pad(x)[0]


def image_tensor(image) -> torch.Tensor:
    """An image as ``(1, 3, H, W)`` float32 in [0, 1]: a path is read, a uint8 ``(H, W, 3)``
    array converted.

    Raises:
        ValueError: anything else.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"images must be paths or uint8 arrays of shape (H, W, 3), got {a.dtype} {a.shape}")
    return to_tensor(a)


def usq_latent(coder: LatentCoder, x: torch.Tensor) -> QuantizedLatent:
    """The codec's USQ quantization (``trellis.Quantizer("usq")``, step 1) of one image
    ``x`` ``(1, 3, H, W)``: :meth:`~qft.codec.LatentCoder.quantize`, step by step for
    channel-slice models. Its ``y_hat`` is the latent ``g_s`` decodes (LRP included).

    The USQ kernel is Numba's: its first parallel call resets the OpenMP thread count that
    torch shares (:mod:`qft.threads`), so torch's count is restored afterwards and the
    decoder passes that follow run on the caller's threads.
    """
    threads = torch.get_num_threads()
    try:
        (q,) = coder.quantize(x, Quantizer("usq"))
    finally:
        set_threads(threads, numba=False)
    return q


def _exact(g_s, y_hat: torch.Tensor, step: float, draws: int, gen: torch.Generator) -> np.ndarray:
    """Sum over draws of ``MSE_pix / MSE_c`` per channel for one latent ``(1, M, h, w)``."""
    _, m, h, w = y_hat.shape
    base = g_s(y_hat)
    batch = EXACT_BATCH.get(y_hat.device.type, 16)
    out = np.zeros(m)
    for _ in range(draws):
        for c0 in range(0, m, batch):
            chans = torch.arange(c0, min(c0 + batch, m))
            b = len(chans)
            e = (torch.rand((b, h, w), generator=gen, dtype=torch.float64) - 0.5) * step
            x = y_hat.repeat(b, 1, 1, 1)
            x[torch.arange(b), chans] += e.to(x)
            pix = (g_s(x) - base).double().pow(2).mean((1, 2, 3))
            lat = e.pow(2).mean((1, 2))
            out[c0 : c0 + b] += (pix.cpu() / lat).numpy()
    return out


def _vjp(g_s, y_hat: torch.Tensor, probes: int, gen: torch.Generator) -> np.ndarray:
    """Sum over probes of ``Σ_{i∈c} (Jᵀu)_i² / P`` per channel for one latent ``(1, M, h, w)``."""
    y = y_hat.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        x_hat = g_s(y)
        out = np.zeros(y.shape[1])

        us = diag_jtj_probes(x_hat.shape, x_hat, probes, gen)
        for k, u in enumerate(us):
            (g,) = torch.autograd.grad(x_hat, y, u, retain_graph=k < len(us) - 1)
            out += g.double().pow(2).sum((0, 2, 3)).cpu().numpy() / x_hat.numel()
    return out


def decoder_sensitivity(
    model: torch.nn.Module,
    images: Sequence,
    *,
    method: str = "vjp",
    step: float = 1.0,
    probes: int = 8,
    crop: int | None = 256,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Per-channel sensitivity ``s_c`` of the synthesis transform ``g_s`` (module docstring).

    Each image is centre-cropped, analysed and quantized with USQ at step 1 by
    :meth:`qft.codec.LatentCoder.quantize` with ``trellis.Quantizer("usq")`` (step by step
    for channel-slice models; ``ŷ`` = the latent ``g_s`` decodes, LRP included); ``s_c`` is
    then measured at that ``ŷ`` and averaged over the images. The model runs in eval mode
    on its own device (its training flag is restored afterwards); its weights are not
    changed. torch's thread count is restored after each Numba USQ kernel, so the decoder
    passes run on the caller's threads.

    Args:
        model: a step-wise coded model (:data:`qft.codec.steps.STEP_ENTROPY`:
            ``bmshj2018-hyperprior``, ``mbt2018-mean``, ``tcm``, ``dcae``, ``cca``) with
            up-to-date CDF tables (as :func:`qft.models.load_checkpoint` and
            :func:`qft.models.create_model` return).
        images: image files (``str`` or path-like, read with :func:`qft.codec.read_image`)
            and/or RGB ``uint8`` arrays of shape ``(H, W, 3)``.
        method: ``"vjp"`` (Hutchinson estimate of the linearised ``s_c``; ``1 + probes``
            decoder passes per image) or ``"exact"`` (one perturbed pass per channel and
            noise draw; ``M × probes`` passes per image).
        step: width ``Δ`` of the uniform noise ``[-Δ/2, Δ/2)`` of ``"exact"``; the
            linearised ``"vjp"`` estimate does not depend on it.
        probes: ``"vjp"``: Gaussian pixel-space probes per image; ``"exact"``: noise draws
            per channel and image (1–2 suffice when averaging over several images).
        crop: side of the centre crop, a positive multiple of 64 (a side shorter than
            ``crop`` is cropped to its largest multiple of 64 instead; sides below 64 are
            zero-padded), bounding the cost; ``None`` keeps the whole image (zero-padded
            to a multiple of 64, as the codec does).
        seed: seeds the noise and the probes (a ``torch.Generator`` on the CPU): equal
            arguments give bit-identical results on the same machine and thread count.
        progress: show a progress bar over the images (stderr).

    Returns:
        ``float64`` array ``(M,)``: ``s_c >= 0`` in image MSE (``[0, 1]`` pixel scale) per
        unit of latent MSE in channel ``c``.

    Raises:
        ValueError: unsupported model, unknown method, bad ``step``/``probes``/``crop``,
            no images, or an image that is neither a path nor an ``(H, W, 3)`` uint8 array.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    if not (isinstance(probes, (int, np.integer)) and probes >= 1):
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if crop is not None and not (isinstance(crop, (int, np.integer)) and crop > 0 and crop % 64 == 0):
        raise ValueError(f"crop must be a positive multiple of 64 or None, got {crop!r}")
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    coder = LatentCoder(model, _entropy_kind(model))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    total = None
    try:
        for image in tqdm(images, desc=f"sensitivity ({method})", disable=not progress, leave=False):
            x = center_crop(image_tensor(image), crop).to(device)
            y_hat = torch.from_numpy(usq_latent(coder, x).y_hat)[None].to(device)
            if method == "exact":
                with torch.no_grad():
                    s = _exact(model.g_s, y_hat, float(step), int(probes), gen)
            else:
                s = _vjp(model.g_s, y_hat, int(probes), gen)
            total = s if total is None else total + s
    finally:
        model.train(was_training)
    return total / (len(images) * probes)


def normalise_weights(s, rates=None, *, floor: float = 1e-3) -> np.ndarray:
    """Distortion weights from sensitivities: ``w ∝ s``, mean 1, all ``> 0`` and finite.

    Without ``rates`` the plain mean of ``w`` is 1. With per-channel ``rates`` (e.g. mean
    bits per latent element of each channel) the *rate-weighted* mean ``Σ r_c w_c / Σ r_c``
    is 1: channels that carry no bits (nearly always quantized to zero) then do not move
    the scale, so the channels that carry the rate keep, on average, the ``λ`` the
    unweighted trellis was calibrated with. Values below ``floor`` times the mean are raised
    to it before the final normalisation (a channel the decoder ignores still gets a small
    positive weight, so ``λ / w`` stays finite).

    Args:
        s: sensitivities, shape ``(M,)``, finite, ``>= 0``, not all 0.
        rates: optional per-channel rates ``>= 0`` of shape ``(M,)``, not all 0.
        floor: relative lower bound, in ``(0, 1]``.

    Returns:
        ``float64`` array ``(M,)`` (``weights=w[:, None, None]`` for
        :meth:`trellis.Quantizer.quantize` with ``(C, H, W)`` latents).

    Raises:
        ValueError: bad shapes or values.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all() or (s < 0).any() or not (s > 0).any():
        raise ValueError("s must be a non-empty 1-D array of finite values >= 0, not all 0")
    if not (0 < floor <= 1):
        raise ValueError(f"floor must lie in (0, 1], got {floor!r}")
    if rates is None:
        r = np.ones_like(s)
    else:
        r = np.asarray(rates, dtype=np.float64)
        if r.shape != s.shape or not np.isfinite(r).all() or (r < 0).any() or not (r > 0).any():
            raise ValueError(f"rates must be finite, >= 0, not all 0 and of shape {s.shape}")
    r = r / r.sum()

    def mean(v):
        return float(np.dot(r, v))

    if mean(s) <= 0:  # all the rate in channels of zero sensitivity
        raise ValueError("s is 0 on every channel that carries rate")
    w = np.maximum(s / mean(s), floor)
    return w / mean(w)


@torch.no_grad()
def channel_rates(model: torch.nn.Module, images: Sequence, *, crop: int | None = 256) -> tuple[np.ndarray, float]:
    """Mean table bits per latent element of each channel's USQ indices, over ``images``
    (cropped and quantized as in :func:`decoder_sensitivity`; every step of a
    channel-slice model), and the ``y`` rate in bits per pixel."""
    coder = LatentCoder(model, _entropy_kind(model))
    table = Quantizer("usq").table
    device = next(model.parameters()).device
    total, bits_all, pixels = None, 0.0, 0
    for img in images:
        x = center_crop(image_tensor(img), crop).to(device)
        res = usq_latent(coder, x).result
        per_channel = table.index_bits(res.rows, res.indices).mean(axis=(1, 2))
        total = per_channel if total is None else total + per_channel
        bits_all += res.bits
        pixels += x.shape[-2] * x.shape[-1]
    return total / len(images), bits_all / pixels


def estimate_weights(
    model: torch.nn.Module, images: Sequence, *, probes: int = 8, crop: int | None = 256, seed: int = 0
) -> dict:
    """The decoder weights stored by ``qft calibrate --weights``: ``vjp`` sensitivities
    normalised to a rate-weighted mean of 1 (:func:`normalise_weights` with
    :func:`channel_rates`), so the calibrated λ keeps its meaning on the channels that
    carry the bits.

    Returns:
        ``{"decoder": [w_c, …], "sensitivity": [s_c, …], "rates": [bits, …], "estimator": …}``
    """
    s = decoder_sensitivity(model, images, method="vjp", probes=probes, crop=crop, seed=seed, progress=False)
    rates, _ = channel_rates(model, images, crop=crop)
    return {
        "decoder": normalise_weights(s, rates).tolist(),
        "sensitivity": s.tolist(),
        "rates": rates.tolist(),
        "estimator": f"vjp, {probes} probes per image, {crop}-pixel centre crops, seed {seed}, {len(images)} images",
    }
