"""NumPy references of the Numba kernels in :mod:`trellis.kernels`.

Written for clarity, not speed; the tests require the kernels to return exactly the
indices (and states) of these functions. Arguments mirror the kernels: ``r`` (the residual
``y - μ`` in the latent's dtype; all cost arithmetic is float64), ``mu`` and ``rows`` are
``(chains, length)`` arrays, ``table`` a :class:`trellis.tables.RateTable`, ``lam`` one λ
per chain.
"""

from __future__ import annotations

import numpy as np

from trellis._costs import SOFT_WINDOW
from trellis.machines import StateMachine
from trellis.tables import NUM_SCALES, RateTable

__all__ = ["usq", "rdoq", "tcq", "soft_tcq", "chain_states", "tcq_candidates", "reconstruct"]


_NO_STATES = np.zeros(1, dtype=np.int64)


def usq(r: np.ndarray, mu: np.ndarray, rows: np.ndarray, step: float, theta: float, table: RateTable):
    """Mean-relative USQ: ``rint(r/Δ)`` for ``θ = ½``, else ``sgn(r) floor(|r|/Δ + θ)``."""
    x = r.astype(np.float64) / step
    q = np.rint(x) if theta == 0.5 else np.sign(x) * np.floor(np.abs(x) + theta)
    q = q.astype(np.int64)
    y_hat = reconstruct(q, np.zeros(q.shape, np.uint8), _NO_STATES, False, step, mu)
    return q.astype(np.int32), y_hat, table.index_bits(rows, q).sum(axis=1)


def rdoq(r, w, mu, rows, step: float, lam: np.ndarray, table: RateTable):
    """Greedy RDOQ over {0, floor(r/Δ), ceil(r/Δ)}; ties keep the earlier candidate.

    ``w``: distortion weights shaped like ``r``, or ``None`` (all 1).
    """
    r = r.astype(np.float64)
    w = np.ones_like(r) if w is None else w
    u = r / step
    lo, hi = np.floor(u).astype(np.int64), np.ceil(u).astype(np.int64)
    cands = np.stack([np.zeros_like(lo), lo, hi])  # evaluation order = tie order
    bits = table.index_bits(rows[None], cands)
    dist = w[None] * ((r[None] - cands * step) ** 2)
    cost = dist + lam[None, :, None] * bits
    # floor == 0 or ceil == floor repeat an earlier candidate: never strictly better.
    choice = np.argmin(cost, axis=0)
    q = np.take_along_axis(cands, choice[None], 0)[0]
    y_hat = reconstruct(q, np.zeros(q.shape, np.uint8), _NO_STATES, False, step, mu)
    return q.astype(np.int32), y_hat, np.take_along_axis(bits, choice[None], 0)[0].sum(axis=1)


def tcq_candidates(a: float, step: float, q: int) -> tuple[int, int]:
    """The two non-zero candidate magnitudes ``|k|`` of quantizer ``q`` (VVC rule).

    With ``u = a/Δ`` and ``n0 = max(1, floor(u - 1.5))``, the union indices
    ``n0 … n0+3`` contain two points of each quantizer: even ``n = 2|k|`` for ``Q0``,
    odd ``n = 2|k| - 1`` for ``Q1``.

    Returns:
        ``(even-k candidate, odd-k candidate)`` magnitudes.
    """
    n0 = max(1, int(np.floor(a / step - 1.5)))
    union = np.arange(n0, n0 + 4)
    mags = (union[(union & 1) == q] + q) // 2
    return (int(mags[0]), int(mags[1])) if mags[0] % 2 == 0 else (int(mags[1]), int(mags[0]))


