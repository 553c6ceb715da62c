"""The finetuning objectives and their batches.

Four variants, ``parts`` × quantized/control (``x`` the image crop, ``λ`` the base
model's rate point, all latents from the frozen ``g_a``/``h_a``):

=====================  =========================================================================
variant                loss
=====================  =========================================================================
decoder                ``λ·255²·MSE(x, g_s(ŷ))``, ``ŷ`` the cached quantizer output (rate constant)
decoder+hyperdecoder   ``λ·255²·MSE(x, g_s(μ + t)) + bpp``, ``μ, σ = h_s(ẑ)``, ``t = ŷ₀ − μ₀`` the
                       cached reconstruction offset of the fixed index ``k``, bpp
                       ``= −log2 P(k)`` with ``P(k)`` the Gaussian ``N(0, σ²)`` mass of
                       ``k``'s decision cell in its quantizer class (state-dependent for TCQ)
control, decoder       ``λ·255²·MSE(x, g_s(y + u))``, ``u ~ U(−½, ½)`` (CompressAI's proxy)
control, decoder+h.    ``λ·255²·MSE(x, g_s(y + u)) + bpp``, ``μ, σ = h_s(z + u')``,
                       bpp from the mass of ``[y + u − μ − ½, y + u − μ + ½)``
=====================  =========================================================================

With fixed indices the residual-domain cell, hence the rate, does not depend on ``μ``:
``μ`` only moves the reconstruction, it acts as a learned offset of ``ŷ``. ``σ`` is
lower-bounded at 0.11 and the likelihoods at 1e-9 by the model's own
``GaussianConditional`` bounds. Noise comes from the batch sampler (seeded per step and
batch element), so runs are reproducible and independent of the number of processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from torch import nn

from trellis import Quantizer
from trellis.tables import cell_bounds

from qft.finetune.cache import LatentCache
from qft.train.loop import transforms_autocast

__all__ = [
    "FinetuneObjective",
    "decode_centre",
    "forward_window",
    "hyper_window",
    "assemble_batch",
    "batch_to_device",
    "sample_crops",
    "index_cells",
    "cell_mass",
]


G_S_REACH = 2  # latents: g_s of the hyperprior family reaches 32 pixels; the crops' context
Z_CONTEXT = 2  # ẑ latents of context for h_s (it reaches 1 ẑ latent up/left, 2 down/right)


def hyper_window(shape: tuple[int, int], top: int, left: int, size: int) -> tuple[slice, slice, int, int]:
    """The ``ẑ`` window (rows, columns) whose ``h_s`` output holds the exact ``μ, σ`` of the
    latent crop ``(top, left, size)`` (multiples of 4): :data:`Z_CONTEXT` ``ẑ`` latents
    around the crop's own ``size/4``, clipped to the ``ẑ`` array of ``shape`` (the whole
    image's computation has nothing beyond its edge either), and the crop's offset
    ``(rows, columns)`` in that output."""
    t0, l0 = max(0, top // 4 - Z_CONTEXT), max(0, left // 4 - Z_CONTEXT)
    t1 = min(shape[0], (top + size) // 4 + Z_CONTEXT)
    l1 = min(shape[1], (left + size) // 4 + Z_CONTEXT)
    return slice(t0, t1), slice(l0, l1), top - 4 * t0, left - 4 * l0


_POINTWISE = (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.PReLU)


def _chain_sizes(chain: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]] | None:
    """Every layer's input size, then the output size, of a plain chain of (transposed)
    convolutions and spatially pointwise layers (GDN, ReLU, …); ``None`` for anything else."""
    from compressai.layers import GDN

    layers = list(chain) if isinstance(chain, nn.Sequential) else []
    if not layers or not all(
        isinstance(m, (GDN, *_POINTWISE))
        or (isinstance(m, nn.ConvTranspose2d) and m.dilation == (1, 1))
        or (isinstance(m, nn.Conv2d) and m.dilation == (1, 1) and m.stride == (1, 1))
        for m in layers
    ):
        return None
    sizes = [tuple(size)]
    for m in layers:
        if isinstance(m, nn.ConvTranspose2d):
            sizes.append(
                tuple(
                    (n - 1) * s - 2 * p + k + o
                    for n, k, s, p, o in zip(sizes[-1], m.kernel_size, m.stride, m.padding, m.output_padding)
                )
            )
        elif isinstance(m, nn.Conv2d):
            sizes.append(tuple(n + 2 * p - k + 1 for n, k, p in zip(sizes[-1], m.kernel_size, m.padding)))
        else:
            sizes.append(sizes[-1])
    return sizes


def forward_window(chain: nn.Module, x: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """``chain(x)[..., rows, cols]``, computed only on the activations that window reads.

    For a plain chain of transposed convolutions, stride-1 convolutions and spatially
    pointwise layers (GDN, ReLU, …: the bmshj2018/mbt2018 ``g_s`` and ``h_s``) every
    layer's input is cut to the window its part of the output reads (walking back through
    ``o = i·s − p + j`` for transposed and ``i = o − p + j`` for plain convolutions), so a
    context around a crop costs a few pixels per layer instead of its whole width through
    the network. Equal to the full computation up to the order of floating-point sums.
    Any other module runs whole and is cropped."""
    sizes = _chain_sizes(chain, tuple(x.shape[-2:]))
    if sizes is None:
        return chain(x)[..., rows, cols]
    need = [sl.indices(n)[:2] for sl, n in zip((rows, cols), sizes[-1])]
    plan = [need]
    for m, n_in in zip(reversed(list(chain)), reversed(sizes[:-1])):
        if isinstance(m, nn.ConvTranspose2d):
            need = [
                (max(0, -(-(a + p - k + 1) // s)), min(n, (b - 1 + p) // s + 1))
                for (a, b), k, s, p, n in zip(need, m.kernel_size, m.stride, m.padding, n_in)
            ]
        elif isinstance(m, nn.Conv2d):
            need = [
                (max(0, a - p), min(n, b - 1 - p + k)) for (a, b), k, p, n in zip(need, m.kernel_size, m.padding, n_in)
            ]
        plan.append(need)
    plan.reverse()
    t, top0, left0 = x, 0, 0  # (top0, left0): the layer coordinates of t[..., 0, 0]
    for m, ((top, bottom), (left, right)) in zip(chain, plan):
        t = m(t[..., top - top0 : bottom - top0, left - left0 : right - left0])
        top0, left0 = top, left
        if isinstance(m, nn.ConvTranspose2d):  # input row i0 → output row i0·s
            top0, left0 = top0 * m.stride[0], left0 * m.stride[1]
    (top, bottom), (left, right) = plan[-1]
    return t[..., top - top0 : bottom - top0, left - left0 : right - left0]


def decode_centre(g_s: nn.Module, y: torch.Tensor, margin: int) -> torch.Tensor:
    """``g_s(y)`` without the output pixels of the ``margin`` outer latents on each side
    (:func:`forward_window`: only the activations the centre reads are computed)."""
    sizes = _chain_sizes(g_s, tuple(y.shape[-2:]))
    if sizes is None:
        x = g_s(y)
        p = margin * (x.shape[-2] // y.shape[-2])
        return x[..., p:-p, p:-p]
    p = margin * (sizes[-1][0] // y.shape[-2])
    return forward_window(g_s, y, slice(p, -p), slice(p, -p))


def sample_crops(
    cache: LatentCache, seed: int, step: int, batch_size: int, size: int, align: int
) -> list[tuple[int, int, int]]:
    """The crops ``(image, top, left)`` of ``step`` (latent units, positions multiples of
    ``align``), drawn from ``numpy.random.default_rng([seed, step])`` as
    :func:`qft.train.data.sample_batch` draws its batches. No flips: ``g_s`` is not
    flip-equivariant, so flipped latents are not the latents of flipped images."""
    rng = np.random.default_rng([seed, step])
    picks = []
    for i in rng.integers(cache.num_images, size=batch_size):
        h, w = cache.latent_size(int(i))
        top = align * int(rng.integers((h - size) // align + 1))
        left = align * int(rng.integers((w - size) // align + 1))
        picks.append((int(i), top, left))
    return picks


def index_cells(indices: np.ndarray, qclass: np.ndarray, quantizer: Quantizer) -> tuple[np.ndarray, np.ndarray]:
    """Residual-domain decision cells ``[lo, hi)`` of signed indices (cells mirrored for
    ``k < 0``), from :func:`trellis.tables.cell_bounds` of the quantizer's table kind.
    """
    kind = quantizer.table.kind
    mag = np.abs(indices)
    lo = np.empty(indices.shape, np.float64)
    hi = np.empty(indices.shape, np.float64)
    for q in np.unique(qclass):
        m = qclass == q
        lo[m], hi[m] = cell_bounds(kind, int(q), mag[m], quantizer.step)
    neg = indices < 0
    lo[neg], hi[neg] = -hi[neg], -lo[neg]
    return lo.astype(np.float32), hi.astype(np.float32)


def cell_mass(lo: torch.Tensor, hi: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The ``N(0, σ²)`` mass of ``[lo, hi)`` (likelihood bound applied by the
    caller), computed on the side of the cell away from the centre for precision."""
    sign = torch.where(lo + hi > 0, -1.0, 1.0)
    return torch.special.ndtr(sign * hi / sigma).sub(torch.special.ndtr(sign * lo / sigma)).abs()


