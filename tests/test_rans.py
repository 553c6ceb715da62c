"""The rANS coder: compatibility with CompressAI, exact round trips, damaged streams."""

import numpy as np
import pytest

from compressai.ans import RansDecoder, RansEncoder

from trellis import METHODS, PLAIN_CLASS, Quantizer, rans, rate_table, scale_rows
from trellis.rans import CorruptStreamError

STEPS = {"usq": 1.0, "rdoq": 0.8, "tcq4": 0.6, "tcq8": 0.45}


def random_symbols(tab, n, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, tab.cdf.shape[0], n)
    K = -tab.offset[rows]
    sym = np.round(rng.normal(0, 1, n) * K / 3).astype(np.int64)
    far = rng.random(n) < 0.02  # escapes, both sides (CompressAI loops forever from raw >= 2^28)
    sym[far] = rng.choice([-1, 1], far.sum()) * rng.integers(1, 2**26, far.sum())
    return sym, rows


@pytest.mark.parametrize("kind,step", [("usq", 1.0), ("tcq", 0.6)])
def test_bytes_identical_to_compressai(kind, step):
    tab = rate_table(kind, step)
    sym, rows = random_symbols(tab, 5000, 1)
    cdfs = [tab.cdf[r, : tab.cdf_length[r]].tolist() for r in range(len(tab.cdf))]
    args = (cdfs, tab.cdf_length.tolist(), tab.offset.tolist())
    ref = RansEncoder().encode_with_indexes(sym.tolist(), rows.tolist(), *args)
    ours = rans.encode(sym, rows, tab.cdf, tab.cdf_length, tab.offset)
    assert ours == ref
    assert RansDecoder().decode_with_indexes(ours, rows.tolist(), *args) == sym.tolist()
    # our decoder, with a one-state selector over all rows, reads CompressAI's stream
    got = rans.decode(
        ref,
        rows,
        len(rows),
        np.zeros((1, 2), np.int64),
        np.zeros(1, np.int64),
        len(tab.cdf),
        tab.cdf,
        tab.cdf_length,
        tab.offset,
    )
    assert np.array_equal(got, sym)


def test_real_bits_match_table_bits():
    """The coded size is the trellis' table rate plus a few bytes of rANS overhead."""
    rng = np.random.default_rng(2)
    sigma = np.exp(rng.uniform(np.log(0.11), np.log(30), (32, 24, 24))).astype(np.float32)
    y = (sigma * rng.standard_normal(sigma.shape)).astype(np.float32)
    for method in METHODS:
        q = Quantizer(method, step=STEPS[method], lam=0.05)
        out = q.quantize(y, sigma=sigma)
        data = rans.encode(out.indices, out.rows, q.table.cdf, q.table.cdf_length, q.table.offset)
        assert 0 <= len(data) * 8 - out.bits < 64 + 1e-3 * out.bits


def test_fuzz_round_trip_1000_latents():
    """≥ 1,000 random latents, σ 0.11…256 and beyond, outliers far outside the tables,
    TCQ with and without plain rows."""
    rng = np.random.default_rng(3)
    for i in range(1000):
        method = METHODS[i % 4]
        q = Quantizer(
            method,
            step=float(rng.choice([0.3, 0.55, 1.0, 1.5])),
            lam=float(rng.uniform(0, 0.3)),
            reset=("channel", "tensor")[i % 2],
            plain_rows=int(rng.integers(0, 32)) if method.startswith("tcq") and i % 3 else 0,
        )
        shape = tuple(rng.integers(1, 6, 3))
        sigma = np.exp(rng.uniform(np.log(0.05), np.log(400), shape)).astype(np.float32)
        mu = rng.normal(0, 5, shape).astype(np.float32)
        y = (mu + sigma * rng.standard_normal(shape)).astype(np.float32)
        far = rng.random(shape) < 0.05
        y[far] += (rng.choice([-1, 1], far.sum()) * 10.0 ** rng.uniform(2, 6, far.sum())).astype(np.float32)
        out = q.quantize(y, mu, sigma)
        tab = q.table
        data = rans.encode(out.indices, out.rows, tab.cdf, tab.cdf_length, tab.offset)
        nxt, cls = q.selector
        rows = scale_rows(sigma)
        idx = rans.decode(
            data,
            rows,
            q.chain_length(shape),
            nxt,
            cls,
            64,
            tab.cdf,
            tab.cdf_length,
            tab.offset,
            plain_rows=q.plain_rows,
            plain_class=PLAIN_CLASS,
        ).reshape(shape)
        assert np.array_equal(idx, out.indices), (i, method)
        y_hat, states = q.dequantize(idx, mu, scale_rows=rows)
        assert np.array_equal(y_hat, out.y_hat) and np.array_equal(states, out.states), (i, method)


def test_damaged_streams_raise_or_decode_never_crash():
    """Without the container's checksum the coder alone must still fail cleanly."""
    rng = np.random.default_rng(4)
    q = Quantizer("tcq8", step=0.5, lam=0.05)
    shape = (8, 16, 16)
    sigma = np.exp(rng.uniform(np.log(0.11), np.log(50), shape)).astype(np.float32)
    y = (sigma * rng.standard_normal(shape)).astype(np.float32)
    out = q.quantize(y, sigma=sigma)
    tab = q.table
    data = rans.encode(out.indices, out.rows, tab.cdf, tab.cdf_length, tab.offset)
    nxt, cls = q.selector
    rows = scale_rows(sigma)
    raised = 0
    for trial in range(300):
        bad = bytearray(data)
        if trial % 3 == 0:
            bad = bad[: int(rng.integers(0, len(bad)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
        try:
            rans.decode(bytes(bad), rows, q.chain_length(shape), nxt, cls, 64, tab.cdf, tab.cdf_length, tab.offset)
        except CorruptStreamError:
            raised += 1
    assert raised > 250  # the end-of-stream check catches nearly every corruption
