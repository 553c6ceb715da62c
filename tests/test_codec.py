"""The codec: exact decoding for every quantizer, the container, damaged streams, images."""

import dataclasses
import math
import struct
import subprocess
import sys
import textwrap
import warnings

from fractions import Fraction

import numpy as np
import pytest
import torch

from compressai.models import MeanScaleHyperprior, ScaleHyperprior
from PIL import Image

from trellis import Quantizer

from qft.codec import Codec, Container, crop, pad, read_image, write_image
from qft.codec.container import Header, with_checksum
from qft.errors import UserError
from qft.models import ARCHITECTURES, create_model

QUANTIZERS = [
    Quantizer("usq"),
    Quantizer("rdoq", lam=0.1),
    Quantizer("tcq4", step=0.6, lam=0.05),
    Quantizer("tcq8", step=0.5, lam=0.03, reset="tensor"),
]


def tiny(cls=MeanScaleHyperprior, seed=0, gain=30.0, **kw):
    """A random-initialised model whose latents are large enough to need many symbols."""
    torch.manual_seed(seed)
    m = cls(**(kw or {"N": 16, "M": 24})).eval()
    with torch.no_grad():
        m.g_a[-1].weight.mul_(gain)
    m.update(force=True)
    return m


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.rand(1, 3, 70, 100)


