"""Step-wise coding of the checkerboard models (MLIC++, ELIC) with every quantizer: exact
round trips, the models' own USQ coding, the layout, coding order, damaged streams; MLIC++
with its transforms on a GPU (skipped without CUDA)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from test_mlicpp import TINY as TINY_MLICPP  # sibling test modules: one tiny size per family
from test_slice_coding import QUANTIZERS, check_damaged_streams, check_round_trip, check_target_round_trip, tiny_model

from trellis import Quantizer

from qft.codec import Codec, LatentCoder
from qft.codec.checkerboard import ElicSteps, MLICppSteps
from qft.models import create_model

TINY_ELIC = {"N": 16, "M": 32, "groups": [4, 4, 8, 16]}
TINY = {"mlicpp": TINY_MLICPP, "elic2022-official": TINY_ELIC, "elic2022-chandelier": TINY_ELIC}
ARCHS = list(TINY)
ENTROPY = "channel-checkerboard"


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, TINY[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(3)
    return torch.rand(1, 3, 70, 130)  # padded to 128 × 192: latents of 8 × 12, halves 8 × 6


def test_steps_of_each_model(models):
    """Two steps per group (anchors, non-anchors) over the group's channels; MLIC++'s
    anchors at (row + col) odd, ELIC's at CompressAI's default even parity."""
    mlic = LatentCoder(models["mlicpp"], ENTROPY).steps
    assert isinstance(mlic, MLICppSteps) and mlic.num_steps == 2 * TINY_MLICPP["slice_num"]
    assert (mlic.parity(0), mlic.parity(1)) == (1, 0)
    elic = LatentCoder(models["elic2022-official"], ENTROPY).steps
    assert isinstance(elic, ElicSteps) and (elic.parity(0), elic.parity(1)) == (0, 1)
    assert [elic.step_channels(i) for i in (0, 1, 6, 7)] == [slice(0, 4)] * 2 + [slice(16, 32)] * 2
    with pytest.raises(ValueError, match="not an ELIC model"):
        LatentCoder(create_model("mbt2018-mean", seed=0, N=8, M=8), ENTROPY)


@pytest.mark.parametrize("arch", ["elic2022-official", "elic2022-chandelier"])
def test_elic_layout_is_compressais(arch, models):
    """A step's layout is the group codec's own ``unembed`` of its half, and scattering
    the halves back is its ``embed``."""
    steps = LatentCoder(models[arch], ENTROPY).steps
    y = np.random.default_rng(0).normal(size=(32, 8, 12)).astype(np.float32)
    out = np.zeros_like(y)
    for k, group in enumerate(models[arch].latent_codec["y"].latent_codec.values()):
        ours = [steps.gather(2 * k + h, y) for h in (0, 1)]
        theirs = group.unembed(torch.from_numpy(y[steps.step_channels(2 * k)])[None])[:, 0].numpy()
        assert np.array_equal(np.stack(ours), theirs)
        for h in (0, 1):
            steps.scatter(2 * k + h, out, ours[h])
    assert np.array_equal(out, y)


#: every quantizer on MLIC++ and ELIC; Chandelier's ELIC (another channel context and
#: chunk order, both held by the USQ equality below) with USQ and TCQ-8
ROUND_TRIPS = [
    *((arch, q) for arch in ("mlicpp", "elic2022-official") for q in QUANTIZERS),
    *(("elic2022-chandelier", q) for q in (QUANTIZERS[0], QUANTIZERS[3])),
]


@pytest.mark.parametrize("arch,q", ROUND_TRIPS, ids=lambda v: v if isinstance(v, str) else f"{v.method}-{v.reset}")
def test_round_trip_is_exact(arch, q, models, image):
    check_round_trip(Codec(models[arch], arch), image, q)


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_target_round_trip(arch, models, image):
    # a 64 × 64 crop: the target's Jacobian probes of g_s dominate the time
    check_target_round_trip(Codec(models[arch], arch), image[..., :64, :64])


@pytest.mark.parametrize("arch", ARCHS)
def test_usq_equals_the_models_own_coding(arch, models, image):
    """In the model's float32 arithmetic, the step-wise USQ coder chooses the model's own
    ``compress``'s symbols: its ``decompress`` and ``g_s`` of qft's final latent give the
    same image bit for bit, and the stream is as long (qft's tables are its own,
    docs/design.md D6, so the bytes differ; ELIC's own stream is one rANS string per half)."""
    m = models[arch]
    x = image[..., :64, :128]  # multiples of 64: no padding rule involved
    coder = LatentCoder(m, ENTROPY, dtype=torch.float32)
    usq = Quantizer("usq")
    with torch.no_grad():
        enc = m.compress(x)
        (lat,) = coder.quantize(x, usq)
        official = m.decompress(enc["strings"], enc["shape"])["x_hat"]
        ours = m.g_s(torch.from_numpy(lat.y_hat)[None]).clamp_(0, 1)
    assert torch.equal(official, ours)
    theirs = sum(len(s[0]) for s in enc["strings"][:-1])  # every y string (the last: z)
    assert len(coder.encode(lat, usq)) <= 1.01 * theirs + 8
    # the codec's float64 entropy path: the same indices but where float32 and float64 μ
    # straddle a rounding boundary
    (lat64,) = LatentCoder(m, ENTROPY).quantize(x, usq)
    assert np.mean(lat64.result.indices != lat.result.indices) < 0.01


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("bump", [1, 2])
def test_steps_read_only_earlier_final_values(arch, bump, models, image):
    """Changing the quantized values of step ``bump`` (non-anchors of group 0, anchors of
    group 1) leaves the parameters of every step up to it alone and changes the next
    step's: what the decoder has not decoded yet never reaches a step's μ, σ."""
    coder = LatentCoder(models[arch], ENTROPY)
    steps = coder.steps
    (lat,) = coder.quantize(image[..., :64, :64], Quantizer("usq"))

    def parameters(bumped: int | None):
        ctx = dataclasses.replace(lat.context, finals=[], support=None)
        out = []
        for i in range(steps.num_steps):
            out.append(steps.parameters(ctx, i))
            y_hat = steps.gather(i, lat.result.y_hat).copy()
            if i == bumped:
                y_hat += 3.0
            steps.commit(ctx, i, y_hat)
        return out

    base, bumped = parameters(None), parameters(bump)
    for i, ((mu0, s0), (mu1, s1)) in enumerate(zip(base, bumped)):
        same = np.array_equal(mu0, mu1) and np.array_equal(s0, s1)
        if i <= bump:
            assert same, i
        elif i == bump + 1:
            assert not same, i


def test_steps_in_order_only(models, image):
    """A step's parameters need exactly the steps before it committed."""
    coder = LatentCoder(models["mlicpp"], ENTROPY)
    (lat,) = coder.latents(image[..., :64, :64])
    with pytest.raises(ValueError, match="step 1 asked after 0"):
        coder.steps.parameters(dataclasses.replace(lat.context, finals=[]), 1)


@pytest.mark.parametrize("arch", ARCHS)
def test_damaged_streams_are_refused(arch, models, image):
    codec = Codec(models[arch], arch)
    data = codec.compress(image[..., :64, :64], Quantizer("tcq8", step=0.6, lam=0.03))["bitstream"]
    check_damaged_streams(codec, data, trials=15, period=3)


def check_coding_on(device: str, model: torch.nn.Module, image: torch.Tensor) -> None:
    """``model`` coded with its transforms on ``device``: USQ and TCQ-8 streams decode
    exactly there and on the CPU, and USQ chooses the CPU encoder's indices but where the
    two devices' ``g_a`` straddle a rounding boundary (the entropy path runs on the CPU in
    float64 on both)."""
    here, cpu = Codec(copy.deepcopy(model), "mlicpp", device=device), Codec(copy.deepcopy(model), "mlicpp")
    for q in (Quantizer("usq"), Quantizer("tcq8", step=0.6, lam=0.03)):
        out = here.compress(image, q)
        for decoder in (here, cpu):
            np.testing.assert_array_equal(decoder.decompress(out["bitstream"])["y_hat"], out["y_hat"])
    usq = Quantizer("usq")
    (on_device,) = here.latent_coder.quantize(image.to(device)[..., :64, :128], usq)
    (on_cpu,) = cpu.latent_coder.quantize(image[..., :64, :128], usq)
    assert np.mean(on_device.result.indices != on_cpu.result.indices) < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mlicpp_codes_on_cuda(models, image):
    check_coding_on("cuda", models["mlicpp"], image)
