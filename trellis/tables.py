"""Probability model and integer coding tables shared by quantizer, coder and decoder.

Every latent element ``y`` has a Gaussian ``N(μ, σ²)`` prior and is quantized relative to
its mean, ``r = y - μ``. ``σ`` is mapped to one of the 64 rows of CompressAI's scale table
(lower bound 0.11, the *smallest table scale* ``σ_j >= σ``), so encoder, trellis and
decoder share a discrete set of table rows. For each quantizer class and table scale the
probability of index ``k`` is the Gaussian mass of its decision cell ``C(k)``::

    P(k) = Φ(hi(k) / σ_j) - Φ(lo(k) / σ_j)

with these cells (``k >= 0``; cells are mirrored, ``C(-k) = -C(k)``):

=========  =============================  =====================================
class      reconstruction levels          cell of ``k``
=========  =============================  =====================================
USQ        ``kΔ``                         ``[(k - ½)Δ, (k + ½)Δ)``
TCQ ``Q0`` ``2kΔ``                        ``[(2k - 1)Δ, (2k + 1)Δ)``
TCQ ``Q1`` ``0, ±Δ, ±3Δ, … = (2k-sgn k)Δ`` ``C(0) = [-Δ/2, Δ/2)``, ``C(1) = [Δ/2, 2Δ)``,
                                          ``C(k>=2) = [(2k - 2)Δ, 2kΔ)``
=========  =============================  =====================================

The ``"tcq-plain"`` kind (TCQ whose low-scale elements skip the trellis,
:attr:`trellis.Quantizer.plain_rows`) adds a third class after ``Q0`` and ``Q1``: USQ at
step :data:`PLAIN_STEP` = 1, the model's own rounding grid, whatever the union step.

Each row covers ``k ∈ [-K_j, K_j]`` with ``K_j = ceil(T σ_j / w) + 1`` (``w`` the level
spacing of the class, ``Δ`` for USQ and ``2Δ`` for ``Q0``/``Q1``; ``T = -Φ⁻¹(10⁻⁹/2)``)
plus one tail slot carrying the remaining mass. Probabilities are quantized to 16-bit
integer frequencies (every symbol at least 1), laid out as CompressAI's rANS coder expects
(``cdf``, ``cdf_length``, ``offset = -K_j``). An index outside a row is coded as CompressAI
does: the tail symbol followed by bypass symbols of 4 bits (see :func:`escape_bits`).

The rate of a decision is ``-log2(freq / 2**16)`` of the *quantized* table (escape cost
included): exactly the bits the coder spends, and a table lookup in the trellis.
"""

from __future__ import annotations

import zlib

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from scipy.special import ndtr, ndtri

__all__ = [
    "SCALE_TABLE",
    "NUM_SCALES",
    "PRECISION",
    "BYPASS_BITS",
    "TAIL_MASS",
    "PLAIN_STEP",
    "PLAIN_CLASS",
    "RateTable",
    "rate_table",
    "cell_bounds",
    "quantize_pmf",
    "escape_bits",
    "scale_rows_reference",
]

#: CompressAI's 64 log-spaced scales 0.11 … 256 (``get_scale_table``), as float32.
SCALE_TABLE = np.exp(np.linspace(np.log(0.11), np.log(256.0), 64)).astype(np.float32)
NUM_SCALES = len(SCALE_TABLE)
#: Precision of the integer CDFs (CompressAI's rANS coder is hard-wired to 16 bits).
PRECISION = 16
#: Bits per bypass symbol of the escape path (CompressAI: 4).
BYPASS_BITS = 4
#: Gaussian mass left outside a row's support (as CompressAI's ``GaussianConditional``).
TAIL_MASS = 1e-9
_TAIL_QUANTILE = float(-ndtri(TAIL_MASS / 2))

#: Step of the plain class of a ``"tcq-plain"`` table (USQ cells, the model's own grid).
PLAIN_STEP = 1.0
#: Class of the plain elements in a ``"tcq-plain"`` table (after ``Q0`` and ``Q1``).
PLAIN_CLASS = 2
#: table kind -> number of quantizer classes
_KINDS = {"usq": 1, "tcq": 2, "tcq-plain": 3}


def _class_grid(kind: str, qclass: int, step: float) -> tuple[str, int, float, float]:
    """``(cell kind, cell class, step, level spacing)`` of class ``qclass`` of a table kind."""
    if kind == "tcq-plain":
        return ("usq", 0, PLAIN_STEP, PLAIN_STEP) if qclass == PLAIN_CLASS else ("tcq", qclass, step, 2 * step)
    return kind, qclass, step, (2 * step if kind == "tcq" else step)