def tcq(r, w, mu, rows, step: float, lam: np.ndarray, table: RateTable, sm: StateMachine):
    """Viterbi TCQ, one chain at a time, vectorised over states (``w`` as in :func:`rdoq`).

    Returns ``(indices, states, coding_rows, y_hat, chain_bits)`` as :func:`trellis.kernels.tcq`.
    """
    r = r.astype(np.float64)
    w = np.ones_like(r) if w is None else w
    C, L = r.shape
    S = sm.num_states
    idx = np.zeros((C, L), dtype=np.int32)
    states = np.zeros((C, L), dtype=np.uint8)
    chain_bits = np.zeros(C)
    dest = sm.next_state.reshape(-1)  # branch b = 2 s + parity, in ACS order
    for c in range(C):
        J = np.full(S, np.inf)
        J[0] = 0.0
        bp = np.zeros((L, S), dtype=np.int64)  # branch index b
        bk = np.zeros((L, S), dtype=np.int64)  # chosen signed index
        for i in range(L):
            a, sg = abs(r[c, i]), (1 if r[c, i] >= 0 else -1)
            cost = np.empty((2, 2))  # [quantizer, parity]
            kk = np.empty((2, 2), dtype=np.int64)
            for q in (0, 1):
                ke, ko = tcq_candidates(a, step, q)
                ks = np.array([0, sg * ke, sg * ko])
                b = table.index_bits(q * NUM_SCALES + rows[c, i], ks)
                t = np.array([0, 2 * ke - q, 2 * ko - q]) * step
                cst = w[c, i] * ((a - t) ** 2) + lam[c] * b
                e = 1 if cst[1] < cst[0] else 0  # zero wins ties
                cost[q] = cst[e], cst[2]
                kk[q] = ks[e], ks[2]
            cand = (J[:, None] + cost[sm.quantizer]).reshape(-1)
            kcand = kk[sm.quantizer].reshape(-1)
            for t in range(S):
                branches = np.flatnonzero(dest == t)
                best = branches[np.argmin(cand[branches])]
                bp[i, t], bk[i, t] = best, kcand[best]
            J = np.array([cand[bp[i, t]] for t in range(S)])
        t = int(np.argmin(J))
        for i in range(L - 1, -1, -1):
            idx[c, i] = bk[i, t]
            t = bp[i, t] >> 1
            states[c, i] = t
        chain_bits[c] = table.index_bits(sm.quantizer[states[c]] * NUM_SCALES + rows[c], idx[c]).sum()
    coding_rows = (sm.quantizer[states] * NUM_SCALES + rows).astype(np.int32)
    return idx, states, coding_rows, reconstruct(idx, states, sm.quantizer, True, step, mu), chain_bits


