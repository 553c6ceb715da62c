"""Step-wise coding of the channel-slice models (TCM, DCAE, CCA) with every quantizer:
exact round trips, the official models' own USQ coding, coding order, damaged streams."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from test_codec import forged_raw  # sibling test modules: the container forgery, one tiny size per family
from test_dcae_cca import TINY as TINY_SLICE_MODELS
from test_tcm import TINY as TINY_TCM

from trellis import Quantizer, rans

from qft.codec import Codec, Container, LatentCoder
from qft.errors import UserError
from qft.models import create_model

TINY = {"tcm": TINY_TCM, **TINY_SLICE_MODELS}
ARCHS = list(TINY)
QUANTIZERS = [
    Quantizer("usq"),
    Quantizer("rdoq", lam=0.05),
    Quantizer("tcq4", step=0.6, lam=0.05),
    Quantizer("tcq8", step=0.6, lam=0.03),
    Quantizer("tcq8", step=0.5, lam=0.03, reset="tensor"),
]


def tiny_model(arch: str, params: dict, seed: int = 0, gain: float = 20.0) -> torch.nn.Module:
    """A tiny random model whose latents (``g_a``'s output × ``gain``, by a forward hook)
    are wide enough to need many symbols (shared with tests/test_checkerboard_coding.py)."""
    torch.set_num_threads(1)
    m = create_model(arch, seed=seed, **params)
    m.g_a.register_forward_hook(lambda module, inputs, out: out * gain)
    return m


def check_round_trip(codec: Codec, image: torch.Tensor, q: Quantizer) -> None:
    """The decoder's latent is the encoder's, the image has the input's size, the stream
    holds the table rate and the container adds at most 40 bytes."""
    out = codec.compress(image, q)
    dec = codec.decompress(out["bitstream"])
    assert np.array_equal(dec["y_hat"], out["y_hat"])
    assert dec["x_hat"].shape == image.shape
    assert out["y_bytes"] * 8 >= out["y_table_bits"] > 100
    assert len(out["bitstream"]) - out["y_bytes"] - out["z_bytes"] <= 40


def check_target_round_trip(codec: Codec, image: torch.Tensor) -> None:
    """TCQ-8 with the decoder target η 0.25: the stream records η, decodes to the encoder's
    ŷ exactly, and differs from the stream without the target."""
    q = Quantizer("tcq8", step=0.6, lam=0.03)
    out = codec.compress(image, q, target=0.25)
    assert out["target"] == 0.25
    assert np.array_equal(codec.decompress(out["bitstream"])["y_hat"], out["y_hat"])
    assert out["bitstream"] != codec.compress(image, q)["bitstream"]


def check_damaged_streams(codec: Codec, data: bytes, trials: int, period: int) -> None:
    """Per ``period`` trials: a truncation, a byte flip, then payload bit flips under a
    forged container checksum (so the rANS decoder meets them); each must end in a
    one-line UserError, never a wrong image."""
    payload_start = len(data) - 4 - sum(len(s) for s in Container.from_bytes(data).sections)
    rng = np.random.default_rng(0)
    for trial in range(trials):
        bad = bytearray(data)
        if trial % period == 0:
            bad = bad[: int(rng.integers(0, len(bad)))]
        elif trial % period == 1:
            bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
        else:
            bit = int(rng.integers(8 * payload_start, 8 * (len(data) - 4)))
            bad[bit // 8] ^= 1 << (bit % 8)
            bad = forged_raw(bytes(bad), 0, b"")
        with pytest.raises(UserError) as exc:
            codec.decompress(bytes(bad))
        assert "\n" not in str(exc.value)


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, TINY[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(3)
    return torch.rand(1, 3, 70, 130)  # padded to 128 × 192: slices of 8 × 12 latents


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: f"{q.method}-{q.reset}")
def test_round_trip_is_exact(arch, q, models, image):
    check_round_trip(Codec(models[arch], arch), image, q)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_target_round_trip(arch, models, image):
    check_target_round_trip(Codec(models[arch], arch), image)


@pytest.mark.parametrize("arch", ARCHS)
def test_usq_equals_the_models_own_coding(arch, models, image):
    """In the model's float32 arithmetic, the step-wise USQ coder chooses the official
    ``compress``'s symbols: the official ``decompress`` and ``g_s`` of qft's final latent
    give the same image bit for bit, and the stream is as long (qft's tables are its own,
    docs/design.md D6, so the bytes differ)."""
    m = models[arch]
    x = torch.nn.functional.pad(image, (0, 62, 0, 58))  # 128 × 192, no padding rule involved
    coder = LatentCoder(m, "channel-conditional", dtype=torch.float32)
    usq = Quantizer("usq")
    with torch.no_grad():
        enc = m.compress(x)
        (lat,) = coder.quantize(x, usq)
        official = m.decompress(enc["strings"], enc["shape"])["x_hat"]
        ours = m.g_s(torch.from_numpy(lat.y_hat)[None]).clamp_(0, 1)
    assert torch.equal(official, ours)
    stream, theirs = coder.encode(lat, usq), enc["strings"][0][0]
    assert len(stream) <= 1.01 * len(theirs) + 8
    # the codec's float64 entropy path: the same indices but where float32 and float64 μ
    # straddle a rounding boundary
    (lat64,) = LatentCoder(m, "channel-conditional").quantize(x, usq)
    assert np.mean(lat64.result.indices != lat.result.indices) < 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_steps_read_only_earlier_final_values(arch, models, image):
    """Changing the quantized values of slice ``i`` changes the parameters of the later
    slices only: what the decoder has not decoded yet never reaches a step's μ, σ."""
    coder = LatentCoder(models[arch], "channel-conditional")
    steps = coder.steps
    (lat,) = coder.quantize(image[..., :64, :64], Quantizer("usq"))

    def parameters(bump: int | None):
        ctx = dataclasses.replace(lat.context, finals=[], support=None)
        out = []
        for i in range(steps.num_steps):
            mu, sigma = steps.parameters(ctx, i)
            out.append((mu, sigma))
            y_hat = steps.gather(i, lat.result.y_hat).copy()
            if i == bump:
                y_hat += 3.0
            steps.commit(ctx, i, y_hat)
        return out

    base, bumped = parameters(None), parameters(2)
    for i, ((mu0, s0), (mu1, s1)) in enumerate(zip(base, bumped)):
        same = np.array_equal(mu0, mu1) and np.array_equal(s0, s1)
        assert same == (i <= 2), i


def test_one_stream_in_coding_order(models, image):
    """All slices share one rANS stream, decodable in segments (trellis.rans.StreamDecoder)."""
    codec = Codec(models["tcm"], "tcm")
    q = Quantizer("tcq8", step=0.6, lam=0.03)
    (lat,) = codec.latent_coder.quantize(torch.nn.functional.pad(image, (0, 62, 0, 58)), q)
    indices, rows = codec.latent_coder.symbols(lat)
    tab = q.table
    stream = rans.encode(indices, rows, tab.cdf, tab.cdf_length, tab.offset, 7)
    dec = rans.StreamDecoder(stream)
    sizes = [s.stop - s.start for s in codec.latent_coder.steps.slices]
    parts = []
    for i in range(len(sizes)):
        scale = rows.reshape(-1)[sum(sizes[:i]) * 96 : sum(sizes[: i + 1]) * 96] % 64
        parts.append(dec.decode(scale, 96, *q.selector, 64, tab.cdf, tab.cdf_length, tab.offset))
    dec.finish(7)
    assert np.array_equal(np.concatenate(parts), indices)
    with pytest.raises(rans.CorruptStreamError):
        rans.StreamDecoder(stream).finish(7)  # nothing decoded: the stream does not end there


@pytest.mark.parametrize("arch", ARCHS)
def test_damaged_streams_are_refused(arch, models, image):
    codec = Codec(models[arch], arch)
    data = codec.compress(image[..., :64, :64], Quantizer("tcq8", step=0.6, lam=0.03))["bitstream"]
    check_damaged_streams(codec, data, trials=40, period=4)


def test_other_checkpoint_is_refused(models, image):
    data = Codec(models["tcm"], "tcm").compress(image, Quantizer("tcq8", step=0.6, lam=0.03))["bitstream"]
    with pytest.raises(UserError, match="other checkpoint weights"):
        Codec(tiny_model("tcm", TINY["tcm"], seed=1), "tcm").decompress(data)