@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.method)
@pytest.mark.parametrize(
    "cls,entropy", [(MeanScaleHyperprior, "mean-scale-hyperprior"), (ScaleHyperprior, "scale-hyperprior")]
)
def test_round_trip_is_exact(q, cls, entropy, image):
    codec = Codec(tiny(cls), "test-arch", entropy)
    out = codec.compress(image, q)
    dec = codec.decompress(out["bitstream"])
    assert np.array_equal(dec["y_hat"], out["y_hat"])
    assert dec["x_hat"].shape == image.shape
    assert out["y_bytes"] * 8 >= out["y_table_bits"] > 100
    # a second decoder (fresh model object, same weights) decodes the same
    dec2 = Codec(tiny(cls), "test-arch", entropy).decompress(out["bitstream"])
    assert torch.equal(dec2["x_hat"], dec["x_hat"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("q", QUANTIZERS, ids=lambda q: q.method)
def test_stream_encoded_on_cuda_decodes_on_cpu(q, image):
    """The entropy parameters do not depend on the device the transforms ran on."""
    out = Codec(tiny(), "test-arch", "mean-scale-hyperprior", device="cuda").compress(image, q)
    dec = Codec(tiny(), "test-arch", "mean-scale-hyperprior").decompress(out["bitstream"])
    assert np.array_equal(dec["y_hat"], out["y_hat"])


def test_usq_indices_are_compressai_rounding(image):
    m = tiny()
    codec = Codec(m, "a", "mean-scale-hyperprior")
    x, _ = pad(image)
    (q,) = codec.latent_coder.quantize(x, Quantizer("usq"))
    with torch.no_grad():
        y = m.g_a(x)
        z_hat = m.entropy_bottleneck.decompress(m.entropy_bottleneck.compress(m.h_a(y)), q.z_shape)
        _, mu = m.h_s(z_hat).chunk(2, 1)
        ref = torch.round(y - mu).int().numpy()[0]
    # μ is computed in float64 for determinism; it may straddle a rounding boundary of
    # CompressAI's float32 μ only in rare elements
    assert np.mean(q.result.indices == ref) > 0.999


def test_wrong_checkpoint(image):
    out = Codec(tiny(seed=0), "a", "mean-scale-hyperprior").compress(image, Quantizer("tcq8", step=0.5, lam=0.05))
    with pytest.raises(UserError, match="checkpoint"):
        Codec(tiny(seed=1), "a", "mean-scale-hyperprior").decompress(out["bitstream"])


def test_header_overhead_is_small(image):
    out = Codec(tiny(), "a", "mean-scale-hyperprior").compress(image, Quantizer("tcq8", step=0.5, lam=0.05))
    assert len(out["bitstream"]) - out["y_bytes"] - out["z_bytes"] <= 40


@pytest.mark.parametrize("arch,params", [("mbt2018", {"N": 8, "M": 8}), ("cheng2020-anchor", {"N": 8})])
def test_spatial_context_models_code_usq_only(arch, params):
    """Spatial autoregressive contexts (mbt2018, cheng2020) keep their own USQ coder; the
    checkerboard models are step-coded (tests/test_checkerboard_coding.py)."""
    x = torch.rand(1, 3, 40, 70)
    codec = Codec(create_model(arch, seed=0, **params), arch, ARCHITECTURES[arch].entropy)
    with pytest.raises(UserError, match="use -q usq"):
        codec.compress(x, Quantizer("tcq8"))
    out = codec.compress(x, Quantizer("usq"))
    assert codec.decompress(out["bitstream"])["x_hat"].shape == x.shape


class TestContainer:
    HEADER = Header(b"\x01\x02\x03\x04", "tcq8", "tensor", 0.5612, 123456, 512, 768)

    def test_round_trip(self):
        c = Container(self.HEADER, [b"xyz", b"", bytes(range(256)) * 3])
        assert Container.from_bytes(c.to_bytes()) == c

    @pytest.mark.parametrize(
        "mutate,match",
        [
            (lambda d: b"PN" + d[2:], "not a qft bitstream"),
            (lambda d: d[:2] + bytes([9]) + d[3:], "format 9"),
            (lambda d: d[:-7], "checksum"),
            (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "checksum"),
            (lambda d: d[:3], "truncated"),
        ],
    )
    def test_damage(self, mutate, match):
        data = Container(self.HEADER, [b"abc" * 10]).to_bytes()
        with pytest.raises(UserError, match=match):
            Container.from_bytes(mutate(data))


def test_fuzzed_streams_fail_cleanly_and_quickly(tmp_path, image):
    """Every corrupted or truncated stream ends in one UserError: no hang, no crash."""
    codec = Codec(tiny(), "a", "mean-scale-hyperprior")
    stream = tmp_path / "s.qft"
    stream.write_bytes(codec.compress(image, Quantizer("tcq8", step=0.5, lam=0.05))["bitstream"])
    script = textwrap.dedent(
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        from test_codec import tiny
        from qft.codec import Codec
        from qft.errors import UserError
        codec = Codec(tiny(), "a", "mean-scale-hyperprior")
        data = open({str(stream)!r}, "rb").read()
        rng = np.random.default_rng(0)
        for trial in range(200):
            bad = bytearray(data)
            if trial % 2:
                bad = bad[: int(rng.integers(0, len(bad)))]
            else:
                for _ in range(int(rng.integers(1, 5))):
                    bad[int(rng.integers(0, len(bad)))] ^= int(rng.integers(1, 256))
            try:
                codec.decompress(bytes(bad))
                sys.exit("damaged stream decoded silently")
            except UserError as exc:
                assert "\\n" not in str(exc)
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


class TestImages:
    def test_pad_crop(self):
        x = torch.rand(1, 3, 70, 129)
        xp, padding = pad(x)
        assert xp.shape[-2:] == (128, 192)
        assert torch.equal(crop(xp, padding), x)

    def test_rgb_round_trip(self, tmp_path):
        a = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(a).save(tmp_path / "a.png")
        x = read_image(tmp_path / "a.png")
        assert x.shape == (1, 3, 20, 30)
        write_image(x, tmp_path / "b.png")
        assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), a)

    @pytest.mark.parametrize(
        "mode,array,match",
        [
            ("L", np.full((8, 8), 100, np.uint8), "grayscale"),
            ("RGBA", np.full((8, 8, 4), 100, np.uint8), "alpha"),
            ("I;16", np.full((8, 8), 25700, np.uint16), "I;16"),
        ],
    )
    def test_conversions_warn(self, tmp_path, mode, array, match):
        Image.fromarray(array).save(tmp_path / "x.png")
        assert Image.open(tmp_path / "x.png").mode == mode
        with pytest.warns(UserWarning, match=match):
            x = read_image(tmp_path / "x.png")
        assert x.shape == (1, 3, 8, 8) and torch.allclose(x, torch.full_like(x, 100 / 255))

    def test_not_an_image(self, tmp_path):
        (tmp_path / "t.png").write_text("hello")
        with pytest.raises(UserError, match="not a readable image"):
            read_image(tmp_path / "t.png")
        with pytest.raises(UserError, match="no such file"):
            read_image(tmp_path / "missing.png")

    def test_rgb_is_silent(self, tmp_path):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c.png")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read_image(tmp_path / "c.png")


def test_decoder_target_changes_the_stream_not_the_decoder(image):
    codec = Codec(tiny(), "a", "mean-scale-hyperprior")
    q = Quantizer("tcq8", step=0.5, lam=0.03)
    plain, shifted = codec.compress(image, q), codec.compress(image, q, target=0.25)
    assert not np.array_equal(plain["y_hat"], shifted["y_hat"])
    dec = Codec(tiny(), "a", "mean-scale-hyperprior").decompress(shifted["bitstream"])  # nothing but the stream
    assert np.array_equal(dec["y_hat"], shifted["y_hat"])
    (lat,) = codec.latent_coder.quantize(pad(image)[0], Quantizer("usq"))
    with pytest.raises(ValueError, match="without the decoder target"):
        codec.latent_coder.requantize(lat, q, target=0.25)
    with pytest.raises(ValueError, match="target"):
        codec.compress(image, q, target=-1.0)


def test_rd_target_codes_the_cheapest_candidate(image):
    """``RDTarget``: the η coded is the candidate of least λ·255²·MSE + bits/pixel (each
    candidate's cost recomputed here), the stream decodes exactly, and one candidate is
    that fixed η."""
    from qft.codec import RDTarget

    codec = Codec(tiny(), "a", "mean-scale-hyperprior")
    q = Quantizer("tcq8", step=0.5, lam=0.03)
    rd = RDTarget(0.01, etas=(0.0, 1.0, 4.0, 16.0))  # 4 wins here: neither the first nor the last
    out = codec.compress(image, q, target=rd)
    dec = Codec(tiny(), "a", "mean-scale-hyperprior").decompress(out["bitstream"])
    assert np.array_equal(dec["y_hat"], out["y_hat"])
    xp, padding = pad(image)
    coder = codec.latent_coder
    (lat,) = coder.latents(xp, True, padding)
    h, w = image.shape[-2:]
    costs = {}
    for eta in rd.etas:
        c = coder.requantize(lat, q, target=eta)
        x_hat = crop(codec.model.g_s(torch.from_numpy(c.y_hat)[None]).clamp(0, 1), padding)
        costs[eta] = 0.01 * 255**2 * torch.mean((x_hat.double() - image.double()) ** 2).item() + c.result.bits / (h * w)
    assert out["target"] == min(costs, key=costs.get) == 4.0 and len(set(costs.values())) == len(costs)
    assert np.array_equal(out["y_hat"], coder.requantize(lat, q, target=out["target"]).y_hat)
    only = codec.compress(image, q, target=RDTarget(0.01, etas=(0.25,)))
    assert only["bitstream"] == codec.compress(image, q, target=0.25)["bitstream"] and only["target"] == 0.25
    (plain,) = coder.latents(xp, False, padding)
    with pytest.raises(ValueError, match="without the decoder target"):
        coder.requantize(plain, q, target=rd)
    for bad in ({"lmbda": 0.0}, {"lmbda": math.nan}, {"lmbda": 0.01, "etas": ()}, {"lmbda": 0.01, "etas": (-1.0,)}):
        with pytest.raises(ValueError):
            RDTarget(**bad)


def test_target_direction_descends_the_image_error():
    """``s = D⁻¹Jᵀ(x − g_s(y))`` with ``D > 0`` diagonal: a small step along it lowers the
    image error of the unquantized latent; the padded border is outside the residual."""
    from qft.codec.latent import target_direction

    m = tiny(gain=1.0)
    torch.manual_seed(2)
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        y = m.g_a(x)
        s = torch.from_numpy(target_direction(m.g_s, x, y))

        def err(t):
            return torch.sum((x - m.g_s(y + t * s)) ** 2).item()

        t = 1e-3 / s.abs().max().item()
        assert err(t) < err(0.0)
    x2 = x.clone()
    x2[..., -16:] = 1 - x2[..., -16:]  # the right 16 columns: padding
    assert np.array_equal(target_direction(m.g_s, x, y, (0, 16, 0, 0)), target_direction(m.g_s, x2, y, (0, 16, 0, 0)))
    assert not np.array_equal(target_direction(m.g_s, x, y), target_direction(m.g_s, x2, y))


def test_codec_takes_the_entropy_model_from_the_registry():
    model = create_model("mbt2018-mean", seed=0, N=16, M=24)
    assert Codec(model, "mbt2018-mean").entropy == "mean-scale-hyperprior"
    assert Codec(model, "mbt2018-mean", "mean-scale-hyperprior").latent_coder is not None  # the old call
    with pytest.raises(ValueError, match="mean-scale-hyperprior entropy model"):
        Codec(model, "mbt2018-mean", "scale-hyperprior")
    with pytest.raises(UserError, match="unknown architecture"):
        Codec(model, "not-registered")


def test_codec_from_a_loaded_checkpoint(tmp_path):
    from qft.models import load_checkpoint, save_checkpoint

    model = create_model("bmshj2018-hyperprior", seed=0, N=16, M=24)
    save_checkpoint(tmp_path / "m.pth", model, "bmshj2018-hyperprior", {"N": 16, "M": 24})
    codec = Codec.from_checkpoint(load_checkpoint(tmp_path / "m.pth"))
    assert (codec.arch, codec.entropy) == ("bmshj2018-hyperprior", "scale-hyperprior")


# --------------------------------------------------------------------------- hostile headers


def forged(data: bytes, **fields) -> bytes:
    """The stream with header fields replaced and a recomputed (forged) checksum."""
    c = Container.from_bytes(data)
    return Container(dataclasses.replace(c.header, **fields), c.sections).to_bytes()


def forged_raw(data: bytes, offset: int, value: bytes) -> bytes:
    """Bytes at ``offset`` replaced (past the parser's own checks), checksum recomputed."""
    body = bytearray(data[:-4])
    body[offset : offset + len(value)] = value
    return with_checksum(body)


@pytest.fixture(scope="module")
def coded(image):
    codec = Codec(tiny(), "a", "mean-scale-hyperprior")
    return codec, codec.compress(image[..., :64, :64], Quantizer("tcq8", step=0.5, lam=0.05))["bitstream"]


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"height": 0}, "image size"),
        ({"width": 0}, "image size"),
        ({"height": 100000}, "image size"),
        ({"height": 2**32 - 1}, "image size"),
        ({"height": 32768, "width": 32768}, "image size"),
        ({"height": 63}, "image size differ"),  # within the same 64-pixel block
        ({"width": 1}, "image size differ"),
        ({"height": 128}, "image size differ"),
        ({"step": 1e-6}, "step"),
        ({"step": float("nan")}, "step"),
        ({"step": 0.75}, "tables"),
    ],
)
def test_forged_header_fields_are_refused(coded, fields, match):
    """Header fields with a valid (forged) checksum: one error line, before any large
    allocation — no MemoryError, torch traceback or crash, no image of the wrong size."""
    codec, data = coded
    with pytest.raises(UserError, match=match) as err:
        codec.decompress(forged(data, **fields))
    assert "\n" not in str(err.value)


