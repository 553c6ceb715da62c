"""SGA latent refinement (qft.codec.refine): exact decoding, a lower RD loss, determinism,
and the settings' guards."""

import math

import numpy as np
import pytest
import torch

from test_codec import tiny  # sibling test module: the tiny hyperprior

from trellis import Quantizer, scale_rows

from qft.codec import Codec, SGARefine
from qft.codec.container import Container
from qft.codec.refine import refine_latents, refine_latents_at, refine_through_trellis
from qft.errors import UserError
from qft.models import save_checkpoint
from qft.settings import resolve_quantizer

LMBDA = 0.01


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(3)
    return torch.rand(1, 3, 64, 64)


@pytest.fixture(scope="module")
def codec():
    return Codec(tiny(gain=3.0), "test-arch", "mean-scale-hyperprior")  # latents that round many ways


def rd_cost(codec, image, out):
    """The model's RD cost of a stream, as decoded."""
    x_hat = codec.decompress(out["bitstream"])["x_hat"]
    mse = (x_hat - image).pow(2).mean().item()
    return LMBDA * 255**2 * mse + len(out["bitstream"]) * 8 / image[0, 0].numel()


@pytest.mark.parametrize("q", [Quantizer("usq"), Quantizer("tcq8", step=0.7, lam=0.02)], ids=lambda q: q.method)
def test_refined_stream_decodes_exactly(codec, image, q):
    out = codec.compress(image, q, refine=SGARefine(LMBDA, 5, lr=0.2))
    dec = codec.decompress(out["bitstream"])
    assert np.array_equal(dec["y_hat"], out["y_hat"])
    assert not np.array_equal(out["y_hat"], codec.compress(image, q)["y_hat"])  # the refinement changed ŷ


def test_refinement_lowers_the_rd_loss(codec, image):
    q = Quantizer("usq")
    plain = rd_cost(codec, image, codec.compress(image, q))
    refined = rd_cost(codec, image, codec.compress(image, q, refine=SGARefine(LMBDA, 40, lr=0.2)))
    assert refined < plain


def test_refinement_is_deterministic(codec, image):
    q = Quantizer("usq")
    a = codec.compress(image, q, refine=SGARefine(LMBDA, 5, seed=1))["bitstream"]
    b = codec.compress(image, q, refine=SGARefine(LMBDA, 5, seed=1))["bitstream"]
    assert a == b


def test_steps_split_between_sga_and_the_trellis():
    usq, tcq = Quantizer("usq"), Quantizer("tcq4", step=0.7, lam=0.02)
    assert SGARefine(LMBDA, 10).split(usq) == (10, 0)
    assert SGARefine(LMBDA, 10).split(tcq) == (5, 5)
    assert SGARefine(LMBDA, 10, trellis_share=0.0).split(tcq) == (10, 0)
    assert SGARefine(LMBDA, 10, trellis_share=1.0).split(tcq) == (0, 10)
    assert SGARefine(LMBDA, 10, trellis_share=0.0).record(tcq) == "sga-10"


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_refinement_through_the_trellis(codec, image, share):
    """Steps through the relaxed trellis (after SGA, or alone) give a stream that decodes
    exactly, deterministically, at a lower RD loss than the trellis on the plain latent."""
    q = Quantizer("tcq8", step=0.7, lam=0.02)
    refine = SGARefine(LMBDA, 40, lr=0.2, trellis_share=share)
    out = codec.compress(image, q, refine=refine)
    assert np.array_equal(codec.decompress(out["bitstream"])["y_hat"], out["y_hat"])
    assert out["bitstream"] == codec.compress(image, q, refine=refine)["bitstream"]
    assert rd_cost(codec, image, out) < rd_cost(codec, image, codec.compress(image, q))


def test_plain_elements_follow_sga_through_the_trellis(codec, image):
    """With plain rows the trellis steps go on refining the plain elements by SGA's
    rounding (here all of them: the tiny model's scales all lie in the first row) rather
    than leaving them where SGA stopped; the stream decodes exactly, deterministically."""
    q = Quantizer("tcq8", step=0.7, lam=0.02, plain_rows=12)
    refine = SGARefine(LMBDA, 10, lr=0.2)
    (lat,) = codec.latent_coder.latents(image)
    mu, sigma = codec.latent_coder.first_parameters(lat)
    assert (scale_rows(sigma) < q.plain_rows).all()
    y = refine_through_trellis(codec.model, image, lat.y, mu, sigma, q, None, refine, 10)
    assert np.abs(y - lat.y).max() > 0.1
    for bad in (0, 11):
        with pytest.raises(ValueError, match="steps must lie in"):
            refine_through_trellis(codec.model, image, lat.y, mu, sigma, q, None, refine, bad)
    out = codec.compress(image, q, refine=refine)
    assert np.array_equal(codec.decompress(out["bitstream"])["y_hat"], out["y_hat"])
    assert out["bitstream"] == codec.compress(image, q, refine=refine)["bitstream"]