def assemble_batch(
    cache: LatentCache,
    picks: Sequence[tuple[int, int, int]],
    elements: Sequence[int],
    size: int,
    fields: Sequence[str],
    quantizer: Quantizer,
    seed: int,
    step: int,
) -> dict[str, torch.Tensor]:
    """Stack the crops ``picks`` (global batch elements ``elements``) into
    tensors: ``x`` (images in [0, 1]) and the requested ``fields`` among ``y_hat``, ``t``
    (``ŷ − μ``), ``lo``/``hi`` (cells of the indices), ``z_hat``, ``y_noisy`` (``y + u``)
    and ``z_noisy``; the ``ẑ`` fields are lists of per-element :func:`hyper_window` windows
    with ``z_offset`` (the crop's place in each window's ``h_s`` output). Noise of element
    ``b`` comes from ``default_rng([seed, step, b])``, so the batch does not depend on how
    the global batch is split over processes."""

    def stack(name: str) -> np.ndarray:
        return np.stack([cache.crop(name, i, t, le, size) for i, t, le in picks])

    def windows(name: str) -> tuple[list[np.ndarray], torch.Tensor]:
        z, offsets = [], []
        for i, t, le in picks:
            a = cache.hyper(name, i)
            rows, cols, dt, dl = hyper_window(a.shape[1:], t, le, size)
            z.append(a[:, rows, cols])
            offsets.append((dt, dl))
        return z, torch.tensor(offsets)

    out = {"x": torch.from_numpy(stack("image")).permute(0, 3, 1, 2).float().div_(255.0)}
    if "y_hat" in fields:
        out["y_hat"] = torch.from_numpy(stack("y_hat"))
    if "t" in fields:
        out["t"] = torch.from_numpy(stack("y_hat") - stack("mu"))
        lo, hi = index_cells(stack("index"), stack("qclass"), quantizer)
        out["lo"], out["hi"] = torch.from_numpy(lo), torch.from_numpy(hi)
    if "z_hat" in fields:
        z, out["z_offset"] = windows("z_hat")
        out["z_hat"] = [torch.from_numpy(np.array(a)) for a in z]  # writable copies
    if "y_noisy" in fields:
        y = stack("y")
        rngs = [np.random.default_rng([seed, step, b]) for b in elements]
        uy = np.stack([r.uniform(-0.5, 0.5, y.shape[1:]) for r in rngs]).astype(np.float32)
        out["y_noisy"] = torch.from_numpy(y + uy)
        if "z_noisy" in fields:
            z, out["z_offset"] = windows("z")
            out["z_noisy"] = [
                torch.from_numpy(a + r.uniform(-0.5, 0.5, a.shape).astype(np.float32)) for a, r in zip(z, rngs)
            ]
    return out


