"""Tests of the trellis engine: machines, tables, kernels vs references, optimality, errors."""

import itertools
import subprocess
import sys
import zlib

import numpy as np
import pytest

from scipy.special import ndtr

from trellis import Quantizer, codegen, kernels, machine, rate_table, reference
from trellis.machines import ECM_TRANSITIONS, VVC_TRANSITIONS, StateMachine
from trellis.tables import NUM_SCALES, SCALE_TABLE, cell_bounds, escape_bits, quantize_pmf, scale_rows_reference

METHOD_STEPS = {"usq": 1.0, "rdoq": 1.0, "tcq4": 0.6, "tcq8": 0.6}


def latent(shape, seed=0, outliers=False):
    """y, μ, σ with σ log-uniform over and beyond the table (0.05 … 400)."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.05), np.log(400), shape)).astype(np.float32)
    mu = rng.normal(0, 3, shape).astype(np.float32)
    y = (mu + sigma * rng.laplace(size=shape)).astype(np.float32)
    if outliers:  # far outside every table row: exercises the escape path
        mask = rng.random(shape) < 0.05
        y[mask] += rng.choice([-1, 1], mask.sum()) * rng.uniform(1e3, 1e5, mask.sum())
    return y, mu, sigma


class TestMachines:
    def test_ecm_tables(self):
        # quantization.md §3: (k even ->, k odd ->) per state
        assert machine(4).next_state.tolist() == [[0, 1], [2, 3], [1, 0], [3, 2]]
        assert machine(8).next_state.tolist() == [[0, 2], [5, 7], [1, 3], [6, 4], [2, 0], [4, 6], [3, 1], [7, 5]]
        for S in (4, 8):
            assert machine(S).quantizer.tolist() == [s & 1 for s in range(S)]

    def test_ecm4_is_vvc_relabelled(self):
        vvc = np.array([[(VVC_TRANSITIONS >> ((s << 2) + (p << 1))) & 3 for p in (0, 1)] for s in range(4)])
        relabel = np.array([0, 2, 1, 3])  # VVC state -> ECM state (1 <-> 2)
        ecm = machine(4)
        for s in range(4):
            for p in (0, 1):
                assert ecm.next_state[relabel[s], p] == relabel[vvc[s, p]]
            assert ecm.quantizer[relabel[s]] == s >> 1  # VVC: quantizer = s >> 1

    def test_predecessors_cover_all_branches(self):
        for S in (4, 8):
            sm = machine(S)
            pred = sm.predecessors
            assert sorted(map(tuple, pred.reshape(-1, 2).tolist())) == [(s, p) for s in range(S) for p in (0, 1)]
            for t in range(S):
                for s, p in pred[t]:
                    assert sm.next_state[s, p] == t

    def test_bad_machine(self):
        with pytest.raises(ValueError, match="num_states"):
            machine(6)
        with pytest.raises(ValueError, match="4-state"):
            StateMachine.from_packed(4, ECM_TRANSITIONS[8])


class TestTables:
    @pytest.mark.parametrize("kind,step", [("usq", 1.0), ("usq", 0.7), ("tcq", 0.6), ("tcq", 0.3)])
    def test_cells_partition_and_cdfs(self, kind, step):
        tab = rate_table(kind, step)
        for c in range(tab.num_classes):
            for j in (0, 20, 40, 63):
                r = c * NUM_SCALES + j
                sigma = float(SCALE_TABLE[j])
                K = -int(tab.offset[r])
                lo, hi = cell_bounds(kind, c, np.arange(K + 1), step)
                assert lo[0] == -hi[0] and np.all(lo[1:] == hi[:-1])  # contiguous, symmetric
                mass = ndtr(hi / sigma) - ndtr(lo / sigma)
                tail = 2 * ndtr(-hi[-1] / sigma)
                assert tail <= 1e-9
                assert abs(mass[0] + 2 * mass[1:].sum() + tail - 1) < 1e-12
                n = int(tab.cdf_length[r])
                cdf = tab.cdf[r, :n]
                assert n == 2 * K + 3 and cdf[0] == 0 and cdf[-1] == 1 << 16 and np.all(np.diff(cdf) > 0)
                # table rates are -log2 of the quantized frequencies
                freq = np.diff(cdf)
                k = np.arange(-K, K + 1)
                assert np.allclose(tab.index_bits(np.full_like(k, r), k), 16 - np.log2(freq[:-1]))

    def test_q0_is_usq_at_twice_the_step(self):
        tcq, usq = rate_table("tcq", 0.55), rate_table("usq", 1.1)
        assert np.array_equal(tcq.cdf[:NUM_SCALES, : usq.cdf.shape[1]], usq.cdf)
        assert np.array_equal(tcq.offset[:NUM_SCALES], usq.offset)

    def test_q1_zero_costs_more_than_q0_zero(self):
        tab = rate_table("tcq", 1.0)
        j = int(np.searchsorted(SCALE_TABLE, 1.0))
        assert tab.bits[NUM_SCALES + j, tab.kmax] > tab.bits[j, tab.kmax]

    def test_quantize_pmf(self):
        rng = np.random.default_rng(3)
        for n in (2, 3, 50, 3000):
            p = rng.random(n) ** 8
            f = quantize_pmf(p)
            assert f.sum() == 1 << 16 and f.min() >= 1
        with pytest.raises(ValueError):
            quantize_pmf([0.0, 0.0])

    def test_escape_bits_match_compressai_rule(self):
        # value -1 -> raw 1 (1 bypass), value 2K+1+20 -> raw 40 (2 bypasses), raw 0 -> 0 bypasses
        assert escape_bits(np.array([-1, 35, 15]), np.array([15, 15, 15])).tolist() == [8.0, 12.0, 4.0]

    def test_scale_rows_kernel_matches_reference(self):
        rng = np.random.default_rng(4)
        s = np.concatenate(
            [
                SCALE_TABLE,
                np.nextafter(SCALE_TABLE, np.float32(0)),
                np.nextafter(SCALE_TABLE, np.float32(1e9)),
                np.exp(rng.uniform(-8, 8, 10000)),
                [1e-30, 3e38],
            ]
        ).astype(np.float32)
        rows = kernels.scale_rows(s, SCALE_TABLE)
        assert np.array_equal(rows, scale_rows_reference(s))
        assert rows[0] == 0 and rows[63] == 63 and rows[64 + 5] == 5 and rows[128 + 5] == 6

    def test_bad_tables(self):
        with pytest.raises(ValueError, match="step"):
            rate_table("tcq", 0.0)
        with pytest.raises(ValueError, match="kind"):
            rate_table("vq", 1.0)


class TestKernelsMatchReference:
    @pytest.mark.parametrize("method", ["usq", "rdoq", "tcq4", "tcq8"])
    @pytest.mark.parametrize("reset", ["channel", "tensor"])
    @pytest.mark.parametrize("shape", [(5, 6, 7), (2, 3, 4, 5)])
    def test_exact(self, method, reset, shape):
        y, mu, sigma = latent(shape, seed=zlib.crc32(repr((method, reset, shape)).encode()), outliers=True)
        q = Quantizer(method, step=METHOD_STEPS[method], lam=0.08, reset=reset)
        a = q.quantize(y, mu, sigma)
        b = q.quantize(y, mu, sigma, backend="numpy")
        for name in ("indices", "states", "rows", "y_hat"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.bits == pytest.approx(b.bits, rel=1e-12)
        assert a.indices.dtype == np.int32 and a.states.dtype == np.uint8 and a.y_hat.dtype == np.float32

    @pytest.mark.parametrize("method", ["usq", "rdoq", "tcq4", "tcq8"])
    def test_dequantize_reproduces_encoder(self, method):
        y, mu, sigma = latent((4, 9, 11), seed=7, outliers=True)
        for reset in ("channel", "tensor"):
            q = Quantizer(method, step=METHOD_STEPS[method], lam=0.05, reset=reset)
            out = q.quantize(y, mu, sigma)
            for backend in ("numba", "numpy"):
                y_hat, states = q.dequantize(out.indices, mu, backend=backend)
                assert np.array_equal(y_hat, out.y_hat) and np.array_equal(states, out.states)

    def test_bits_are_table_bits_of_the_indices(self):
        y, mu, sigma = latent((3, 8, 8), seed=11, outliers=True)
        q = Quantizer("tcq8", step=0.5, lam=0.1)
        out = q.quantize(y, mu, sigma)
        assert out.bits == pytest.approx(q.table.index_bits(out.rows, out.indices).sum(), rel=1e-12)

    def test_usq_is_rounding_half_to_even(self):
        y = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, -2.51], np.float32).reshape(1, 1, 7)
        out = Quantizer("usq").quantize(y, sigma=np.ones_like(y))
        assert out.indices.ravel().tolist() == [0, 2, 2, 0, -2, 0, -3]
        dz = Quantizer("usq", theta=0.3).quantize(y, sigma=np.ones_like(y))
        assert dz.indices.ravel().tolist() == [0, 1, 2, 0, -1, 0, -2]

    def test_rdoq_with_zero_lambda_rounds(self):
        y, mu, sigma = latent((6, 10, 10), seed=5)
        a = Quantizer("rdoq", lam=0.0).quantize(y, mu, sigma)
        b = Quantizer("usq").quantize(y, mu, sigma)
        assert np.array_equal(a.indices, b.indices)

    def test_rate_lambda_trades_rate_for_distortion(self):
        y, mu, sigma = latent((8, 16, 16), seed=9)
        for method in ("rdoq", "tcq8"):
            lo = Quantizer(method, step=METHOD_STEPS[method], lam=0.01).quantize(y, mu, sigma)
            hi = Quantizer(method, step=METHOD_STEPS[method], lam=1.0).quantize(y, mu, sigma)
            assert hi.bits < lo.bits
            assert np.mean((hi.y_hat - y) ** 2) > np.mean((lo.y_hat - y) ** 2)

    def test_reconstruction_levels(self):
        q = Quantizer("tcq4", step=0.5)
        k = np.array([0, 1, -1, 2, -2, 3], np.int32).reshape(1, 1, 6)
        y_hat, states = q.dequantize(k, np.zeros(k.shape, np.float32))
        # states 0 (Q0) -> 0 even -> 0 (Q0): k=1 -> 2Δ, odd -> 1 (Q1): k=-1 -> -Δ, odd -> 3 (Q1): k=2 -> 3Δ ...
        assert states.ravel().tolist() == [0, 0, 1, 3, 3, 3]
        assert y_hat.ravel().tolist() == [0.0, 1.0, -0.5, 1.5, -1.5, 2.5]


class TestWeights:
    @pytest.mark.parametrize("method", ["rdoq", "tcq4", "tcq8"])
    @pytest.mark.parametrize("per", ["channel", "element"])
    def test_kernels_match_reference(self, method, per):
        y, mu, sigma = latent((4, 7, 9), seed=21, outliers=True)
        rng = np.random.default_rng(22)
        w = np.exp(rng.normal(0, 1, (4, 1, 1) if per == "channel" else y.shape))
        q = Quantizer(method, step=METHOD_STEPS[method], lam=0.1, reset="tensor" if per == "element" else "channel")
        a = q.quantize(y, mu, sigma, weights=w)
        b = q.quantize(y, mu, sigma, weights=w, backend="numpy")
        for name in ("indices", "states", "rows", "y_hat"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name

    @pytest.mark.parametrize("method", ["rdoq", "tcq8"])
    def test_uniform_weight_is_a_lambda_scale(self, method):
        y, mu, sigma = latent((3, 8, 8), seed=23)
        q = Quantizer(method, step=METHOD_STEPS[method], lam=0.2)
        ones = q.quantize(y, mu, sigma, weights=np.ones(1))
        assert np.array_equal(ones.indices, q.quantize(y, mu, sigma).indices)
        # J = Σ 4 (r - t)² + λ R has the argmin of Σ (r - t)² + (λ/4) R
        four = q.quantize(y, mu, sigma, weights=np.full(1, 4.0))
        quarter = Quantizer(method, step=METHOD_STEPS[method], lam=0.05).quantize(y, mu, sigma)
        assert np.array_equal(four.indices, quarter.indices)

    def test_weighted_stream_decodes_without_weights(self):
        from trellis import rans, scale_rows

        y, mu, sigma = latent((4, 6, 6), seed=24, outliers=True)
        q = Quantizer("tcq8", step=0.5, lam=0.1)
        out = q.quantize(y, mu, sigma, weights=np.exp(np.random.default_rng(0).normal(size=(4, 1, 1))))
        tab = q.table
        data = rans.encode(out.indices, out.rows, tab.cdf, tab.cdf_length, tab.offset)
        nxt, cls = q.selector
        idx = rans.decode(
            data, scale_rows(sigma), q.chain_length(y.shape), nxt, cls, NUM_SCALES, tab.cdf, tab.cdf_length, tab.offset
        ).reshape(y.shape)
        y_hat, _ = q.dequantize(idx, mu)
        assert np.array_equal(y_hat, out.y_hat)

    @pytest.mark.parametrize("bad", [np.zeros((2, 1, 1)), -np.ones(1), np.full(1, np.nan), np.ones((3, 1, 1))])
    def test_bad_weights(self, bad):
        y, mu, sigma = latent((2, 3, 4))
        with pytest.raises(ValueError, match="weights"):
            Quantizer("tcq8").quantize(y, mu, sigma, weights=bad)

    def test_usq_takes_no_weights(self):
        y, mu, sigma = latent((2, 3, 4))
        with pytest.raises(ValueError, match="weights"):
            Quantizer("usq").quantize(y, mu, sigma, weights=np.ones(1))


def path_cost(r, rows, step, lam, sm, table, choices, w=None):
    """J of one path through the candidate set: choice 0 zero, 1 even, 2 odd candidate."""
    w = np.ones(len(r)) if w is None else w
    s, J = 0, 0.0
    for x, wd, row, ch in zip(r, w, rows, choices):
        q = int(sm.quantizer[s])
        sg = 1 if x >= 0 else -1
        ke, ko = reference.tcq_candidates(abs(x), step, q)
        k = (0, sg * ke, sg * ko)[ch]
        t = (2 * k - np.sign(k) * q) * step
        J += wd * (x - t) ** 2 + lam * table.index_bits(q * NUM_SCALES + row, k)
        s = sm.next_state[s, k & 1]
    return J


@pytest.mark.parametrize("S", [4, 8])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("weighted", [False, True])
def test_viterbi_is_optimal_exhaustive(S, seed, weighted):
    rng = np.random.default_rng(seed)
    L = 6
    step, lam = rng.uniform(0.3, 1.0), rng.uniform(0.0, 0.5)
    y = rng.normal(0, rng.uniform(0.3, 4), (1, 1, L)).astype(np.float32)
    sigma = np.exp(rng.uniform(np.log(0.1), np.log(5), (1, 1, L))).astype(np.float32)
    w = np.exp(rng.normal(0, 1, L)) if weighted else None
    q = Quantizer(f"tcq{S}", step=step, lam=lam)
    out = q.quantize(y, sigma=sigma, weights=None if w is None else w.reshape(1, 1, L))
    sm, tab = q.machine, q.table
    r = y.ravel().astype(np.float64)
    rows = out.rows.ravel() % NUM_SCALES
    best = min(path_cost(r, rows, step, lam, sm, tab, ch, w) for ch in itertools.product(range(3), repeat=L))
    err = (r - (out.y_hat.ravel().astype(np.float64))) ** 2
    got = np.sum(err if w is None else w * err) + lam * out.bits
    assert got == pytest.approx(best, rel=1e-6, abs=1e-9)


class TestPlainRows:
    """TCQ with plain rows: the low-scale elements rounded at step 1, outside the trellis."""

    @pytest.mark.parametrize("method", ["tcq4", "tcq8"])
    @pytest.mark.parametrize("reset", ["channel", "tensor"])
    @pytest.mark.parametrize("plain_rows", [7, 14, 31])
    def test_kernels_match_reference_and_decode(self, method, reset, plain_rows):
        y, mu, sigma = latent((5, 9, 11), seed=plain_rows)
        q = Quantizer(method, step=0.6, lam=0.05, reset=reset, plain_rows=plain_rows)
        a = q.quantize(y, mu, sigma, weights=np.linspace(0.5, 2, 5).reshape(5, 1, 1))
        b = q.quantize(y, mu, sigma, weights=np.linspace(0.5, 2, 5).reshape(5, 1, 1), backend="numpy")
        for f in ("indices", "states", "rows", "y_hat"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), f
        assert a.bits == pytest.approx(b.bits) and a.bits == pytest.approx(q.table.index_bits(a.rows, a.indices).sum())
        rows = scale_rows_reference(sigma)
        for backend in ("numba", "numpy"):
            y_hat, states = q.dequantize(a.indices, mu, scale_rows=rows, backend=backend)
            assert np.array_equal(y_hat, a.y_hat) and np.array_equal(states, a.states)

    def test_plain_elements_are_rounded_and_transparent(self):
        """The plain elements are USQ's rounding in the plain class; the others are the
        trellis over each chain with the plain ones taken out."""
        y, mu, sigma = latent((4, 8, 8), seed=3)
        q = Quantizer("tcq8", step=0.6, lam=0.05, plain_rows=20)
        out = q.quantize(y, mu, sigma)
        rows = scale_rows_reference(sigma)
        plain = rows < 20
        assert 0 < plain.sum() < plain.size
        usq = Quantizer("usq").quantize(y, mu, sigma)
        assert np.array_equal(out.indices[plain], usq.indices[plain])
        assert np.array_equal(out.y_hat[plain], usq.y_hat[plain])
        assert np.array_equal(out.rows[plain], 2 * NUM_SCALES + rows[plain])
        full = Quantizer("tcq8", step=0.6, lam=0.05)
        for c in range(4):
            sel = ~plain[c]
            alone = full.quantize(y[c][sel][None, None], mu[c][sel][None, None], sigma[c][sel][None, None])
            assert np.array_equal(out.indices[c][sel], alone.indices[0, 0])
            assert np.array_equal(out.states[c][sel], alone.states[0, 0])
        assert (
            Quantizer("tcq8", step=0.6, lam=0.05, plain_rows=0).quantize(y, mu, sigma).bits
            == full.quantize(y, mu, sigma).bits
        )

    def test_plain_table_classes(self):
        """``tcq-plain``: classes 0 and 1 are the TCQ rows, class 2 USQ's rows at step 1."""
        tcq, usq, both = rate_table("tcq", 0.63), rate_table("usq", 1.0), rate_table("tcq-plain", 0.63)
        for r in range(3 * NUM_SCALES):
            ref, rr = (tcq, r) if r < 2 * NUM_SCALES else (usq, r - 2 * NUM_SCALES)
            n = ref.cdf_length[rr]
            assert both.cdf_length[r] == n and both.offset[r] == ref.offset[rr]
            assert np.array_equal(both.cdf[r, :n], ref.cdf[rr, :n])
        lo, hi = cell_bounds("tcq-plain", 2, np.arange(3), 0.63)
        assert np.allclose(lo, [-0.5, 0.5, 1.5]) and np.allclose(hi, [0.5, 1.5, 2.5])

    def test_guards(self):
        y, mu, sigma = latent((2, 4, 4))
        with pytest.raises(ValueError, match="tcq4 and tcq8"):
            Quantizer("usq", plain_rows=3)
        for bad in (-1, 32, 2.5):
            with pytest.raises(ValueError, match="plain_rows must be"):
                Quantizer("tcq8", plain_rows=bad)
        q = Quantizer("tcq8", step=0.6, lam=0.05, plain_rows=10)
        out = q.quantize(y, mu, sigma)
        with pytest.raises(ValueError, match="scale rows"):
            q.dequantize(out.indices, mu)

    def test_plain_elements_are_those_quantize_codes_plain(self):
        """``plain_elements``: the mask of the elements :meth:`quantize` rounds outside the
        trellis, and the table rows it codes them in."""
        y, mu, sigma = latent((3, 6, 7), seed=5)
        q = Quantizer("tcq8", step=0.6, lam=0.05, plain_rows=20)
        plain, rows = q.plain_elements(sigma)
        assert np.array_equal(plain, scale_rows_reference(sigma) < 20) and plain.any() and not plain.all()
        assert np.array_equal(rows, q.quantize(y, mu, sigma).rows[plain])

    @pytest.mark.parametrize("backend", ["numba", "numpy"])
    def test_soft_trellis_leaves_the_plain_elements_rounded(self, backend):
        """Relaxed with plain rows: the plain elements are rounded with their table bits and
        no gradient; the rest is the soft trellis of each chain without them (its cold limit
        the Viterbi path of :meth:`quantize`)."""
        y, mu, sigma = latent((3, 6, 7), seed=5)
        rng = np.random.default_rng(5)
        g, rho = rng.normal(size=y.shape), rng.uniform(0.1, 1, y.shape)
        q = Quantizer("tcq8", step=0.6, lam=0.05, plain_rows=20)
        plain = scale_rows_reference(sigma) < 20
        soft = q.soft_quantize(y, mu, sigma, tau=0.2, g=g, rho=rho, backend=backend)
        hard = q.quantize(y, mu, sigma)
        np.testing.assert_allclose(soft.y_hat[plain], hard.y_hat[plain], rtol=1e-6)  # float64 vs float32 sums
        assert np.all(soft.grad[plain] == 0) and np.any(soft.grad[~plain] != 0)
        full = Quantizer("tcq8", step=0.6, lam=0.05)
        c = 1
        sel = ~plain[c]
        alone = full.soft_quantize(
            y[c][sel][None, None], mu[c][sel][None, None], sigma[c][sel][None, None], tau=0.2,
            g=g[c][sel][None, None], rho=rho[c][sel][None, None], backend=backend,
        )  # fmt: skip
        np.testing.assert_allclose(soft.y_hat[c][sel], alone.y_hat[0, 0])
        np.testing.assert_allclose(soft.grad[c][sel], alone.grad[0, 0])
        cold = q.soft_quantize(y, mu, sigma, tau=1e-6, backend=backend)
        np.testing.assert_allclose(cold.y_hat, hard.y_hat, atol=1e-4)
        assert cold.bits.sum() == pytest.approx(hard.bits, rel=1e-6)


