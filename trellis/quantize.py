"""Public quantizer API: :class:`Quantizer` (USQ, RDOQ, TCQ-4, TCQ-8) and its results.

Example::

    >>> q = Quantizer("tcq8", step=0.6, lam=0.02)
    >>> out = q.quantize(y, mu, sigma)          # arrays of shape (C, H, W) or (N, C, H, W)
    >>> y_hat, states = q.dequantize(out.indices, mu)
    >>> assert (y_hat == out.y_hat).all()

Chains (scan order and state reset, part of the bitstream definition):

* ``reset="channel"`` (default): one chain per channel (per image), raster order, state 0
  at the start of every channel; chains are independent and run in parallel.
* ``reset="tensor"``: one chain per image over the whole latent in ``(C, H, W)`` order.

Plain rows (TCQ, ``plain_rows > 0``): the elements of the first ``plain_rows`` table rows
(scale below ``SCALE_TABLE[plain_rows]``, where the model expects almost nothing) are
rounded at step 1 with USQ's cells (the plain class of the ``"tcq-plain"`` tables) and are
transparent to the chain: they take no trellis decision and leave its state unchanged, so
the trellis runs over the remaining elements of each chain in the same order. At low rates
most latents carry a small fraction of a bit, and there TCQ's ``Q1`` zero cell (half as
wide as USQ's) costs more than the trellis gains (docs/design.md, "Plain rows").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from trellis import kernels, reference
from trellis.machines import StateMachine, machine
from trellis.tables import (
    NUM_SCALES,
    PLAIN_CLASS,
    PLAIN_STEP,
    SCALE_TABLE,
    RateTable,
    rate_table,
    scale_rows_reference,
)

__all__ = [
    "METHODS",
    "RESETS",
    "BACKENDS",
    "MAX_PLAIN_ROWS",
    "Quantizer",
    "QuantizeResult",
    "SoftQuantizeResult",
    "scale_rows",
]

METHODS = ("usq", "rdoq", "tcq4", "tcq8")
RESETS = ("channel", "tensor")
BACKENDS = ("numba", "numpy")
#: ``|y - μ| / Δ`` must stay below this (indices are int32).
_MAX_LEVEL = 2.0**30
#: Most plain rows a quantizer may have (scales below ``SCALE_TABLE[31]`` ≈ 4.3; the
#: container's quantizer byte holds five bits for them).
MAX_PLAIN_ROWS = 31


class SoftQuantizeResult(NamedTuple):
    """Output of :meth:`Quantizer.soft_quantize` (float64 arrays shaped like ``y``).

    Attributes:
        y_hat: the expected reconstruction ``μ + E[t]``.
        bits: the expected table bits of each element.
        grad: ``∂E[Σ g·ŷ + ρ·R]/∂y`` (``None`` without ``g``).
    """

    y_hat: np.ndarray
    bits: np.ndarray
    grad: np.ndarray | None


class QuantizeResult(NamedTuple):
    """Output of :meth:`Quantizer.quantize` (arrays shaped like ``y``).

    Attributes:
        indices: ``int32`` transmitted indices ``k``.
        states: ``uint8`` state in which each index is coded (all 0 for USQ/RDOQ).
        rows: ``int32`` coding-table row of each index (``class * 64 + scale row``).
        y_hat: reconstruction ``μ + t(k, state)``, dtype of ``y``.
        bits: total table rate of the indices, in bits (exactly what the coder spends,
            up to the coder's own overhead).
    """

    indices: np.ndarray
    states: np.ndarray
    rows: np.ndarray
    y_hat: np.ndarray
    bits: float


def scale_rows(sigma: np.ndarray) -> np.ndarray:
    """Table row (0…63) of each scale: the smallest table scale ``>= σ`` (float32 compare)."""
    sigma = np.ascontiguousarray(sigma, dtype=np.float32)
    return kernels.scale_rows(sigma.reshape(-1), SCALE_TABLE).reshape(sigma.shape)


def _check_finite(name: str, x: np.ndarray) -> None:
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")


@dataclass(frozen=True)
class Quantizer:
    """A latent quantizer with its probability tables.

    Args:
        method: ``"usq"``, ``"rdoq"``, ``"tcq4"`` or ``"tcq8"``.
        step: USQ/RDOQ step ``Δ_s``, or the TCQ union-grid step ``Δ`` (each of ``Q0``,
            ``Q1`` then has step ``2Δ``).
        lam: Lagrange multiplier ``λ`` of ``J = Σ (r - t)² + λ Σ R`` (latent squared error
            per bit; RDOQ and TCQ). ``λ = 0`` turns RDOQ into rounding.
        theta: USQ rounding offset: ``½`` is rounding half to even (bit-identical to
            CompressAI's ``torch.round``); smaller values give a dead zone.
        reset: chain layout, ``"channel"`` or ``"tensor"`` (see module docstring).
        plain_rows: TCQ only: elements of the first ``plain_rows`` table rows are rounded
            at step 1 outside the trellis (module docstring); 0 (default): none.
    """

    method: str = "usq"
    step: float = 1.0
    lam: float = 0.0
    theta: float = 0.5
    reset: str = "channel"
    plain_rows: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (np.isfinite(self.step) and self.step > 0):
            raise ValueError(f"step must be a positive finite number, got {self.step!r}")
        if not (np.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a non-negative finite number, got {self.lam!r}")
        if not (0 < self.theta <= 0.5):
            raise ValueError(f"theta must lie in (0, 0.5], got {self.theta!r}")
        if self.reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {self.reset!r}")
        if not (isinstance(self.plain_rows, (int, np.integer)) and 0 <= self.plain_rows <= MAX_PLAIN_ROWS):
            raise ValueError(f"plain_rows must be an integer in [0, {MAX_PLAIN_ROWS}], got {self.plain_rows!r}")
        if self.plain_rows and not self.is_trellis:
            raise ValueError(f"plain_rows apply to tcq4 and tcq8; {self.method} has no trellis to leave")

    @property
    def is_trellis(self) -> bool:
        return self.method.startswith("tcq")

    @property
    def table(self) -> RateTable:
        """The coding tables (``"tcq"`` kind for TCQ, ``"tcq-plain"`` with plain rows,
        ``"usq"`` otherwise)."""
        if not self.is_trellis:
            return rate_table("usq", self.step)
        return rate_table("tcq-plain" if self.plain_rows else "tcq", self.step)

    @property
    def machine(self) -> StateMachine | None:
        """The state machine of TCQ-4/TCQ-8; ``None`` for USQ and RDOQ."""
        return machine(int(self.method[3:])) if self.is_trellis else None

    @property
    def selector(self) -> tuple[np.ndarray, np.ndarray]:
        """Row selector of the coder: ``(next_state[S, 2], state_class[S])``.

        The trivial one-state selector for USQ/RDOQ, the state machine for TCQ.
        """
        sm = self.machine
        if sm is None:
            return np.zeros((1, 2), dtype=np.int64), np.zeros(1, dtype=np.int64)
        return sm.next_state, sm.quantizer

    def chain_length(self, shape: tuple[int, ...]) -> int:
        """Elements per chain for a latent of shape ``(C, H, W)`` or ``(N, C, H, W)``."""
        c, h, w = shape[-3:]
        return h * w if self.reset == "channel" else c * h * w

    # -- layout ---------------------------------------------------------------------
    def _chains(self, x: np.ndarray) -> np.ndarray:
        """``(chains, length)`` view of a ``(C, H, W)`` or ``(N, C, H, W)`` array."""
        x = x if x.ndim == 4 else x[None]
        n, c = x.shape[:2]
        return np.ascontiguousarray(x).reshape(n * c if self.reset == "channel" else n, -1)

    def reconstruct(
        self,
        indices: np.ndarray,
        states: np.ndarray,
        mu: np.ndarray,
        backend: str = "numba",
        *,
        scale_rows: np.ndarray | None = None,
    ) -> np.ndarray:
        """``ŷ = μ + t`` with ``t = kΔ`` (USQ/RDOQ) or ``(2k - sgn(k) Q(s))Δ`` (TCQ), and
        ``t = k`` for plain elements (their ``scale_rows`` below :attr:`plain_rows`; needed
        with plain rows).

        ``t`` is formed in float64, rounded to ``μ``'s dtype, then added to ``μ`` in that
        dtype, so encoder and decoder produce identical bits.
        """
        quant = self.machine.quantizer if self.is_trellis else np.zeros(1, np.int64)
        if backend == "numpy":
            out = reference.reconstruct(indices, states, quant, self.is_trellis, self.step, mu)
        else:
            out = kernels.reconstruct(
                indices.reshape(-1),
                states.reshape(-1),
                quant,
                self.is_trellis,
                self.step,
                np.ascontiguousarray(mu).reshape(-1),
            ).reshape(mu.shape)
        if self.plain_rows:
            plain = self._plain_mask(scale_rows, mu.shape)
            out[plain] = _plain_values(indices[plain], mu[plain])
        return out

    # -- quantize / dequantize --------------------------------------------------------
    def quantize(
        self,
        y: np.ndarray,
        mu: np.ndarray | None = None,
        sigma: np.ndarray | None = None,
        *,
        scale_rows: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        backend: str = "numba",
    ) -> QuantizeResult:
        """Quantizes ``y`` relative to ``mu`` with rates from the Gaussian tables.

        Args:
            y: latent, shape ``(C, H, W)`` or ``(N, C, H, W)``, float.
            mu: predicted means (same shape); ``None`` means 0 (scale-only hyperprior).
            sigma: predicted scales ``> 0`` (same shape), mapped to table rows.
            scale_rows: alternatively the table rows (int, 0…63) themselves.
            weights: distortion weights ``w > 0`` broadcastable to ``y`` (e.g. ``(C, 1, 1)``
                per channel) for RDOQ and TCQ: ``J = Σ w (r - t)² + λ Σ R``. Weights that are
                constant along each chain (per channel, ``reset="channel"``) are applied as
                the equivalent per-chain ``λ / w``; others per element. The decoder needs
                none of them.
            backend: ``"numba"`` (fast kernels) or ``"numpy"`` (the reference).
        """
        y = np.asarray(y)
        r, mu2, rows2, lam, w = self._prepare(y, mu, sigma, scale_rows, weights, backend)
        if self.plain_rows:
            return self._quantize_plain(y.shape, r, mu2, rows2, lam, w, backend)
        tab = self.table
        tabargs = (tab.bits, tab.kmax, tab.tail_bits, tab.cdf_length, tab.offset)
        states = np.zeros(r.shape, dtype=np.uint8)
        coding_rows = rows2
        if self.method == "usq":
            if backend == "numba":
                idx, y_hat, bits = kernels.usq(r, mu2, rows2, self.step, self.theta, *tabargs)
            else:
                idx, y_hat, bits = reference.usq(r, mu2, rows2, self.step, self.theta, tab)
        elif self.method == "rdoq":
            if backend == "numba":
                idx, y_hat, bits = kernels.rdoq(r, w, mu2, rows2, self.step, lam, *tabargs)
            else:
                idx, y_hat, bits = reference.rdoq(r, w, mu2, rows2, self.step, lam, tab)
        else:
            idx, states, coding_rows, y_hat, bits = self._trellis(r, w, mu2, rows2, lam, backend)
        return QuantizeResult(
            indices=idx.reshape(y.shape),
            states=states.reshape(y.shape),
            rows=coding_rows.reshape(y.shape),
            y_hat=y_hat.reshape(y.shape),
            bits=float(bits.sum()),
        )

    def _trellis(self, r, w, mu, rows, lam, backend):
        """TCQ over chains ``(chains, length)``: ``(indices, states, coding_rows, y_hat, bits)``."""
        sm, tab = self.machine, self.table
        if backend == "numba":
            tabargs = (tab.bits, tab.kmax, tab.tail_bits, tab.cdf_length, tab.offset)
            return kernels.tcq(r, w, mu, rows, self.step, lam, sm.num_states, sm.quantizer, *tabargs)
        return reference.tcq(r, w, mu, rows, self.step, lam, tab, sm)

    def _soft(self, r, w, rows, lam, tau, g, rho, backend):
        """The soft trellis over chains: ``(E[t], E[R], grad)`` (:meth:`soft_quantize`)."""
        sm, tab = self.machine, self.table
        if backend == "numba":
            return kernels.soft_tcq(
                r, w, rows, self.step, lam, tau, sm.next_state, sm.quantizer, g, rho,
                tab.bits, tab.kmax, tab.tail_bits, tab.cdf_length, tab.offset,
            )  # fmt: skip
        return reference.soft_tcq(r, w, rows, self.step, lam, tau, tab, sm, g, rho)

    def _soft_plain(self, r, w, rows, lam, tau, g, rho, backend):
        """:meth:`_soft` with plain rows: the plain elements are what :meth:`quantize` makes
        of them (rounded, their table bits, no gradient), the soft trellis runs over the
        others of each chain."""
        plain = rows < self.plain_rows
        k = np.where(plain, _plain_indices(r), 0)
        et = k * PLAIN_STEP
        er = np.where(plain, self.table.index_bits(_plain_coding_rows(rows), k), 0.0)
        grad = np.zeros(r.shape)
        for c, sel in _trellis_parts(plain):
            sub = [None if a is None else a[c, sel][None] for a in (w, g, rho)]
            e, b, gr = self._soft(r[c, sel][None], sub[0], rows[c, sel][None], lam[c : c + 1], tau, *sub[1:], backend)
            et[c, sel], er[c, sel] = e[0], b[0]
            if g is not None:
                grad[c, sel] = gr[0]
        return et, er, grad

    def _quantize_plain(self, shape, r, mu, rows, lam, w, backend) -> QuantizeResult:
        """:meth:`quantize` with plain rows: the plain elements rounded at step 1 in the
        plain class, the trellis run over the others of each chain (module docstring)."""
        tab = self.table
        plain = rows < self.plain_rows
        idx = np.where(plain, _plain_indices(r), 0).astype(np.int32)
        coding_rows = np.where(plain, _plain_coding_rows(rows), 0).astype(np.int32)
        states = np.zeros(r.shape, np.uint8)
        y_hat = np.empty_like(mu)
        y_hat[plain] = _plain_values(idx[plain], mu[plain])
        for c, sel in _trellis_parts(plain):
            wc = None if w is None else w[c, sel][None]
            k, st, cr, yh, _ = self._trellis(
                r[c, sel][None], wc, mu[c, sel][None], rows[c, sel][None], lam[c : c + 1], backend
            )
            idx[c, sel], states[c, sel], coding_rows[c, sel], y_hat[c, sel] = k[0], st[0], cr[0], yh[0]
        states = _plain_states(states, idx, plain, self.machine.next_state)
        return QuantizeResult(
            indices=idx.reshape(shape),
            states=states.reshape(shape),
            rows=coding_rows.reshape(shape),
            y_hat=y_hat.reshape(shape),
            bits=float(tab.index_bits(coding_rows, idx).sum()),
        )

    def plain_elements(self, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(plain, rows)`` for the elements of scales ``sigma``: where they are plain (their
        scale rows below :attr:`plain_rows`: rounded outside the trellis) and the table rows
        the plain ones are coded in (the plain class's), in the order of ``sigma[plain]``."""
        rows = scale_rows(sigma)
        plain = rows < self.plain_rows
        return plain, _plain_coding_rows(rows[plain])

    def _plain_mask(self, scale_rows: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
        """Where the elements are plain (their table rows below :attr:`plain_rows`)."""
        if scale_rows is None:
            raise ValueError("a quantizer with plain rows needs the scale rows of the elements")
        scale_rows = np.asarray(scale_rows)
        if scale_rows.shape != tuple(shape):
            raise ValueError(f"scale_rows has shape {scale_rows.shape}, the latent has shape {tuple(shape)}")
        return scale_rows < self.plain_rows

    def soft_quantize(
        self,
        y: np.ndarray,
        mu: np.ndarray | None = None,
        sigma: np.ndarray | None = None,
        *,
        tau: float,
        scale_rows: np.ndarray | None = None,
        weights: np.ndarray | None = None,
        g: np.ndarray | None = None,
        rho: np.ndarray | float = 0.0,
        backend: str = "numba",
    ) -> SoftQuantizeResult:
        """The trellis relaxed at temperature ``τ`` (TCQ only): expectations under the Gibbs
        distribution of the paths, ``p(path) ∝ exp(−J(path)/τ)`` with the quantizer's own
        cost ``J = Σ w (r − t)² + λ Σ R`` (arguments as :meth:`quantize`).

        Candidates are the union levels within ``±3Δ`` of ``r`` (``trellis._costs.SOFT_WINDOW``),
        so as ``τ → 0`` ``y_hat`` tends to the Viterbi reconstruction of :meth:`quantize`
        (where the chosen level lies in that window, always in practice) and ``bits`` to its
        table bits. With ``g`` (shaped like ``y``) and ``rho`` (a number or shaped like ``y``),
        ``grad`` is the exact gradient ``∂E[Σ g·ŷ + ρ·R]/∂y = (2w/τ) Cov(Σ g t + ρ R, t)``:
        what an optimiser of ``y`` through the relaxed trellis needs (``qft.codec.refine``).
        With plain rows the plain elements are as :meth:`quantize` makes them (rounded, their
        table bits, gradient 0) and the trellis is relaxed over the others.
        """
        if not self.is_trellis:
            raise ValueError(f"soft quantization relaxes the trellis; {self.method} has none (use tcq4 or tcq8)")
        if not (np.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a positive finite number, got {tau!r}")
        y = np.asarray(y)
        r, mu2, rows2, lam, w = self._prepare(y, mu, sigma, scale_rows, weights, backend)
        gc = rc = None
        if g is not None:
            g = np.asarray(g, np.float64)
            if g.shape != y.shape:
                raise ValueError(f"g has shape {g.shape}, y has shape {y.shape}")
            gc = self._chains(g)
            rc = self._chains(np.broadcast_to(np.asarray(rho, np.float64), y.shape))
        if self.plain_rows:
            et, er, grad = self._soft_plain(r, w, rows2, lam, float(tau), gc, rc, backend)
        else:
            et, er, grad = self._soft(r, w, rows2, lam, float(tau), gc, rc, backend)
        return SoftQuantizeResult(
            y_hat=mu2.astype(np.float64).reshape(y.shape) + et.reshape(y.shape),
            bits=er.reshape(y.shape),
            grad=None if g is None else grad.reshape(y.shape),
        )

    def _prepare(self, y, mu, sigma, scale_rows, weights, backend):
        """Validated chains of one call: ``(r, mu, rows, lam, w)`` (``lam`` per chain,
        ``w`` per element or ``None``)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if y.ndim not in (3, 4):
            raise ValueError(f"y must have shape (C, H, W) or (N, C, H, W), got {y.shape}")
        _check_finite("y", y)
        mu = np.zeros_like(y) if mu is None else np.asarray(mu)
        if mu.shape != y.shape:
            raise ValueError(f"mu has shape {mu.shape}, y has shape {y.shape}")
        _check_finite("mu", mu)
        mu = mu.astype(y.dtype, copy=False)
        rows = self._scale_rows(y.shape, sigma, scale_rows, backend)
        r = self._chains(y - mu)  # residual in y's dtype (as CompressAI's round(y - μ))
        if np.abs(r).max(initial=0.0) >= _MAX_LEVEL * self.step:
            raise ValueError(f"y - mu exceeds {_MAX_LEVEL:g} quantization steps")
        lam = np.full(r.shape[0], self.lam)
        w = None
        if weights is not None:
            wv = self._weights(weights, y.shape)
            wv = wv.reshape((1,) * (y.ndim - wv.ndim) + wv.shape)
            if self.reset == "channel" and wv.shape[-2:] == (1, 1):
                # constant along each chain: Σ w_c (r - t)² + λ R has the argmin of
                # Σ (r - t)² + (λ / w_c) R, a per-chain λ at no cost per element
                lam = self.lam / np.broadcast_to(wv, y.shape[:-2] + (1, 1)).reshape(-1)
            else:
                w = self._chains(np.broadcast_to(wv, y.shape))
        return r, self._chains(mu), self._chains(rows), lam, w

    def dequantize(
        self,
        indices: np.ndarray,
        mu: np.ndarray | None = None,
        *,
        scale_rows: np.ndarray | None = None,
        backend: str = "numba",
    ):
        """Reconstruction from the indices alone (states tracked from index parities);
        with plain rows also from the elements' ``scale_rows`` (which are plain).

        Returns:
            ``(y_hat, states)``, bit-identical to the encoder's ``y_hat`` and ``states``.
        """
        indices = np.asarray(indices)
        if indices.ndim not in (3, 4) or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError("indices must be an integer array of shape (C, H, W) or (N, C, H, W)")
        mu = np.zeros(indices.shape, np.float32) if mu is None else np.asarray(mu)
        if mu.shape != indices.shape:
            raise ValueError(f"mu has shape {mu.shape}, indices have shape {indices.shape}")
        _check_finite("mu", mu)
        if not self.is_trellis:
            states = np.zeros(indices.shape, dtype=np.uint8)
            return self.reconstruct(indices, states, mu, backend), states
        chains = self._chains(indices.astype(np.int64))
        if not self.plain_rows:
            states = self._chain_states(chains, backend)
        else:
            plain = self._chains(self._plain_mask(scale_rows, indices.shape))
            states = np.zeros(chains.shape, np.uint8)
            for c, sel in _trellis_parts(plain):
                states[c, sel] = self._chain_states(chains[c, sel][None], backend)[0]
            states = _plain_states(states, chains, plain, self.machine.next_state)
        states = states.reshape(indices.shape)
        return self.reconstruct(indices, states, mu, backend, scale_rows=scale_rows), states

    def _chain_states(self, chains: np.ndarray, backend: str) -> np.ndarray:
        if backend == "numba":
            return kernels.chain_states(np.ascontiguousarray(chains), self.machine.next_state)
        return reference.chain_states(chains, self.machine)

    def _weights(self, weights, shape) -> np.ndarray:
        """Validated weights (not yet broadcast)."""
        if self.method == "usq":
            raise ValueError("weights apply to rdoq and tcq; usq makes no rate-distortion decision")
        w = np.asarray(weights, dtype=np.float64)
        try:
            np.broadcast_shapes(w.shape, shape)
        except ValueError:
            raise ValueError(f"weights of shape {w.shape} do not broadcast to the latent's {shape}") from None
        if w.ndim > len(shape) or not np.isfinite(w).all() or w.min(initial=1.0) <= 0:
            raise ValueError("weights must be finite, > 0 and of at most the latent's dimensions")
        return w

    @staticmethod
    def _scale_rows(shape, sigma, rows, backend) -> np.ndarray:
        if (sigma is None) == (rows is None):
            raise ValueError("give exactly one of sigma and scale_rows")
        if rows is not None:
            rows = np.asarray(rows)
            if rows.shape != shape or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"scale_rows must be an integer array of shape {shape}")
            if rows.size and (rows.min() < 0 or rows.max() >= NUM_SCALES):
                raise ValueError(f"scale_rows must lie in [0, {NUM_SCALES - 1}]")
            return rows.astype(np.int32)
        sigma = np.asarray(sigma)
        if sigma.shape != shape:
            raise ValueError(f"sigma has shape {sigma.shape}, y has shape {shape}")
        _check_finite("sigma", sigma)
        if sigma.size and sigma.min() <= 0:
            raise ValueError("sigma must be > 0")
        return scale_rows(sigma) if backend == "numba" else scale_rows_reference(sigma)


def _plain_coding_rows(rows: np.ndarray) -> np.ndarray:
    """The table rows plain elements of scale rows ``rows`` are coded in: the plain class's."""
    return PLAIN_CLASS * NUM_SCALES + rows


def _plain_indices(r: np.ndarray) -> np.ndarray:
    """Indices of plain elements of residual ``r``: rounded at :data:`PLAIN_STEP`, half to
    even (USQ's rounding), as int64."""
    return np.round(r.astype(np.float64) / PLAIN_STEP).astype(np.int64)


def _plain_values(k: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Reconstruction ``μ + k·PLAIN_STEP`` of plain elements, formed as every level is
    (float64 offset rounded to ``μ``'s dtype, then added in it)."""
    return mu + (k.astype(np.float64) * PLAIN_STEP).astype(mu.dtype)


def _trellis_parts(plain: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(chain, mask)`` of the trellis (non-plain) elements of each chain of ``plain``
    ``(chains, length)`` that has any."""
    for c in range(plain.shape[0]):
        sel = ~plain[c]
        if sel.any():
            yield c, sel


def _plain_states(states: np.ndarray, indices: np.ndarray, plain: np.ndarray, next_state: np.ndarray) -> np.ndarray:
    """Chains ``(chains, length)`` of states with those of the plain elements filled in:
    the state the chain is in when it reaches them (after the last trellis element before
    them; 0 before the first), which they leave unchanged."""
    length = states.shape[1]
    after = next_state[states.astype(np.int64), indices.astype(np.int64) & 1]
    last = np.maximum.accumulate(np.where(plain, -1, np.arange(length)), axis=1)
    filled = np.where(last >= 0, np.take_along_axis(after, np.maximum(last, 0), axis=1), 0)
    return np.where(plain, filled, states).astype(np.uint8)
