"""Numba kernels of the quantizers (NumPy references in :mod:`trellis.reference`).

All kernels work on 2-D ``(chains, length)`` arrays: one row per independent chain
(a trellis for TCQ; for USQ and RDOQ the rows are merely a layout). They run ``prange``
over chains, allocate nothing per element, and read decision rates from the quantized
tables of :class:`trellis.tables.RateTable` (``bits``, ``kmax``, ``tail_bits``,
``cdf_length``, ``offset``). Rates outside a row are the exact escape costs.

Back-pointers of the TCQ Viterbi are one byte per (element, state):
``prev_state << 2 | choice`` with choice 0 = zero, 1 = the even non-zero candidate,
2 = the odd candidate of the state's quantizer. Candidates follow VVC's rule: with
``u = |r| / Δ`` and ``n0 = max(1, floor(u - 1.5))`` the union indices ``n0 … n0 + 3``
hold two levels of each quantizer; together with zero each state has three choices.
"""

from __future__ import annotations

import math

import numpy as np

from numba import njit, prange

from trellis._acs import forward4, forward8
from trellis._costs import NUM_SCALES, candidate_n0, first_candidate, index_bits, union_level

__all__ = ["scale_rows", "usq", "rdoq", "tcq", "chain_states", "reconstruct"]


@njit(cache=True, nogil=True, parallel=True)
def scale_rows(sigma, table):  # pragma: no cover
    """Row of the smallest table scale >= sigma, clamped to the last row (flat arrays).

    A branch-free binary search over the 64-entry table: the number of table scales
    below sigma, i.e. ``searchsorted(table, sigma, "left")``, clamped to 63.
    """
    n = sigma.shape[0]
    out = np.empty(n, dtype=np.int32)
    last = table.shape[0] - 1
    for i in prange(n):
        s = sigma[i]
        j = 0
        half = 32
        while half > 0:
            j += half if table[j + half - 1] < s else 0
            half >>= 1
        out[i] = min(j, last)
    return out


@njit(cache=True, nogil=True, parallel=True)
def usq(r, mu, rows, step, theta, bits, kmax, tail_bits, cdf_length, offset):  # pragma: no cover
    """Mean-relative uniform scalar quantization.

    ``q = rint(r / Δ)`` (half to even, as ``torch.round``) when ``θ = ½``, otherwise the
    dead-zone rule ``q = sgn(r) floor(|r| / Δ + θ)``. Returns
    ``(indices, y_hat, chain_bits)`` with ``y_hat = μ + float(qΔ)`` in ``μ``'s dtype.
    """
    C, L = r.shape
    idx = np.empty((C, L), dtype=np.int32)
    y_hat = np.empty_like(mu)
    chain_bits = np.zeros(C, dtype=np.float64)
    half = theta == 0.5
    for c in prange(C):
        acc = 0.0
        for i in range(L):
            x = np.float64(r[c, i]) / step
            if half:
                q = np.int64(np.rint(x))
            else:
                q = np.int64(math.floor(abs(x) + theta))
                if x < 0:
                    q = -q
            idx[c, i] = q
            y_hat[c, i] = mu[c, i] + y_hat.dtype.type(q * step)
            acc += index_bits(bits, kmax, tail_bits, cdf_length, offset, rows[c, i], q)
        chain_bits[c] = acc
    return idx, y_hat, chain_bits


@njit(cache=True, nogil=True, parallel=True)
def rdoq(r, w, mu, rows, step, lam, bits, kmax, tail_bits, cdf_length, offset):  # pragma: no cover
    """Greedy scalar RDOQ: per element the best of {0, floor(r/Δ), ceil(r/Δ)}.

    Cost ``w (r - qΔ)² + λ_c R(q)`` with ``λ_c = lam[chain]`` and distortion weights ``w``
    (``None``: all 1); ties keep the earlier candidate in the order 0, floor, ceil.
    Returns ``(indices, y_hat, chain_bits)``.
    """
    C, L = r.shape
    idx = np.empty((C, L), dtype=np.int32)
    y_hat = np.empty_like(mu)
    chain_bits = np.zeros(C, dtype=np.float64)
    for c in prange(C):
        lm = lam[c]
        acc = 0.0
        for i in range(L):
            x = np.float64(r[c, i])
            row = rows[c, i]
            wd = 1.0 if w is None else w[c, i]
            u = x / step
            lo = np.int64(math.floor(u))
            hi = np.int64(math.ceil(u))
            best_q = np.int64(0)
            best_b = index_bits(bits, kmax, tail_bits, cdf_length, offset, row, 0)
            best = wd * (x * x) + lm * best_b
            for q in (lo, hi):
                if q == 0:
                    continue
                b = index_bits(bits, kmax, tail_bits, cdf_length, offset, row, q)
                d = x - q * step
                cost = wd * (d * d) + lm * b
                if cost < best:
                    best = cost
                    best_q = q
                    best_b = b
                if hi == lo:  # r/Δ integral: ceil repeats floor
                    break
            idx[c, i] = best_q
            y_hat[c, i] = mu[c, i] + y_hat.dtype.type(best_q * step)
            acc += best_b
        chain_bits[c] = acc
    return idx, y_hat, chain_bits