class TestSoftTrellis:
    """``Quantizer.soft_quantize``: the Gibbs expectations over the trellis paths and their
    exact gradient (the refinement through the trellis rests on both)."""

    @staticmethod
    def case(seed, shape=(3, 1, 9), method="tcq8"):
        rng = np.random.default_rng(seed)
        q = Quantizer(method, step=rng.uniform(0.5, 0.9), lam=rng.uniform(0.01, 0.2))
        sigma = np.exp(rng.uniform(np.log(0.1), np.log(5), shape)).astype(np.float32)
        mu = rng.normal(0, 0.5, shape).astype(np.float32)
        y = (mu + 1.5 * sigma * rng.normal(size=shape)).astype(np.float32)
        return q, y, mu, sigma, rng

    @pytest.mark.parametrize("method", ["tcq4", "tcq8"])
    @pytest.mark.parametrize("weighting", ["none", "channel", "element"])
    def test_kernel_equals_reference(self, method, weighting):
        q, y, mu, sigma, rng = self.case(1, method=method)
        w = {"none": None, "channel": rng.uniform(0.5, 2, (3, 1, 1)), "element": rng.uniform(0.5, 2, y.shape)}
        kw = dict(tau=0.07, weights=w[weighting], g=rng.normal(size=y.shape), rho=rng.uniform(0.5, 1.5, y.shape))
        a = q.soft_quantize(y, mu, sigma, **kw)
        b = q.soft_quantize(y, mu, sigma, backend="numpy", **kw)
        for u, v in zip(a, b):
            np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-11)

    @pytest.mark.parametrize("seed", range(3))
    def test_cold_limit_is_the_viterbi_path(self, seed):
        q, y, mu, sigma, _ = self.case(seed, shape=(4, 8, 8))
        soft = q.soft_quantize(y, mu, sigma, tau=1e-6)
        hard = q.quantize(y, mu, sigma)
        np.testing.assert_allclose(soft.y_hat, hard.y_hat, atol=1e-5)
        assert soft.bits.sum() == pytest.approx(hard.bits, abs=1e-6)

    @pytest.mark.parametrize("S", [4, 8])
    def test_expectations_by_enumeration(self, S):
        from trellis._costs import SOFT_WINDOW, soft_index

        q, y, mu, sigma, _ = self.case(S, shape=(1, 1, 5), method=f"tcq{S}")
        tau = 0.3
        sm, tab = q.machine, q.table
        r = (y - mu).ravel().astype(np.float64)
        rows = scale_rows_reference(sigma).ravel()
        u = np.rint(r / q.step).astype(int)
        z, et, er = 0.0, np.zeros(5), np.zeros(5)

        def paths(i, s, cost, ts, bs):
            nonlocal z, et, er
            if i == len(r):
                p = np.exp(-cost / tau)
                z, et, er = z + p, et + p * np.array(ts), er + p * np.array(bs)
                return
            qq = int(sm.quantizer[s])
            for n in range(u[i] - SOFT_WINDOW, u[i] + SOFT_WINDOW + 1):
                member, k = soft_index(n, qq)
                if member:
                    b = float(tab.index_bits(qq * NUM_SCALES + rows[i], k))
                    t = n * q.step
                    nxt = sm.next_state[s, k & 1]
                    paths(i + 1, nxt, cost + (r[i] - t) ** 2 + q.lam * b, ts + [t], bs + [b])

        paths(0, 0, 0.0, [], [])
        out = q.soft_quantize(y, mu, sigma, tau=tau)
        np.testing.assert_allclose(out.y_hat.ravel(), mu.ravel() + et / z, atol=1e-10)
        np.testing.assert_allclose(out.bits.ravel(), er / z, atol=1e-10)

    def test_gradient_by_finite_differences(self):
        q, y, mu, sigma, rng = self.case(7)
        y = y.astype(np.float64)
        w = rng.uniform(0.5, 2, (3, 1, 1))
        g, rho = rng.normal(size=y.shape), rng.uniform(0.5, 1.5, y.shape)

        def f(yy):
            s = q.soft_quantize(yy, mu.astype(np.float64), sigma, tau=0.05, weights=w)
            return float((g * s.y_hat + rho * s.bits).sum())

        grad = q.soft_quantize(y, mu.astype(np.float64), sigma, tau=0.05, weights=w, g=g, rho=rho).grad
        num = np.zeros_like(y)
        for i in np.ndindex(y.shape):
            e = np.zeros_like(y)
            e[i] = 1e-5
            num[i] = (f(y + e) - f(y - e)) / 2e-5
        np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-6 * np.abs(num).max())

    def test_guards(self):
        q, y, mu, sigma, _ = self.case(0)
        with pytest.raises(ValueError, match="relaxes the trellis"):
            Quantizer("usq").soft_quantize(y, mu, sigma, tau=0.1)
        for tau in (0.0, -1.0, np.nan):
            with pytest.raises(ValueError, match="tau"):
                q.soft_quantize(y, mu, sigma, tau=tau)
        with pytest.raises(ValueError, match="g has shape"):
            q.soft_quantize(y, mu, sigma, tau=0.1, g=np.zeros(3))