def soft_tcq(
    r, w, rows, step: float, lam: np.ndarray, tau: float, table: RateTable, sm: StateMachine, g=None, rho=None
):
    """The soft trellis (:func:`trellis.kernels.soft_tcq`), vectorised over chains.

    Returns ``(E[t], E[R], grad)`` (``grad`` all 0 without ``g``)."""
    r = r.astype(np.float64)
    C, L = r.shape
    w = np.ones_like(r) if w is None else w
    u = np.rint(r / step).astype(np.int64)
    n = u[..., None] + np.arange(-SOFT_WINDOW, SOFT_WINDOW + 1)  # (C, L, J) union levels
    t = n * step
    member = np.stack([n % 2 == 0, (n % 2 == 1) | (n == 0)])  # (2, C, L, J)
    k = np.stack([n // 2, np.where(n > 0, (n + 1) // 2, -((1 - n) // 2)) * (n != 0)])
    parity = k & 1
    bits = np.stack([table.index_bits(q * NUM_SCALES + rows[..., None], k[q]) for q in (0, 1)])
    cost = w[..., None] * (r[..., None] - t) ** 2 + lam[:, None, None] * bits
    logw = np.where(member, -cost / tau, -np.inf)
    grp = np.stack([np.where(parity == p, logw, -np.inf) for p in (0, 1)], axis=1)  # (q, p, C, L, J)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.logaddexp.reduce(grp, axis=-1)  # (q, p, C, L)
        within = np.where(np.isfinite(grp), np.exp(grp - phi[..., None]), 0.0)
    S = sm.num_states
    nxt, quant = sm.next_state, sm.quantizer
    la = np.full((L + 1, C, S), -np.inf)
    la[0, :, 0] = 0.0
    for i in range(L):
        for s in range(S):
            for p in (0, 1):
                d = nxt[s, p]
                la[i + 1, :, d] = np.logaddexp(la[i + 1, :, d], la[i, :, s] + phi[quant[s], p, :, i])
    lb = np.zeros((L + 1, C, S))
    for i in range(L - 1, -1, -1):
        for s in range(S):
            q = quant[s]
            lb[i, :, s] = np.logaddexp(
                phi[q, 0, :, i] + lb[i + 1, :, nxt[s, 0]], phi[q, 1, :, i] + lb[i + 1, :, nxt[s, 1]]
            )
    logz = np.logaddexp.reduce(la[L], axis=-1)  # (C,)
    # P(i, s, p) and the candidate marginals P(i, s, p) · softmax within the branch
    ps = np.exp(
        la[:L, :, :, None] + phi[quant].transpose(3, 2, 0, 1) + lb[1:][:, :, nxt] - logz[None, :, None, None]
    )  # (L, C, S, 2)
    wsp = within[quant].transpose(3, 2, 0, 1, 4)  # (L, C, S, 2, J)
    pc = ps[..., None] * wsp
    tl = t.transpose(1, 0, 2)[:, :, None, None, :]  # (L, C, 1, 1, J)
    bl = bits[quant].transpose(2, 1, 0, 3)[:, :, :, None, :]  # (L, C, S, 1, J)
    et = (pc * tl).sum(axis=(2, 3, 4)).T
    er = (pc * bl).sum(axis=(2, 3, 4)).T
    if g is None:
        return et, er, np.zeros((C, L))
    f = g.T[:, :, None, None, None] * tl + rho.T[:, :, None, None, None] * bl  # (L, C, S, 1, J)
    fb = (wsp * f).sum(-1)  # (L, C, S, 2)
    m = np.zeros((L + 1, C, S))
    for i in range(L):
        for s in range(S):
            for p in (0, 1):
                d = nxt[s, p]
                with np.errstate(invalid="ignore"):
                    wt = np.exp(la[i, :, s] + phi[quant[s], p, :, i] - la[i + 1, :, d])
                m[i + 1, :, d] += np.where(np.isfinite(wt), wt, 0.0) * (m[i, :, s] + fb[i, :, s, p])
    h = np.zeros((L + 1, C, S))
    for i in range(L - 1, -1, -1):
        for s in range(S):
            for p in (0, 1):
                d = nxt[s, p]
                h[i, :, s] += np.exp(phi[quant[s], p, :, i] + lb[i + 1, :, d] - lb[i, :, s]) * (
                    fb[i, :, s, p] + h[i + 1, :, d]
                )
    ef = (np.exp(la[L] - logz[:, None]) * m[L]).sum(-1)  # (C,)
    cond = m[:L][..., None, None] + f + h[1:][:, :, nxt][..., None] - ef[None, :, None, None, None]
    cov = (pc * (tl - et.T[:, :, None, None, None]) * cond).sum(axis=(2, 3, 4)).T
    return et, er, 2.0 * w / tau * cov


def chain_states(indices: np.ndarray, sm: StateMachine) -> np.ndarray:
    """States in which each index is coded, chain by chain."""
    return np.stack([sm.states_of(row) for row in indices]) if len(indices) else np.zeros(indices.shape, np.uint8)


def reconstruct(indices, states, quant, trellis, step, mu):
    """``ŷ = μ + t``, ``t = float(n Δ)`` in ``μ``'s dtype; ``n = 2k - sgn(k) quant[s]`` for TCQ."""
    k = indices.astype(np.int64)
    n = 2 * k - np.sign(k) * quant[states] if trellis else k
    return mu + (n * step).astype(mu.dtype)