@njit(cache=True, nogil=True, parallel=True)
def tcq(r, w, mu, rows, step, lam, num_states, quant, bits, kmax, tail_bits, cdf_length, offset):  # pragma: no cover
    """Trellis-coded quantization: Viterbi over the 4- or 8-state machine.

    Minimises ``Σ w (r - t)² + λ_c Σ R`` per chain (``w``: distortion weights, ``None``
    for all 1), start state 0, free end state; the
    forward passes are the hard-wired ones of :mod:`trellis._acs`. Returns
    ``(indices, states, coding_rows, y_hat, chain_bits)``: ``states[c, i]`` is the state
    in which element i is coded, ``coding_rows = quant[state] * 64 + rows``, and
    ``y_hat = μ + float((2k - sgn(k) quant[state]) Δ)`` in ``μ``'s dtype.
    """
    C, L = r.shape
    S = num_states
    idx = np.empty((C, L), dtype=np.int32)
    states = np.empty((C, L), dtype=np.uint8)
    coding_rows = np.empty((C, L), dtype=np.int32)
    y_hat = np.empty_like(mu)
    chain_bits = np.zeros(C, dtype=np.float64)
    for c in prange(C):
        bp = np.empty((L, S), dtype=np.uint8)
        wc = None if w is None else w[c]
        if S == 8:
            t = forward8(r[c], wc, rows[c], step, lam[c], bits, kmax, tail_bits, cdf_length, offset, bp)
        else:
            t = forward4(r[c], wc, rows[c], step, lam[c], bits, kmax, tail_bits, cdf_length, offset, bp)
        # Trace the survivor path first (a tight serial loop), keeping the choice code
        # in idx; then turn choices into indices, levels and rates (independent steps).
        for i in range(L - 1, -1, -1):
            cd = np.int64(bp[i, t])
            t = cd >> 2
            states[c, i] = t
            idx[c, i] = cd & 3
        acc = 0.0
        for i in range(L):
            choice = idx[c, i]
            q = quant[states[c, i]]
            k = np.int64(0)
            if choice != 0:
                x = np.float64(r[c, i])
                k = first_candidate(candidate_n0(abs(x), step), q)
                if (k & 1) != (choice == 2):  # choice 1 wants the even, 2 the odd one
                    k += 1
                if x < 0:
                    k = -k
            row = q * NUM_SCALES + rows[c, i]
            idx[c, i] = k
            coding_rows[c, i] = row
            y_hat[c, i] = mu[c, i] + y_hat.dtype.type(union_level(k, q) * step)
            acc += index_bits(bits, kmax, tail_bits, cdf_length, offset, row, k)
        chain_bits[c] = acc
    return idx, states, coding_rows, y_hat, chain_bits


@njit(cache=True, nogil=True, parallel=True)
def chain_states(indices, nxt):  # pragma: no cover
    """States in which each index is coded, per chain (start state 0)."""
    C, L = indices.shape
    states = np.empty((C, L), dtype=np.uint8)
    for c in prange(C):
        s = 0
        for i in range(L):
            states[c, i] = s
            s = nxt[s, indices[c, i] & 1]
    return states


@njit(cache=True, nogil=True, parallel=True)
def reconstruct(indices, states, quant, trellis, step, mu):  # pragma: no cover
    """``ŷ = μ + t`` on flat arrays, ``t = float(n Δ)`` rounded to ``μ``'s dtype.

    ``n = 2k - sgn(k) quant[state]`` for TCQ (``trellis`` true), ``n = k`` otherwise.
    """
    out = np.empty_like(mu)
    for i in prange(mu.shape[0]):
        k = np.int64(indices[i])
        n = union_level(k, quant[states[i]]) if trellis else k
        out[i] = mu[i] + out.dtype.type(n * step)
    return out