class TestBadInput:
    def setup_method(self):
        self.y, self.mu, self.sigma = latent((2, 3, 4))

    @pytest.mark.parametrize("arg", ["y", "mu", "sigma"])
    @pytest.mark.parametrize("bad", [np.nan, np.inf])
    def test_non_finite(self, arg, bad):
        kw = {"y": self.y.copy(), "mu": self.mu.copy(), "sigma": self.sigma.copy()}
        kw[arg][0, 0, 0] = bad
        with pytest.raises(ValueError, match=arg):
            Quantizer("tcq8").quantize(**kw)

    def test_sigma_not_positive(self):
        self.sigma[1, 1, 1] = 0
        with pytest.raises(ValueError, match="sigma"):
            Quantizer("usq").quantize(self.y, self.mu, self.sigma)

    def test_shapes(self):
        with pytest.raises(ValueError, match="mu"):
            Quantizer("usq").quantize(self.y, self.mu[:1], self.sigma)
        with pytest.raises(ValueError, match="sigma"):
            Quantizer("usq").quantize(self.y, self.mu, self.sigma[..., :2])
        with pytest.raises(ValueError, match="y"):
            Quantizer("usq").quantize(self.y[0], self.mu[0], self.sigma[0])
        with pytest.raises(ValueError, match="scale_rows"):
            Quantizer("usq").quantize(self.y, self.mu, scale_rows=np.full(self.y.shape, 64))
        with pytest.raises(ValueError, match="sigma and scale_rows"):
            Quantizer("usq").quantize(self.y, self.mu)

    @pytest.mark.parametrize(
        "kw,arg",
        [
            ({"lam": -1.0}, "lam"),
            ({"lam": np.nan}, "lam"),
            ({"step": 0.0}, "step"),
            ({"step": -1.0}, "step"),
            ({"method": "tcq6"}, "method"),
            ({"reset": "row"}, "reset"),
            ({"theta": 0.7}, "theta"),
        ],
    )
    def test_parameters(self, kw, arg):
        with pytest.raises(ValueError, match=arg):
            Quantizer(**kw)

    def test_absurd_residual(self):
        self.y[0, 0, 0] = 1e12
        with pytest.raises(ValueError, match="y - mu"):
            Quantizer("tcq8").quantize(self.y, self.mu, self.sigma)


def test_generated_passes_are_current():
    assert codegen.TARGET.read_text() == codegen.generate(), "run python -m trellis.codegen"


def test_trellis_does_not_import_torch():
    code = "import sys, trellis, trellis.kernels, trellis.reference, trellis.codegen; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