def test_latent_of_another_size_is_refused_before_the_hyper_decoder(coded):
    """The tables check forged too: the z stream does not hold the latent of that size."""
    codec, data = coded
    c = Container.from_bytes(data)
    for h, w in ((128, 64), (64, 4096), (8192, 8192)):
        q = Quantizer(c.header.method, step=c.header.step, reset=c.header.reset)
        bad = forged(data, height=h, width=w, tables=codec._tables(q, h, w))
        with pytest.raises(UserError, match="z stream"):
            codec.decompress(bad)


def test_header_forged_with_every_check_is_refused_by_the_seal(coded):
    """Size and tables check forged consistently: the y stream is sealed with the header."""
    codec, data = coded
    c = Container.from_bytes(data)
    q = Quantizer(c.header.method, step=c.header.step, reset=c.header.reset)
    for h, w in ((63, 64), (64, 1), (50, 60)):
        with pytest.raises(UserError, match="another header"):
            codec.decompress(forged(data, height=h, width=w, tables=codec._tables(q, h, w)))


def test_plain_rows_travel_in_the_header(image):
    """A TCQ stream with plain rows decodes exactly; the header carries them (format 3),
    a format 2 stream (before plain rows) still decodes, and plain bits in one are refused."""
    codec = Codec(tiny(), "a", "mean-scale-hyperprior")
    x = image[..., :64, :64]
    q = Quantizer("tcq8", step=0.5, lam=0.05, plain_rows=12)
    out = codec.compress(x, q)
    assert Container.from_bytes(out["bitstream"]).header.plain_rows == 12
    assert np.array_equal(codec.decompress(out["bitstream"])["y_hat"], out["y_hat"])
    q0 = Quantizer("tcq8", step=0.5, lam=0.05)
    (lat,) = codec.latent_coder.quantize(pad(x)[0], q0)
    header = dataclasses.replace(codec._header(q0, 64, 64), version=2)
    old = Container(header, [lat.z_string, codec.latent_coder.encode(lat, q0, header.seal())]).to_bytes()
    assert old[2] == 2 and np.array_equal(codec.decompress(old)["y_hat"], lat.y_hat)
    with pytest.raises(UserError, match="malformed"):
        codec.decompress(forged_raw(old, 7, bytes([old[7] | 12 << 3])))