def test_sga_stops_within_one_schedule(codec, image):
    """``stop`` runs the head of the whole schedule: all of it is the full refinement, a
    part of it is not a shorter refinement (whose temperatures fall faster)."""
    m, x = codec.model, image
    full = refine_latents(m, x, SGARefine(LMBDA, 6, lr=0.2))
    for a, b in zip(full, refine_latents(m, x, SGARefine(LMBDA, 6, lr=0.2), stop=6)):
        assert torch.equal(a, b)
    head = refine_latents(m, x, SGARefine(LMBDA, 6, lr=0.2), stop=3)
    short = refine_latents(m, x, SGARefine(LMBDA, 3, lr=0.2))
    assert not torch.equal(head[0], short[0]) and not torch.equal(head[0], full[0])
    for bad in (0, 7):
        with pytest.raises(ValueError, match="stop must lie in"):
            refine_latents(m, x, SGARefine(LMBDA, 6), stop=bad)
    # one run, several stops: each pair is that stop's refinement exactly
    at = refine_latents_at(m, x, SGARefine(LMBDA, 6, lr=0.2), (3, 6))
    for pair, alone in zip(at, (head, full)):
        assert all(torch.equal(a, b) for a, b in zip(pair, alone))
    for bad in ((), (6, 3), (3, 3), (3, 7)):
        with pytest.raises(ValueError, match="stop must lie in"):
            refine_latents_at(m, x, SGARefine(LMBDA, 6), bad)


def test_usq_fallback_keeps_the_cheaper_stream(codec, image, monkeypatch):
    """With ``usq_fallback`` the codec codes the stream of whichever of SGA + TCQ-8 and
    SGA + USQ costs less at the model's λ (:meth:`Codec.rd_cost`: as decoded), byte for
    byte the one that quantizer alone codes."""
    q = Quantizer("tcq8", step=0.7, lam=0.02)
    refine, fallback = SGARefine(LMBDA, 6, lr=0.2), SGARefine(LMBDA, 6, lr=0.2, usq_fallback=True)
    own, usq = codec.compress(image, q, refine=refine), codec.compress(image, Quantizer("usq"), refine=refine)
    costs = [rd_cost(codec, image, o) for o in (own, usq)]
    assert [codec.rd_cost(o, image, (0, 0, 0, 0), LMBDA) for o in (own, usq)] == pytest.approx(costs, rel=1e-6)
    out = codec.compress(image, q, refine=fallback)
    assert out["bitstream"] == (usq if costs[1] < costs[0] else own)["bitstream"]
    assert out["usq_fallback"] == (costs[1] < costs[0]) and "usq_fallback" not in own

    # this random decoder renders the trellis's latent better; where USQ's costs less, it is kept
    def usq_cheaper(o, *_):
        return float(Container.from_bytes(o["bitstream"]).header.method != "usq")

    monkeypatch.setattr(codec, "rd_cost", usq_cheaper)
    out = codec.compress(image, q, refine=fallback)
    assert out["usq_fallback"] and out["bitstream"] == usq["bitstream"]
    # and the other way round; a quantizer without the relaxed trellis (RDOQ) shares all of SGA
    monkeypatch.setattr(codec, "rd_cost", lambda o, *_: 1.0 - usq_cheaper(o))
    for quant in (q, Quantizer("rdoq", step=1.0, lam=0.02)):
        out = codec.compress(image, quant, refine=fallback)
        assert not out["usq_fallback"] and out["bitstream"] == codec.compress(image, quant, refine=refine)["bitstream"]
    assert fallback.record(q) == "sga-3+trellis-3 or usq" and fallback.record(Quantizer("usq")) == "sga-6"


