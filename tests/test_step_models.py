"""The measuring chain on step-coded channel-slice models (TCM, DCAE, CCA; issue 21): the
decoder-sensitivity weights through :class:`~qft.codec.LatentCoder` (the decoder's USQ
latent, LRP included; per-channel rates of every step), calibrate → compress →
decompress → eval with those weights and the decoder target and ``qft report`` on a tiny
CCA, and ``benchmarks/step_models.py``."""

import json

import numpy as np
import pytest
import torch

from PIL import Image
from scipy.stats import spearmanr
from test_benchmarks import load_benchmark  # sibling test modules: benchmark scripts as modules,
from test_sensitivity import smooth_images  # the smooth images, one tiny model per family
from test_slice_coding import ARCHS, TINY, tiny_model

from trellis import Quantizer

from qft.cli import main
from qft.codec import Codec, LatentCoder
from qft.sensitivity import center_crop, channel_rates, decoder_sensitivity, image_tensor, usq_latent


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_model(arch, TINY[arch]) for arch in ARCHS}


@pytest.fixture(scope="module")
def images():
    return smooth_images()


@pytest.mark.parametrize("arch", ARCHS)
def test_usq_latent_is_the_decoders(arch, models, images):
    """The sensitivity is measured at the latent the decoder renders: the final values of
    every slice (LRP included), bit-identical to the decoded USQ stream; torch's thread
    count survives the Numba kernel."""
    m = models[arch]
    coder = LatentCoder(m, "channel-conditional")
    x = center_crop(image_tensor(images[0]), 256)
    torch.set_num_threads(1)
    q = usq_latent(coder, x)
    assert torch.get_num_threads() == 1
    assert not np.array_equal(q.y_hat, q.result.y_hat)  # the LRP moved the final values
    codec = Codec(m, arch)
    enc = codec.encode_latent(q, Quantizer("usq"), 64, 64)
    assert np.array_equal(codec.decompress(enc["bitstream"])["y_hat"], q.y_hat)


IGNORED = 3  # the decoder of test_sensitivity_of_slice_models ignores this channel


@pytest.mark.parametrize("arch", ARCHS)
def test_sensitivity_of_slice_models(arch, images):
    """A decoder whose input gains differ by 2⁴ across channels (ratio 256 in ``s``) and
    that ignores one channel (a pre-hook on ``g_s``): both estimators see it, agree, and
    repeat bit for bit."""
    m = tiny_model(arch, TINY[arch])
    channels = sum(m.slice_sizes)
    gains = 2.0 ** (torch.arange(channels) / (channels / 4))
    gains[IGNORED] = 0
    m.g_s.register_forward_pre_hook(lambda module, args: (args[0] * gains.view(1, -1, 1, 1).to(args[0]),))
    vjp = decoder_sensitivity(m, images, method="vjp", probes=16, seed=1, progress=False)
    exact = decoder_sensitivity(m, images, method="exact", probes=2, progress=False)
    assert vjp.shape == exact.shape == (channels,)
    live = np.arange(channels) != IGNORED
    for s in (vjp, exact):
        assert np.isfinite(s).all() and (s[live] > 0).all()
        assert s[IGNORED] < 1e-6 * s[live].min()
    # the same quantity by two estimators (the linearisation holds at Δ = 1)
    assert spearmanr(vjp[live], exact[live])[0] > 0.9
    assert abs(np.median(vjp[live] / exact[live]) - 1) < 0.25
    again = decoder_sensitivity(m, images, method="vjp", probes=16, seed=1, progress=False)
    assert np.array_equal(vjp, again)