def test_old_format_is_named(coded):
    codec, data = coded
    with pytest.raises(UserError, match="format 1 .*encode the image again"):
        codec.decompress(forged_raw(data, 2, b"\x01"))


def test_z_stream_decodes_as_compressai(image):
    """decode_z (trellis.rans) equals EntropyBottleneck.decompress, escapes included."""
    from qft.codec import LatentCoder

    m = tiny()
    coder = LatentCoder(m, "mean-scale-hyperprior")
    z = m.h_a(m.g_a(pad(image)[0]))
    z[0, :3] *= 1000  # far outside the tables: bypass-coded
    strings = m.entropy_bottleneck.compress(z)
    assert torch.equal(coder.decode_z(strings[0], z.shape[-2:]), m.entropy_bottleneck.decompress(strings, z.shape[-2:]))


def test_context_model_layout_must_fit_the_size():
    codec = Codec(create_model("mbt2018", seed=0, N=8, M=8), "mbt2018", ARCHITECTURES["mbt2018"].entropy)
    data = codec.compress(torch.rand(1, 3, 40, 70), Quantizer("usq"))["bitstream"]
    for h, w in ((40, 200), (1000, 70)):
        bad = forged(data, height=h, width=w, tables=codec._tables(Quantizer("usq"), h, w))
        with pytest.raises(UserError, match="latent shape"):
            codec.decompress(bad)