def batch_to_device(
    batch: dict[str, torch.Tensor | list], device: torch.device, amp: bool
) -> dict[str, torch.Tensor | list]:
    """An :func:`assemble_batch` batch on the training device: 4-D tensors channels_last
    under AMP, the per-element ``ẑ`` window lists element by element."""

    def move(v):
        if isinstance(v, list):
            return [move(t) for t in v]
        if amp and v.dim() == 4:
            return v.to(device, memory_format=torch.channels_last)
        return v.to(device)

    return {k: move(v) for k, v in batch.items()}


class FinetuneObjective(nn.Module):
    """The loss of one variant (see the module docstring) over a batch from
    :func:`assemble_batch`; the module DDP wraps.

    Args:
        model: the hyperprior model; its ``g_s``, ``h_s`` and ``gaussian_conditional``
            are shared, not copied.
        entropy: ``"scale-hyperprior"`` or ``"mean-scale-hyperprior"``.
        parts: ``"decoder"`` or ``"decoder+hyperdecoder"``.
        control: the noise-proxy control arm instead of the quantized latents.
        lmbda: λ of ``λ·255²·MSE``.
        amp: bf16 autocast on CUDA for ``g_s`` and ``h_s`` (losses in fp32).

    The batch holds latent crops with a context margin of :data:`G_S_REACH` latents on
    every side; the losses cover only the centre. The cached latents were computed from
    whole images, so a crop's border latents "expect" neighbours that a crop decoded alone
    lacks: without the margin the decoder is trained to repair crop borders that never
    occur at inference (measured: it then loses 0.1–0.2 dB inside images while gaining
    2–5 dB on bare crops, and ends 15 % worse on Kodak). ``g_s`` of mbt2018-mean reaches 2
    latents (32 pixels): beyond that a crop decodes bit-identically to the whole image.
    :func:`decode_centre` computes only the activations the centre reads, so the context
    adds a few pixels per layer rather than 2 latents through all of ``g_s``. With ``h_s``
    trained, ``ŷ = μ + t`` must be exact wherever ``g_s`` reads, so ``μ, σ`` come from a
    ``ẑ`` window with its own context (:func:`hyper_window`; ``h_s`` reaches 4 latents up
    and 7 down: an earlier 4-latent margin left ``μ`` wrong in the ring ``g_s`` reads, and
    decoder + hyper-decoder finetuning came out 16–20 % worse than the base).
    """

    def __init__(
        self,
        model: nn.Module,
        entropy: str,
        parts: str,
        control: bool,
        lmbda: float,
        amp: bool = False,
    ):
        super().__init__()
        self.g_s = model.g_s
        self.h_s = model.h_s
        self.gaussian_conditional = model.gaussian_conditional
        self.entropy = entropy
        self.hyper = parts == "decoder+hyperdecoder"
        self.control = control
        self.lmbda = lmbda
        self.amp = amp

    @property
    def fields(self) -> tuple[str, ...]:
        """The batch fields this variant reads."""
        if self.control:
            return ("y_noisy", "z_noisy") if self.hyper else ("y_noisy",)
        return ("t", "z_hat") if self.hyper else ("y_hat",)

    def _entropy_parameters(
        self, z: list[torch.Tensor], offsets: torch.Tensor, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``μ, σ`` of the latent crops: ``h_s`` of each element's ``ẑ`` window, cut to
        the crop (exact: the window holds all the ``ẑ`` context ``h_s`` reaches)."""
        h, w = size
        with transforms_autocast(self.amp):
            p = torch.cat(
                [
                    forward_window(self.h_s, zb[None], slice(dt, dt + h), slice(dl, dl + w))
                    for zb, (dt, dl) in zip(z, offsets.tolist())
                ]
            )
        p = p.float()
        if self.entropy == "scale-hyperprior":
            return torch.zeros_like(p), p
        sigma, mu = p.chunk(2, 1)
        return mu, sigma

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss", "mse", "bpp"}`` (``bpp`` of ``y``; 0 for decoder-only variants,
        whose rate does not change)."""
        x = batch["x"]
        bits = x.new_zeros(())  # of y on the loss centre; constant (0 here) without h_s
        if not self.hyper:
            y_hat = batch["y_noisy" if self.control else "y_hat"]
        else:
            gc = self.gaussian_conditional
            shape = batch["y_noisy" if self.control else "t"].shape[-2:]
            mu, sigma = self._entropy_parameters(
                batch["z_noisy" if self.control else "z_hat"], batch["z_offset"], shape
            )
            sigma = gc.lower_bound_scale(sigma)
            if self.control:
                y_hat = batch["y_noisy"]
                r = y_hat - mu
                lo, hi = r - 0.5, r + 0.5
            else:
                y_hat = mu + batch["t"]
                lo, hi = batch["lo"], batch["hi"]
            mass = cell_mass(lo, hi, sigma)
            if gc.use_likelihood_bound:
                mass = gc.likelihood_lower_bound(mass)
            m = G_S_REACH
            bits = -torch.log2(mass[..., m:-m, m:-m]).sum()
        with transforms_autocast(self.amp):
            x_hat = decode_centre(self.g_s, y_hat, G_S_REACH).float()
        p = (x.shape[-2] - x_hat.shape[-2]) // 2  # pixels of context on each side
        x = x[..., p:-p, p:-p]
        bpp = bits / (x.shape[0] * x.shape[2] * x.shape[3])
        mse = torch.mean((x_hat - x) ** 2)
        return {"loss": self.lmbda * 255**2 * mse + bpp, "mse": mse, "bpp": bpp}
