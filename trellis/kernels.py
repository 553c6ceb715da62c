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
from trellis._costs import (
    NUM_SCALES,
    SOFT_WINDOW,
    candidate_n0,
    first_candidate,
    index_bits,
    soft_index,
    union_level,
)

__all__ = ["scale_rows", "usq", "rdoq", "tcq", "soft_tcq", "chain_states", "reconstruct"]


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


@njit(cache=True, nogil=True, inline="always")
def _lse(a, b):  # pragma: no cover
    """``log(eᵃ + eᵇ)``; the smaller term is dropped where it is below ``e⁻⁴⁰`` of the larger."""
    if a < b:
        a, b = b, a
    if a - b > 40.0 or b == -np.inf:
        return a
    return a + math.log1p(math.exp(b - a))


@njit(cache=True, nogil=True, parallel=True)
def soft_tcq(
    r, w, rows, step, lam, tau, nxt, quant, g, rho, bits, kmax, tail_bits, cdf_length, offset
):  # pragma: no cover
    """The soft trellis: expectations under ``p(path) ∝ exp(−Σ (w (r − t)² + λ_c R) / τ)``.

    Per chain (start state 0, free end), candidates the union levels ``nΔ``,
    ``n = rint(r/Δ) ± SOFT_WINDOW`` (``Q0``: even ``n``; ``Q1``: odd ``n`` and 0), each
    with its exact table bits ``R`` in its quantizer's row. The candidates of one quantizer
    and index parity collapse into one branch (log weight ``φ``, within it a softmax);
    forward–backward over the state machine ``nxt`` in the log domain. Returns
    ``(E[t], E[R], grad)`` per element, ``t`` in latent units; with ``g`` given (``None``:
    no gradient, ``grad`` all 0), ``grad`` is ``∂E[F]/∂r`` for ``F = Σ g t + ρ R``, i.e.
    ``(2 w / τ) Cov(F, t)``, from the conditional expectations of the prefix and suffix
    parts of ``F`` given each state (the expectation semiring).
    """
    C, L = r.shape
    S = nxt.shape[0]
    J = 2 * SOFT_WINDOW + 1
    ninf = -np.inf
    et = np.zeros((C, L))
    er = np.zeros((C, L))
    grad = np.zeros((C, L))
    for c in prange(C):
        sw = np.zeros((L, 2, J))  # softmax of each candidate within its (quantizer, parity) branch
        tv = np.empty((L, J))  # its level t
        bv = np.zeros((L, 2, J))  # its bits
        pv = np.full((L, 2, J), -1, dtype=np.int64)  # its index parity (−1: not in the quantizer)
        phi = np.full((L, 2, 2), ninf)  # log weight of each branch
        for i in range(L):
            x = np.float64(r[c, i])
            wd = 1.0 if w is None else w[c, i]
            u = np.int64(np.rint(x / step))
            for j in range(J):
                n = u - SOFT_WINDOW + j
                t = n * step
                tv[i, j] = t
                dist = wd * (x - t) * (x - t)
                for q in range(2):
                    member, k = soft_index(n, q)
                    if member:
                        b = index_bits(bits, kmax, tail_bits, cdf_length, offset, q * NUM_SCALES + rows[c, i], k)
                        bv[i, q, j] = b
                        pv[i, q, j] = k & 1
                        sw[i, q, j] = -(dist + lam[c] * b) / tau  # the log weight, until normalised below
                        phi[i, q, k & 1] = max(phi[i, q, k & 1], sw[i, q, j])
            for q in range(2):
                tot0 = 0.0
                tot1 = 0.0
                for j in range(J):
                    p = pv[i, q, j]
                    if p >= 0:
                        e = math.exp(sw[i, q, j] - phi[i, q, p])
                        sw[i, q, j] = e
                        if p == 0:
                            tot0 += e
                        else:
                            tot1 += e
                for j in range(J):
                    p = pv[i, q, j]
                    if p >= 0:
                        sw[i, q, j] /= tot0 if p == 0 else tot1
                if tot0 > 0.0:
                    phi[i, q, 0] += math.log(tot0)
                if tot1 > 0.0:
                    phi[i, q, 1] += math.log(tot1)
        la = np.full((L + 1, S), ninf)  # log forward
        la[0, 0] = 0.0
        for i in range(L):
            for s in range(S):
                if la[i, s] != ninf:
                    q = quant[s]
                    for p in range(2):
                        d = nxt[s, p]
                        la[i + 1, d] = _lse(la[i + 1, d], la[i, s] + phi[i, q, p])
        lb = np.zeros((L + 1, S))  # log backward
        for i in range(L - 1, -1, -1):
            for s in range(S):
                q = quant[s]
                lb[i, s] = _lse(phi[i, q, 0] + lb[i + 1, nxt[s, 0]], phi[i, q, 1] + lb[i + 1, nxt[s, 1]])
        pb = np.zeros((L, S, 2))  # P(element i is coded in state s with index parity p)
        gt = np.zeros((2, 2))  # E[t], E[R] within each branch of one element
        gr = np.zeros((2, 2))
        for i in range(L):
            top = ninf
            for s in range(S):
                q = quant[s]
                for p in range(2):
                    v = la[i, s] + phi[i, q, p] + lb[i + 1, nxt[s, p]]
                    pb[i, s, p] = v
                    top = max(top, v)
            tot = 0.0
            for s in range(S):
                for p in range(2):
                    v = pb[i, s, p] - top
                    e = math.exp(v) if v > -40.0 else 0.0
                    pb[i, s, p] = e
                    tot += e
            gt[:] = 0.0
            gr[:] = 0.0
            for q in range(2):
                for j in range(J):
                    p = pv[i, q, j]
                    if p >= 0:
                        gt[q, p] += sw[i, q, j] * tv[i, j]
                        gr[q, p] += sw[i, q, j] * bv[i, q, j]
            a_t = 0.0
            a_r = 0.0
            for s in range(S):
                q = quant[s]
                for p in range(2):
                    pb[i, s, p] /= tot
                    a_t += pb[i, s, p] * gt[q, p]
                    a_r += pb[i, s, p] * gr[q, p]
            et[c, i] = a_t
            er[c, i] = a_r
        if g is None:
            continue
        fb = np.zeros((L, 2, 2))  # E[g t + ρ R] within each branch
        cf = np.zeros((L, 2, 2))  # E[t − E t] within each branch
        cg = np.zeros((L, 2, 2))  # E[(t − E t)(g t + ρ R)] within each branch
        for i in range(L):
            for q in range(2):
                for j in range(J):
                    p = pv[i, q, j]
                    if p >= 0:
                        f = g[c, i] * tv[i, j] + rho[c, i] * bv[i, q, j]
                        dt = tv[i, j] - et[c, i]
                        fb[i, q, p] += sw[i, q, j] * f
                        cf[i, q, p] += sw[i, q, j] * dt
                        cg[i, q, p] += sw[i, q, j] * dt * f
        m = np.zeros((L + 1, S))  # E[F of the prefix | state]
        for i in range(L):
            for s in range(S):
                if la[i, s] != ninf:
                    q = quant[s]
                    for p in range(2):
                        d = nxt[s, p]
                        v = la[i, s] + phi[i, q, p] - la[i + 1, d]
                        if v > -40.0:
                            m[i + 1, d] += math.exp(v) * (m[i, s] + fb[i, q, p])
        h = np.zeros((L + 1, S))  # E[F of the suffix | state]
        for i in range(L - 1, -1, -1):
            for s in range(S):
                q = quant[s]
                acc = 0.0
                for p in range(2):
                    d = nxt[s, p]
                    v = phi[i, q, p] + lb[i + 1, d] - lb[i, s]
                    if v > -40.0:
                        acc += math.exp(v) * (fb[i, q, p] + h[i + 1, d])
                h[i, s] = acc
        top = ninf
        for s in range(S):
            top = max(top, la[L, s])
        ef = 0.0
        tot = 0.0
        for s in range(S):
            v = la[L, s] - top
            if v > -40.0:
                ef += math.exp(v) * m[L, s]
                tot += math.exp(v)
        ef /= tot
        for i in range(L):
            cov = 0.0
            for s in range(S):
                q = quant[s]
                for p in range(2):
                    if pb[i, s, p] > 0.0:
                        cov += pb[i, s, p] * ((m[i, s] + h[i + 1, nxt[s, p]] - ef) * cf[i, q, p] + cg[i, q, p])
            wd = 1.0 if w is None else w[c, i]
            grad[c, i] = 2.0 * wd / tau * cov
    return et, er, grad


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