@pytest.mark.parametrize("module", ["g_a", "h_a", "h_s", "g_s", "entropy_bottleneck"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(module, value):
    m = tiny()
    with torch.no_grad():
        next(getattr(m, module).parameters()).view(-1)[0] = value
    with pytest.raises(UserError, match=f"model's {module} weights hold NaN or infinite"):
        Codec(m, "a", "mean-scale-hyperprior")


def test_image_size_limit_on_the_encoder(coded):
    codec, _ = coded
    from qft.codec.container import MAX_SIDE

    with pytest.raises(UserError, match="split the image"):
        codec.compress(torch.zeros(1, 3, 1, MAX_SIDE + 1), Quantizer("usq"))
    with pytest.raises(UserError, match="step"):
        codec.compress(torch.zeros(1, 3, 8, 8), Quantizer("usq", step=0.001))


def test_header_field_fuzz(coded):
    """Seeded fuzz of every header field with forged checksums (the long run:
    benchmarks/stream_fuzz.py): each stream is refused in one line or decodes to exactly
    the original image."""
    codec, data = coded
    ref = codec.decompress(data)["x_hat"]
    rng = np.random.default_rng(26)
    c = Container.from_bytes(data)
    offsets = {
        "checkpoint": (3, 4),
        "quantizer": (7, 1),
        "step": (8, 8),
        "tables": (16, 4),
        "height": (20, 4),
        "width": (24, 4),
        "count": (28, 1),
    }
    outcomes = {"error": 0, "same": 0}
    for trial in range(60):
        field = list(offsets)[trial % len(offsets)]
        pos, n = offsets[field]
        kind = rng.integers(3)
        if kind == 0:  # random bytes
            value = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        elif kind == 1:  # one bit
            old = int.from_bytes(data[pos : pos + n], "little")
            value = (old ^ (1 << int(rng.integers(8 * n)))).to_bytes(n, "little")
        else:  # an extreme
            value = [b"\x00" * n, b"\xff" * n, (1).to_bytes(n, "little")][int(rng.integers(3))]
        if field in ("height", "width") and kind == 1 and rng.integers(2):  # also a consistent tables check
            h, w = (
                (int.from_bytes(value, "little"), c.header.width)
                if field == "height"
                else (c.header.height, int.from_bytes(value, "little"))
            )
            q = Quantizer(c.header.method, step=c.header.step, reset=c.header.reset)
            bad = forged_raw(forged_raw(data, pos, value), 16, struct.pack("<I", codec._tables(q, h, w)))
        else:
            bad = forged_raw(data, pos, value)
        try:
            out = codec.decompress(bad)["x_hat"]
        except UserError as exc:
            assert "\n" not in str(exc)
            outcomes["error"] += 1
        else:
            assert bad == data or torch.equal(out, ref), (field, value)
            outcomes["same"] += 1
    assert outcomes["error"] == 60


def test_payload_bit_flips_with_forged_checksum_are_refused(coded):
    """Every payload bit flip is refused, bypass-coded escape bits included (which rANS
    passes through its state unmixed: the y stream's seal covers its indices)."""
    codec, data = coded
    body = data[:-4]
    rng = np.random.default_rng(0)
    for bit in rng.choice(np.arange(8 * 30, 8 * len(body)), 150, replace=False):
        bad = bytearray(body)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(UserError):
            codec.decompress(forged_raw(bytes(bad) + data[-4:], 0, b""))


def test_tiled_transforms_equal_the_whole_ones(monkeypatch):
    """Tiles with a halo of the receptive radius give the whole transform up to float
    rounding; target_direction's tiles (probes drawn whole) give the whole-image result."""
    from qft.codec import latent
    from qft.codec.tiling import receptive_radius, tiled

    m = tiny()
    assert receptive_radius(m.g_a)[0] == 30 and receptive_radius(m.g_s)[0] == Fraction(15, 8)
    assert receptive_radius(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, dilation=2))) is None
    x = pad(torch.rand(1, 3, 130, 250, generator=torch.Generator().manual_seed(0)))[0]
    with torch.no_grad():
        y = m.g_a(x)
        assert torch.allclose(tiled(m.g_a, x, tile=4), y, atol=1e-5, rtol=0)
        assert torch.allclose(tiled(m.g_s, y, tile=4), m.g_s(y), atol=1e-5, rtol=0)
    monkeypatch.setattr(latent, "TARGET_TILE", 8)
    tiles = latent.target_direction(m.g_s, x, y, (1, 2, 3, 4))
    monkeypatch.setattr(latent, "TARGET_TILE", 1000)
    whole = latent.target_direction(m.g_s, x, y, (1, 2, 3, 4))
    np.testing.assert_allclose(tiles, whole, atol=1e-5 * np.abs(whole).max(), rtol=0)