def cell_bounds(kind: str, qclass: int, k: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Decision cell ``[lo, hi)`` of non-negative indices ``k`` (residual domain).

    Args:
        kind: ``"usq"``, ``"tcq"`` or ``"tcq-plain"``.
        qclass: quantizer class, 0 for USQ and ``Q0``, 1 for ``Q1``, :data:`PLAIN_CLASS` for
            the plain class of ``"tcq-plain"`` (USQ at :data:`PLAIN_STEP`).
        k: non-negative integer indices.
        step: the step ``Δ`` (USQ step or TCQ union-grid step).

    Returns:
        ``(lo, hi)`` float64 arrays.
    """
    if kind == "tcq-plain" and qclass in (0, 1, PLAIN_CLASS):
        kind, qclass, step, _ = _class_grid(kind, qclass, step)
    k = np.asarray(k, dtype=np.float64)
    if kind == "usq" and qclass == 0:
        return (k - 0.5) * step, (k + 0.5) * step
    if kind == "tcq" and qclass == 0:
        return (2 * k - 1) * step, (2 * k + 1) * step
    if kind == "tcq" and qclass == 1:
        lo = np.where(k >= 2, (2 * k - 2) * step, np.where(k == 1, 0.5 * step, -0.5 * step))
        hi = np.where(k >= 1, 2 * k * step, 0.5 * step)
        return lo, hi
    raise ValueError(f"no quantizer class {qclass} in table kind {kind!r}")


def quantize_pmf(pmf: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Integer frequencies summing to ``2**precision``, each at least 1.

    ``f_i = 1 + floor(p_i (2^P - n))`` with ``p`` normalised to sum 1; the remaining
    counts go to the symbols with the largest fractional parts (ties: lowest index).

    Args:
        pmf: non-negative probabilities (the last entry usually the tail mass).
        precision: bits of the total.

    Returns:
        ``int64`` frequencies.
    """
    p = np.asarray(pmf, dtype=np.float64)
    n = len(p)
    total = 1 << precision
    if n < 2 or n > total or not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("pmf must hold 2 to 2**precision finite non-negative values with a positive sum")
    x = p / p.sum() * (total - n)
    f = np.floor(x)
    remainder = int(total - n - f.sum())
    order = np.argsort(-(x - f), kind="stable")[:remainder]
    f[order] += 1
    return f.astype(np.int64) + 1


def escape_bits(value: np.ndarray, max_value: np.ndarray) -> np.ndarray:
    """Bypass bits CompressAI's rANS coder spends on an out-of-range symbol.

    A symbol whose table position ``value = k - offset`` falls outside ``[0, max_value)``
    is coded as the tail symbol, then ``raw = -2 value - 1`` (below the row) or
    ``raw = 2 (value - max_value)`` (above) in ``n`` bypass symbols of 4 bits, preceded by
    ``n`` itself in ``floor(n / 15) + 1`` bypass symbols.

    Args:
        value: table positions outside ``[0, max_value)``.
        max_value: the tail slot of each row, ``cdf_length - 2``.

    Returns:
        float64 bypass bits (the tail symbol's own cost not included).
    """
    value = np.asarray(value, dtype=np.int64)
    raw = np.where(value < 0, -2 * value - 1, 2 * (value - max_value))
    nbits = np.zeros(raw.shape, dtype=np.int64)
    rest = raw.copy()
    while np.any(rest):
        nbits += rest > 0
        rest >>= 1
    n = (nbits + BYPASS_BITS - 1) // BYPASS_BITS
    return (BYPASS_BITS * (n // 15 + 1 + n)).astype(np.float64)


@dataclass(frozen=True, eq=False)
class RateTable:
    """Coding tables and decision rates for one table kind and step.

    Row ``c * 64 + j`` belongs to quantizer class ``c`` and table scale ``SCALE_TABLE[j]``.

    Attributes:
        kind: ``"usq"`` or ``"tcq"``.
        step: the step the cells were built for.
        cdf: ``int32[rows, max_len]`` quantized CDFs (row r valid up to ``cdf_length[r]``).
        cdf_length: ``int32[rows]``, ``2 K + 3``.
        offset: ``int32[rows]``, ``-K``.
        kmax: largest support half-width over all rows.
        bits: ``float64[rows, 2 kmax + 1]``; ``bits[r, kmax + k]`` is the cost of index k
            in row r for ``|k| <= kmax`` (escape cost outside the row's own support).
        tail_bits: ``float64[rows]``, cost of the tail symbol.
        checksum: CRC-32 of the integer tables; a decoder compares it with the stream's.
    """

    kind: str
    step: float
    cdf: np.ndarray
    cdf_length: np.ndarray
    offset: np.ndarray
    kmax: int
    bits: np.ndarray
    tail_bits: np.ndarray
    checksum: int

    @property
    def num_classes(self) -> int:
        return _KINDS[self.kind]

    def index_bits(self, rows: np.ndarray, k: np.ndarray) -> np.ndarray:
        """Exact coded bits of indices ``k`` in table rows ``rows`` (NumPy reference)."""
        rows = np.asarray(rows, dtype=np.int64)
        k = np.asarray(k, dtype=np.int64)
        inside = np.abs(k) <= self.kmax
        out = np.empty(np.broadcast(rows, k).shape, dtype=np.float64)
        rows, k = np.broadcast_arrays(rows, k)
        out[inside] = self.bits[rows[inside], self.kmax + k[inside]]
        r, kk = rows[~inside], k[~inside]
        out[~inside] = self.tail_bits[r] + escape_bits(kk - self.offset[r], self.cdf_length[r] - 2)
        return out


def rate_table(kind: str, step: float) -> RateTable:
    """Builds (once per ``(kind, step)``, cached) the tables of a table kind.

    Args:
        kind: ``"usq"`` (USQ and RDOQ, one class), ``"tcq"`` (classes ``Q0``, ``Q1``) or
            ``"tcq-plain"`` (``Q0``, ``Q1`` and the plain class: USQ at :data:`PLAIN_STEP`).
        step: USQ step or TCQ union step ``Δ > 0``.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    step = float(step)
    if not np.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    return _rate_table(kind, step)


@lru_cache(maxsize=32)
def _rate_table(kind: str, step: float) -> RateTable:
    num_classes = _KINDS[kind]
    sigmas = SCALE_TABLE.astype(np.float64)
    halves = [
        np.ceil(_TAIL_QUANTILE * sigmas / _class_grid(kind, c, step)[3]).astype(np.int64) + 1
        for c in range(num_classes)
    ]
    kmax = int(max(h.max() for h in halves))
    rows = num_classes * NUM_SCALES
    max_len = 2 * kmax + 3
    cdf = np.zeros((rows, max_len), dtype=np.int32)
    cdf_length = np.empty(rows, dtype=np.int32)
    offset = np.empty(rows, dtype=np.int32)
    bits = np.empty((rows, 2 * kmax + 1), dtype=np.float64)
    tail_bits = np.empty(rows, dtype=np.float64)
    for c in range(num_classes):
        for j, sigma in enumerate(sigmas):
            r = c * NUM_SCALES + j
            K = int(halves[c][j])
            lo, hi = cell_bounds(kind, c, np.arange(K + 1), step)
            # Mass of each cell, computed in the upper tail for accuracy.
            mass = np.where(lo >= 0, ndtr(-lo / sigma) - ndtr(-hi / sigma), ndtr(hi / sigma) - ndtr(lo / sigma))
            pmf = np.concatenate([mass[:0:-1], mass, [2 * ndtr(-hi[-1] / sigma)]])
            freq = quantize_pmf(pmf)
            cdf[r, : 2 * K + 3] = np.concatenate([[0], np.cumsum(freq)])
            cdf_length[r] = 2 * K + 3
            offset[r] = -K
            tail_bits[r] = PRECISION - np.log2(freq[-1])
            k = np.arange(-kmax, kmax + 1)
            value = k + K
            row_bits = np.empty(2 * kmax + 1)
            inside = (value >= 0) & (value <= 2 * K)
            row_bits[inside] = PRECISION - np.log2(freq[value[inside]])
            row_bits[~inside] = tail_bits[r] + escape_bits(value[~inside], 2 * K + 1)
            bits[r] = row_bits
    checksum = zlib.crc32(cdf.tobytes() + cdf_length.tobytes() + offset.tobytes())
    for a in (cdf, cdf_length, offset, bits, tail_bits):
        a.setflags(write=False)
    return RateTable(kind, step, cdf, cdf_length, offset, kmax, bits, tail_bits, checksum)


def scale_rows_reference(sigma: np.ndarray) -> np.ndarray:
    """Table row of each scale: the smallest table scale ``>= σ`` (clamped to the last).

    Same rule as CompressAI's ``GaussianConditional.build_indexes``; ``σ`` below 0.11 maps
    to row 0. NumPy reference of :func:`trellis.kernels.scale_rows`.
    """
    sigma = np.asarray(sigma, dtype=np.float32)
    return np.minimum(np.searchsorted(SCALE_TABLE, sigma, side="left"), NUM_SCALES - 1).astype(np.int32)