def test_refine_settings_and_guards(codec, image):
    with pytest.raises(UserError, match="qft calibrate -m CKPT --lambda"):
        resolve_quantizer("usq", {}, refine="sga")
    with pytest.raises(UserError, match="--target"):
        resolve_quantizer("tcq8", {"model_lambda": LMBDA}, refine="sga", target=0.25)
    with pytest.raises(UserError, match="--refine-steps"):
        resolve_quantizer("usq", {"model_lambda": LMBDA}, refine="sga", refine_steps=0)
    c = resolve_quantizer("tcq8", {"model_lambda": LMBDA}, refine="sga", refine_steps=7)
    assert c.target == 0.0 and c.refine == SGARefine(LMBDA, 7)
    assert c.describe()["refine"] == "sga-3+trellis-4" and resolve_quantizer("usq", {}).describe()["refine"] == "none"
    u = resolve_quantizer("usq", {"model_lambda": LMBDA}, refine="sga", refine_steps=7)
    assert u.describe()["refine"] == "sga-7"
    f = resolve_quantizer("tcq8", {"model_lambda": LMBDA}, refine="sga", refine_steps=7, refine_fallback=True)
    assert f.refine == SGARefine(LMBDA, 7, usq_fallback=True)
    with pytest.raises(UserError, match="give --refine sga"):
        resolve_quantizer("tcq8", {"model_lambda": LMBDA}, refine_fallback=True)
    with pytest.raises(UserError, match="give -q rdoq, tcq4 or tcq8"):
        resolve_quantizer("usq", {"model_lambda": LMBDA}, refine="sga", refine_fallback=True)
    with pytest.raises(ValueError, match="exclude"):
        codec.compress(image, Quantizer("usq"), target=0.25, refine=SGARefine(LMBDA, 1))
    for bad in (
        {"lmbda": 0.0},
        {"lmbda": math.nan},
        {"lmbda": 0.01, "steps": 0},
        {"lmbda": 0.01, "trellis_share": 1.5},
        {"lmbda": 0.01, "trellis_taus": (0.3, 0.0)},
    ):
        with pytest.raises(ValueError):
            SGARefine(**bad)


def test_cli_refine(tmp_path, capsys):
    """``--refine sga`` asks for the model's λ, then codes a stream that decodes; eval records it."""
    import json

    from PIL import Image

    from qft.cli import main

    ck = str(tmp_path / "m.pth")
    save_checkpoint(ck, tiny(), "mbt2018-mean", {"N": 16, "M": 24})  # latents that round many ways
    (tmp_path / "imgs").mkdir()
    img = tmp_path / "imgs" / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 40, 3), dtype=np.uint8)).save(img)
    argv = ["compress", "-m", ck, "-q", "tcq8", "--refine", "sga", "--refine-steps", "3", str(img)]
    assert main([*argv, "-o", str(tmp_path / "a.qft")]) == 2
    assert "qft calibrate -m CKPT --lambda" in capsys.readouterr().err
    assert main(["calibrate", "-m", ck, "--lambda", "0.01"]) == 0
    assert main([*argv, "-o", str(tmp_path / "a.qft")]) == 0
    assert main(["decompress", str(tmp_path / "a.qft"), "-m", ck, "-o", str(tmp_path / "a.png")]) == 0
    assert main([*argv, "--refine-fallback", "--plain-rows", "3", "-o", str(tmp_path / "b.qft")]) == 0
    assert main(["decompress", str(tmp_path / "b.qft"), "-m", ck, "-o", str(tmp_path / "b.png")]) == 0
    # the Python API takes the same options and codes the same bytes
    from qft import Codec as ApiCodec

    api = ApiCodec.from_checkpoint(ck, quantizer="tcq8", refine="sga", refine_steps=3)
    assert api.refine.steps == 3 and api.compress(img)["bitstream"] == (tmp_path / "a.qft").read_bytes()
    api = ApiCodec.from_checkpoint(
        ck, quantizer="tcq8", refine="sga", refine_steps=3, refine_fallback=True, plain_rows=3
    )
    assert api.quantizer.plain_rows == 3 and api.refine.usq_fallback
    assert api.compress(img)["bitstream"] == (tmp_path / "b.qft").read_bytes()
    assert api.compress(img, api.quantizer)["bitstream"] != (tmp_path / "b.qft").read_bytes()  # given: no refine
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                "-m",
                ck,
                "--refine",
                "sga",
                "--refine-steps",
                "2",
                "--data",
                str(tmp_path / "imgs"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["qft"]["quantizer"]["refine"] == "sga-2"