@pytest.mark.parametrize("arch", ARCHS)
def test_channel_rates_count_every_step(arch, models, images):
    """Per-channel rates of all slices, summing to the codec's USQ table bits."""
    m = models[arch]
    rates, bpp = channel_rates(m, images[:1], crop=None)
    assert rates.shape == (sum(m.slice_sizes),)
    bounds = np.cumsum([0, *m.slice_sizes])
    assert all(rates[a:b].sum() > 0 for a, b in zip(bounds[:-1], bounds[1:]))  # every step coded
    enc = Codec(m, arch).compress(image_tensor(images[0]), Quantizer("usq"))
    assert bpp * 64 * 64 == pytest.approx(enc["y_table_bits"], rel=1e-9)
    assert rates.sum() * 4 * 4 == pytest.approx(enc["y_table_bits"], rel=1e-9)  # 4 × 4 latents


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("step-models")
    params = [f"--set={k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY["cca"].items()]
    assert main(["init", "--arch", "cca", *params, "-o", str(d / "cca.pth")]) == 0
    rng = np.random.default_rng(1)
    (d / "val").mkdir()
    (d / "test").mkdir()
    for folder, (h, w) in (("val", (64, 64)), ("test", (40, 70))):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(d / folder / "a.png")
    return d


def test_calibrate_compress_eval_with_weights_and_target(workdir, capsys):
    """``qft calibrate --weights --targets rd`` stores per-channel weights of all M
    channels; ``compress --weights decoder --target rd`` uses them and round-trips;
    ``eval`` takes the calibrated defaults."""
    d = workdir
    ckpt = str(d / "cca.pth")
    grid = ["--methods", "tcq8", "--steps", "0.7", "--mults", "0.05", "--threads", "1"]
    argv = ["calibrate", "-m", ckpt, "--data", str(d / "val"), "--weights", "--targets", "rd", "--lambda", "0.013"]
    assert main([*argv, *grid]) == 0
    settings = json.loads((d / "cca.qft.json").read_text())
    weights = settings["weights"]
    assert len(weights["decoder"]) == len(weights["rates"]) == TINY["cca"]["M"]
    assert settings["model_lambda"] == 0.013
    stream, png = d / "a.qft", d / "a.png"
    image = str(d / "test" / "a.png")
    argv = ["compress", "-m", ckpt, "-q", "tcq8", "--weights", "decoder", "--target", "rd", image, "-o", str(stream)]
    assert main(argv) == 0
    assert "target η" in capsys.readouterr().out
    assert main(["decompress", str(stream), "-m", ckpt, "-o", str(png)]) == 0
    assert Image.open(png).size == (70, 40)
    out = d / "eval.json"
    assert main(["eval", "-m", ckpt, "-q", "tcq8", "--data", str(d / "test"), "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["results"]["bpp"][0] > 0


@pytest.fixture(scope="module")
def cca_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    params = [f"--set={k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY["cca"].items()]
    assert main(["init", "--arch", "cca", *params, "-o", str(d / "cca.pth")]) == 0
    (d / "img").mkdir()
    small = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((64, 48), Image.BICUBIC).save(d / "img" / "a.png")
    return d


def test_report_on_a_slice_model(cca_dir, tmp_path):
    """``qft report`` on a CCA: its USQ swept over Δ, TCQ-8 with a decoder target, the local
    measure against that sweep."""
    d = cca_dir
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
data: {d / "img"}
out: {tmp_path / "out"}
models:
  - {{label: cca, checkpoints: [{d / "cca.pth"}]}}
quantizers: [usq, {{label: tcq8-t, method: tcq8, target: 0.125}}]
sweep: [0.9, 1.2]
ms_ssim: false
""")
    assert main(["report", str(recipe), "--no-progress"]) == 0
    for label in ("usq", "tcq8-t"):
        res = json.loads((tmp_path / "out" / "results" / f"cca-{label}.json").read_text())
        assert res["results"]["bpp"][0] > 0
    summary = json.loads((tmp_path / "out" / "bdrate.json").read_text())
    (row,) = summary["rows"]
    assert row["quantizer"] == "tcq8-t" and len(row["vs_base_usq"]["psnr-rgb"]["local"]) == 1


def test_benchmark_rd_sweeps(cca_dir):
    """The RD part: every family at every scale, λ_T following Δ by the global rule, the
    comparisons against the USQ curve; a model without a recorded λ needs --lambda."""
    d = cca_dir
    bench = load_benchmark("step_models")
    argv = [str(d / "cca.pth"), "--data", str(d / "img"), "--parts", "rd", "--usq-scales", "0.9", "1.0"]
    argv += ["--tcq-scales", "0.9", "1.0"]
    with pytest.raises(SystemExit):  # no λ recorded: refused before any measurement
        bench.main([*argv, "--out", str(d / "x.json")])
    assert not (d / "x.json").exists()
    assert bench.main([*argv, "--lambda", "0.013", "--out", str(d / "rd.json")]) == 0
    rd = json.loads((d / "rd.json").read_text())["models"][0]["rd"]
    assert set(rd["points"]) == {f"{f}@{s}" for f in ("usq", "tcq8", "tcq8-rd") for s in ("0.9", "1")}
    tcq, tcq_small = rd["points"]["tcq8@1"]["quantizer"], rd["points"]["tcq8@0.9"]["quantizer"]
    assert tcq["step"] == pytest.approx(0.7) and tcq_small["step"] == pytest.approx(0.63)
    assert tcq_small["lambda_t"] / tcq["lambda_t"] == pytest.approx(0.81)  # λ_T ∝ Δ²
    assert rd["points"]["tcq8-rd@1"]["quantizer"]["target"] == "rd" and rd["model_lambda"] == 0.013
    for family in ("tcq8", "tcq8-rd"):
        assert set(rd["vs_usq"][family]) == {"bd", "local", "local_mean", "at_default", "psnr_db_at_default"}
        assert len(rd["vs_usq"][family]["local"]) == 2


@pytest.mark.slow
def test_benchmark_speed(cca_dir):
    """The speed part: one subprocess per configuration, its peak RSS, ratios to USQ."""
    d = cca_dir
    bench = load_benchmark("step_models")
    argv = [str(d / "cca.pth"), "--data", str(d / "img"), "--parts", "speed", "--lambda", "0.013"]
    assert bench.main([*argv, "--out", str(d / "speed.json")]) == 0
    result = json.loads((d / "speed.json").read_text())
    assert len(result["machine"]["loadavg_start"]) == 3
    speed = result["models"][0]["speed"]
    assert set(speed["configs"]) == {"usq", "tcq8", "tcq8-target"}
    for c in speed["configs"].values():
        assert c["peak_rss_mb"] >= c["rss_after_load_mb"] > 0 and c["compress_s"] > 0
    assert speed["configs"]["tcq8-target"]["quantizer"]["target"] == "rd"  # the default with λ known
    assert set(speed["ratios"]["tcq8/usq"]) == {"compress_s", "decompress_s", "peak_rss_mb"}
