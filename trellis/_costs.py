"""Cost primitives shared by the Numba kernels and the generated Viterbi passes.

``index_bits`` is the exact coded size of an index in a table row (escape path
included); ``branches`` evaluates, for one element and one quantizer, the three TCQ
choices of VVC's candidate rule (zero and the two nearest non-zero levels, one of each
index parity).
"""

import math

import numpy as np

from numba import njit

__all__ = [
    "NUM_SCALES",
    "SOFT_WINDOW",
    "index_bits",
    "first_candidate",
    "candidate_n0",
    "branches",
    "union_level",
    "soft_index",
]

NUM_SCALES = 64
#: The soft trellis's candidates: the union indices ``rint(r/Δ) ± SOFT_WINDOW``.
SOFT_WINDOW = 3


@njit(cache=True, nogil=True, inline="always")
def index_bits(bits, kmax, tail_bits, cdf_length, offset, row, k):  # pragma: no cover
    if -kmax <= k <= kmax:
        return bits[row, kmax + k]
    value = k - offset[row]
    if value < 0:
        raw = -2 * value - 1
    else:
        raw = 2 * (value - (cdf_length[row] - 2))
    n = 0
    while (raw >> (4 * n)) != 0:
        n += 1
    return tail_bits[row] + 4.0 * (n // 15 + 1 + n)


@njit(cache=True, nogil=True, inline="always")
def first_candidate(n0, q):  # pragma: no cover
    """Smaller magnitude |k| of the two non-zero candidates of quantizer q.

    ``n0 = max(1, floor(|r|/Δ - 1.5))`` is the first of the four union indices
    ``n0 … n0 + 3``; Q0 takes the even ones (``|k| = n/2``), Q1 the odd ones
    (``|k| = (n + 1)/2``).
    """
    par = n0 & 1
    if q == 0:
        return (n0 + par) >> 1
    return (n0 + 2 - par) >> 1


@njit(cache=True, nogil=True, inline="always")
def candidate_n0(a, step):  # pragma: no cover
    return max(np.int64(1), np.int64(math.floor(a / step - 1.5)))


@njit(cache=True, nogil=True, inline="always")
def branches(a, sg, n0, step, wd, lm, q, row, bits, kmax, tail_bits, cdf_length, offset):  # pragma: no cover
    """(cost of the even-parity branch, its choice code, cost of the odd branch).

    Costs are ``wd (r - t)² + λ R``: ``wd`` is the element's distortion weight (1 when
    unweighted; multiplying by 1.0 is exact, so unweighted results do not change).
    """
    ka = first_candidate(n0, q)
    da = a - (2 * ka - q) * step
    db = da - 2 * step
    ca = wd * (da * da) + lm * index_bits(bits, kmax, tail_bits, cdf_length, offset, row, sg * ka)
    cb = wd * (db * db) + lm * index_bits(bits, kmax, tail_bits, cdf_length, offset, row, sg * (ka + 1))
    cz = wd * (a * a) + lm * bits[row, kmax]
    if ka & 1:
        ce, co = cb, ca
    else:
        ce, co = ca, cb
    if ce < cz:
        return ce, 1, co
    return cz, 0, co


@njit(cache=True, nogil=True, inline="always")
def union_level(k, q):  # pragma: no cover
    """Reconstruction level in steps ``Δ`` of TCQ index ``k`` in quantizer ``q``: ``2k - sgn(k) q``."""
    if k > 0:
        return 2 * k - q
    if k < 0:
        return 2 * k + q
    return k


@njit(cache=True, nogil=True, inline="always")
def soft_index(n, q):  # pragma: no cover
    """``(member, k)``: whether union level ``n`` belongs to quantizer ``q`` and its TCQ index
    there (0 when it does not). ``Q0`` holds the even ``n`` (``k = n/2``), ``Q1`` the odd ones
    and 0 (``k = (n ± 1)/2``); the inverse of :func:`union_level`."""
    if q == 0:
        if n & 1:
            return False, np.int64(0)
        return True, n >> 1
    if n == 0:
        return True, np.int64(0)
    if (n & 1) == 0:
        return False, np.int64(0)
    if n > 0:
        return True, (n + 1) >> 1
    return True, -((1 - n) >> 1)
