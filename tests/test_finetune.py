"""Tests of ``qft finetune`` on a tiny model and synthetic images (no shared data needed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from compressai.models import MeanScaleHyperprior
from finetune_helpers import LAMBDA, tiny_base, write_images, write_recipe  # sibling helper module
from PIL import Image

from trellis import SCALE_TABLE, Quantizer

from qft.cli import main
from qft.codec import Codec, LatentCoder, RDTarget
from qft.errors import UserError
from qft.finetune import (
    LatentCache,
    cell_mass,
    finetune,
    index_cells,
    load_finetune_recipe,
)
from qft.finetune.objective import decode_centre, forward_window, hyper_window
from qft.models import create_model, load_checkpoint, save_checkpoint
from qft.settings import default_lambda, default_step, read_settings, resolve_quantizer
from qft.train import export_state_dict


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic images, a tiny base checkpoint with non-trivial latents, a recipe."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune")
    write_images(root / "data" / "train", [(200 + 16 * i, 210) for i in range(3)])  # ≥ crop + context
    base = tiny_base(root / "base.pth")
    path = root / "recipe.yaml"
    recipe = write_recipe(path, base, root / "data", steps=4)
    return {
        "root": root,
        "base": base,
        "recipe": path,
        "raw": recipe,
        "cache": root / "cache-tcq8",
    }


def _run(setup, out, *extra, cache=True):
    args = [
        "finetune",
        str(setup["recipe"]),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    if cache:
        args += ["--cache", str(setup["cache"])]
    return main(args)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same(a, b, prefix):
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.fixture(scope="module")
def decoder_run(setup):
    out = setup["root"] / "decoder"
    assert _run(setup, out) == 0
    return out


def test_cache_holds_the_inference_quantizer_output(setup, decoder_run):
    base = load_checkpoint(setup["base"])
    q = Quantizer("tcq8", step=default_step("tcq8"), lam=default_lambda("tcq8", default_step("tcq8")))  # the CLI's
    meta = json.loads((setup["cache"] / "meta.json").read_text())
    cache = LatentCache.open(setup["cache"], meta["identity"])
    img = np.asarray(Image.open(setup["root"] / "data" / "train" / "1.png").convert("RGB"))
    img = img[:208, :208]  # trimmed to multiples of 16
    x = torch.zeros(1, 3, 256, 256)
    x[0, :, :208, :208] = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    lat = LatentCoder(base.model, "mean-scale-hyperprior").quantize(x, q)[0]
    assert meta["identity"]["quantizer"] == {
        "method": "tcq8",
        "step": q.step,
        "lam": q.lam,
        "theta": 0.5,
        "reset": "channel",
    }
    np.testing.assert_array_equal(cache.crop("index", 1, 0, 0, 8), lat.result.indices[:, :8, :8])
    np.testing.assert_array_equal(cache.crop("y_hat", 1, 1, 2, 4), lat.y_hat[:, 1:5, 2:6])
    # latent crop (i, j) of size h <-> image crop (16 i, 16 j) of size 16 h
    np.testing.assert_array_equal(cache.crop("image", 1, 1, 2, 4), img[16:80, 32:96])
    # a crop with its 2-latent context decodes its centre exactly as the whole image does
    g_s = base.model.g_s
    with torch.no_grad():
        whole = g_s(torch.from_numpy(lat.y_hat)[None])
        part = g_s(torch.from_numpy(np.array(cache.crop("y_hat", 1, 2, 2, 8)))[None])
    torch.testing.assert_close(part[..., 32:-32, 32:-32], whole[..., 64:128, 64:128], rtol=0, atol=1e-5)
    assert cache.latent_size(1) == (13, 13)
    assert np.abs(lat.result.indices).max() >= 2  # the test latents are not all zero


@pytest.mark.parametrize("rows,cols", [(slice(0, 12), slice(3, 20)), (slice(5, -1), slice(-9, None))])
def test_forward_window_on_the_hyper_synthesis(rows, cols):
    """h_s (transposed and stride-1 convolutions, LeakyReLU) computed on a window only."""
    h_s = create_model("mbt2018-mean", N=16, M=24, seed=0).h_s
    z = torch.randn(2, 16, 6, 7, generator=torch.Generator().manual_seed(0))
    part = forward_window(h_s, z, rows, cols)
    whole = h_s(z)[..., rows, cols]
    torch.testing.assert_close(part, whole, rtol=0, atol=1e-5)
    params = list(h_s.parameters())
    for a, b in zip(
        torch.autograd.grad(part.square().mean(), params), torch.autograd.grad(whole.square().mean(), params)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("top,left", [(0, 0), (4, 8), (12, 16)])
def test_hyper_window_gives_the_whole_image_entropy_parameters(top, left):
    """μ, σ of a training crop from its ẑ window equal those of the whole image (crops in
    the interior and at the edges)."""
    model = create_model("mbt2018-mean", N=16, M=24, seed=0)
    z = torch.randn(1, 16, 6, 7, generator=torch.Generator().manual_seed(0))
    size = 12
    with torch.no_grad():
        whole = model.h_s(z)[..., top : top + size, left : left + size]
        rows, cols, dt, dl = hyper_window(z.shape[-2:], top, left, size)
        part = model.h_s(z[..., rows, cols])[..., dt : dt + size, dl : dl + size]
        torch.testing.assert_close(part, whole, rtol=0, atol=1e-5)
        if top == 4:  # the crop's own ẑ alone is not enough: h_s reaches beyond it
            own = model.h_s(z[..., top // 4 : (top + size) // 4, left // 4 : (left + size) // 4])
            assert not torch.allclose(own, whole, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("parts", ["decoder", "decoder+hyperdecoder"])
def test_finetune_on_cuda(setup, tmp_path, parts):
    """bf16 autocast and channels_last on the GPU; the output loads on the CPU."""
    out = tmp_path / "cuda"
    assert _run(setup, out, "--device", "cuda", "--parts", parts) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["device"].startswith("cuda") and all(np.isfinite(r["loss"]) for r in log if r["kind"] == "train")
    ft = load_checkpoint(out / "model.pth")
    assert ft.extra["parts"] == parts and next(ft.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("arch", ["mbt2018-mean", "bmshj2018-hyperprior", "cheng2020-anchor"])
def test_decode_centre_equals_the_cropped_whole_decode(arch):
    """The trimmed synthesis (chains of transposed convolutions) and the fallback (any other
    g_s) give the centre of g_s(y) and its gradient."""
    model = create_model(arch, N=16, M=24, seed=0) if arch != "cheng2020-anchor" else create_model(arch, N=16, seed=0)
    g_s = model.g_s
    channels = next(m for m in g_s.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))).in_channels
    y = torch.randn(2, channels, 12, 15, generator=torch.Generator().manual_seed(0)) * 3
    x = torch.rand(2, 3, 128, 176, generator=torch.Generator().manual_seed(1))
    part = decode_centre(g_s, y, 2)
    whole = g_s(y)[..., 32:-32, 32:-32]
    torch.testing.assert_close(part, whole, rtol=0, atol=1e-5)
    params = list(g_s.parameters())
    for a, b in zip(
        torch.autograd.grad(((part - x) ** 2).mean(), params),
        torch.autograd.grad(((whole - x) ** 2).mean(), params),
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("method", ["usq", "tcq8"])
def test_cell_rate_matches_the_coding_tables(method):
    """At table scales, −log2 of the cell masses equals the quantizer's table bits."""
    rng = np.random.default_rng(0)
    sigma = SCALE_TABLE[rng.integers(8, 40, size=(4, 16, 16))]
    y = (rng.standard_normal(sigma.shape) * sigma).astype(np.float32)
    mu = np.zeros_like(y)
    q = Quantizer(
        method,
        step=0.56 if method == "tcq8" else 1.0,
        lam=0.02 if method == "tcq8" else 0.0,
    )
    res = q.quantize(y, mu, sigma)
    lo, hi = index_cells(res.indices, res.rows // 64, q)
    bits = -torch.log2(cell_mass(torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(sigma))).sum().item()
    assert bits == pytest.approx(res.bits, rel=2e-3)


def test_decoder_finetune_output(setup, decoder_run):
    base, out = _weights(setup["base"]), _weights(decoder_run / "model.pth")
    assert not _same(base, out, "g_s.")
    for prefix in ("g_a.", "h_a.", "h_s.", "entropy_bottleneck."):
        assert _same(base, out, prefix)
    ckpt = load_checkpoint(decoder_run / "model.pth")
    assert ckpt.arch == "mbt2018-mean" and ckpt.params == {"N": 16, "M": 24}
    extra = ckpt.extra
    assert extra["finetuned_from"] == load_checkpoint(setup["base"]).sha256
    assert extra["quantizer"]["method"] == "tcq8" and extra["parts"] == "decoder"
    assert extra["lambda"] == LAMBDA and extra["steps"] == 4 and extra["control"] is False
    MeanScaleHyperprior.from_state_dict(out)  # plain CompressAI loads it
    log = [json.loads(ln) for ln in (decoder_run / "log.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in log] == [
        "start",
        "train",
        "train",
        "train",
        "train",
        "end",
    ]
    assert all(e["bpp"] == 0 for e in log if e["kind"] == "train")


def test_decoder_and_hyperdecoder(setup, tmp_path):
    out = tmp_path / "hyper"
    assert _run(setup, out, "--parts", "decoder+hyperdecoder") == 0
    base, new = _weights(setup["base"]), _weights(out / "model.pth")
    assert not _same(base, new, "g_s.") and not _same(base, new, "h_s.")
    assert _same(base, new, "g_a.") and _same(base, new, "h_a.")
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert all(e["bpp"] > 0 for e in log if e["kind"] == "train")


def test_requantize_every(setup, tmp_path, capsys):
    """decoder+hyperdecoder with ``--requantize-every 2``: the latents are quantized again
    at step 2 with the current h_s (same y, new μ) into a cache of the run's own, the
    shared base cache stays; a run stopped after the re-quantization resumes exactly,
    without the base cache."""
    dh = ("--parts", "decoder+hyperdecoder", "--requantize-every", "2")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert _run(setup, full, *dh) == 0
    log = [json.loads(ln) for ln in (full / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["kind"] == "requantize"] == [2]
    meta = json.loads((setup["cache"] / "meta.json").read_text())
    base = LatentCache.open(setup["cache"], meta["identity"])
    new_meta = json.loads((full / "cache-step2" / "meta.json").read_text())
    new = LatentCache.open(full / "cache-step2", new_meta["identity"])
    assert new_meta["identity"]["model"] != meta["identity"]["model"]
    assert np.array_equal(new.arrays["y"], base.arrays["y"])
    assert not np.array_equal(new.arrays["mu"], base.arrays["mu"])

    assert _run(setup, resumed, *dh, "--stop-after", "3") == 0
    # the resumed run trains on its re-quantized cache: the base cache is not needed
    absent = tmp_path / "absent-base-cache"
    stale = resumed / ".checkpoint.pth.x1y2z3.tmp"  # left by a run killed while saving
    stale.write_bytes(b"half")
    assert _run(setup, resumed, *dh, "--resume", "--cache", str(absent), cache=False) == 0
    assert not stale.exists()
    assert not absent.exists()
    a, b = _weights(resumed / "model.pth"), _weights(full / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert _run(setup, tmp_path / "c", *dh, "--control") == 2
    assert "control arm" in capsys.readouterr().err


def test_control_arm(setup, decoder_run, tmp_path):
    out = tmp_path / "control"
    assert _run(setup, out, "--control") == 0
    base, ctrl, ft = (_weights(p) for p in (setup["base"], out / "model.pth", decoder_run / "model.pth"))
    assert not _same(base, ctrl, "g_s.") and not _same(ft, ctrl, "g_s.")
    assert load_checkpoint(out / "model.pth").extra["control"] is True


def test_resume_is_exact(setup, decoder_run, tmp_path):
    out = tmp_path / "resumed"
    assert _run(setup, out, "--stop-after", "2") == 0
    assert not (out / "model.pth").exists()
    with pytest.raises(UserError, match="--resume"):
        finetune(
            load_finetune_recipe(setup["recipe"]),
            out,
            cache_dir=setup["cache"],
            progress=False,
        )
    assert _run(setup, out, "--resume") == 0
    a, b = _weights(out / "model.pth"), _weights(decoder_run / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2, 3, 4, 4]


def test_cache_of_another_quantizer_or_checkpoint(setup, tmp_path, capsys):
    assert _run(setup, tmp_path / "a", "-q", "usq") == 2
    assert "belongs to another quantizer" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    model = create_model("mbt2018-mean", N=16, M=24, seed=1)
    save_checkpoint(other, model, "mbt2018-mean", {"N": 16, "M": 24})
    assert _run(setup, tmp_path / "b", "-m", str(other), "--lambda", "0.01") == 2
    assert "belongs to another checkpoint" in capsys.readouterr().err
    assert _run(setup, tmp_path / "c", "--target", "0.25") == 2
    assert "belongs to another quantizer" in capsys.readouterr().err


def test_finetune_on_decoder_target_latents(setup, tmp_path):
    """With a decoder target the cache holds what the encoder sends with that target (the
    padding outside the target's residual), and the model records the target."""
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    assert _run(setup, out, "--cache", str(cache_dir), "--target", "0.25", "--steps", "1", cache=False) == 0
    base = load_checkpoint(setup["base"])
    q = Quantizer("tcq8", step=default_step("tcq8"), lam=default_lambda("tcq8", default_step("tcq8")))
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["identity"]["target"] == 0.25
    cache = LatentCache.open(cache_dir, meta["identity"])
    img = np.asarray(Image.open(setup["root"] / "data" / "train" / "1.png").convert("RGB"))[:208, :208]
    x = torch.zeros(1, 3, 256, 256)
    x[0, :, :208, :208] = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255
    coder = LatentCoder(base.model, "mean-scale-hyperprior")
    lat = coder.quantize(x, q, target=0.25, padding=(0, 48, 0, 48))[0]
    np.testing.assert_array_equal(cache.crop("index", 1, 0, 0, 13), lat.result.indices[:, :13, :13])
    assert not np.array_equal(lat.result.indices, coder.quantize(x, q)[0].result.indices)
    assert load_checkpoint(out / "model.pth").extra["quantizer"]["target"] == 0.25
    # per-image η (--target rd) at the run's λ: recorded as rd, resolved again from the model
    out = tmp_path / "rd"
    assert _run(setup, out, "--cache", str(tmp_path / "rd-cache"), "--target", "rd", "--steps", "1", cache=False) == 0
    assert json.loads((tmp_path / "rd-cache" / "meta.json").read_text())["identity"]["target"] == "rd"
    ft = load_checkpoint(out / "model.pth")
    assert ft.extra["quantizer"]["target"] == "rd"
    assert resolve_quantizer("tcq8", read_settings(ft)).target == RDTarget(LAMBDA)


def test_scale_hyperprior_and_codec_round_trip(setup, tmp_path):
    """bmshj2018-hyperprior (μ = 0), both parts, USQ; the output codes real bitstreams."""
    base = tmp_path / "bmshj.pth"
    model = create_model("bmshj2018-hyperprior", N=16, M=24, seed=0)
    with torch.no_grad():
        model.g_a[-1].weight.mul_(20)
    save_checkpoint(base, model, "bmshj2018-hyperprior", {"N": 16, "M": 24})
    out = tmp_path / "bmshj"
    args = [
        "-m",
        str(base),
        "--lambda",
        "0.02",
        "-q",
        "usq",
        "--parts",
        "decoder+hyperdecoder",
        "--steps",
        "2",
    ]
    assert _run(setup, out, *args, cache=False) == 0
    ckpt = load_checkpoint(out / "model.pth")
    assert ckpt.arch == "bmshj2018-hyperprior" and ckpt.extra["quantizer"]["method"] == "usq"
    codec = Codec.from_checkpoint(ckpt)
    x = torch.rand(1, 3, 64, 64)
    q = Quantizer("usq")
    x_hat = codec.decompress(codec.compress(x, q)["bitstream"])["x_hat"]
    assert x_hat.shape == x.shape


def test_exported_fp16_state_dict(setup, tmp_path):
    """The layout `qft train` ships (a bare fp16 state_dict, no metadata) finetunes."""
    base = tmp_path / "export.pth"
    torch.save(export_state_dict(load_checkpoint(setup["base"]).model), base)
    out = tmp_path / "o"
    assert (
        _run(
            setup,
            out,
            "-m",
            str(base),
            "--lambda",
            "0.01",
            "-q",
            "usq",
            "--steps",
            "1",
            cache=False,
        )
        == 0
    )
    assert load_checkpoint(out / "model.pth").extra["finetuned_from"] == load_checkpoint(base).sha256


def test_context_models_are_refused(setup, tmp_path, capsys):
    base = tmp_path / "mbt2018.pth"
    save_checkpoint(base, create_model("mbt2018", N=8, M=8, seed=0), "mbt2018", {"N": 8, "M": 8})
    assert _run(setup, tmp_path / "o", "-m", str(base), "--lambda", "0.01") == 2
    assert "mbt2018 cannot be finetuned: qft finetune supports hyperprior models" in capsys.readouterr().err


def test_recipe_errors(setup, tmp_path):
    bad = dict(setup["raw"], parts="encoder")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="parts must be one of"):
        load_finetune_recipe(tmp_path / "r.yaml")
    bad = dict(setup["raw"], extra_key=1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="unknown key 'extra_key'"):
        load_finetune_recipe(tmp_path / "r.yaml")
    bad = dict(setup["raw"], requantize_every=5)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match="requantize_every needs parts decoder"):
        load_finetune_recipe(tmp_path / "r.yaml")
    for target in (-0.5, "yes", True):
        bad = dict(setup["raw"], quantizer=dict(setup["raw"]["quantizer"], target=target))
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(UserError, match="quantizer.target must be auto, rd or a number"):
            load_finetune_recipe(tmp_path / "r.yaml")
    good = dict(setup["raw"], quantizer=dict(setup["raw"]["quantizer"], target=0.25))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(good))
    assert load_finetune_recipe(tmp_path / "r.yaml").target == 0.25
    assert load_finetune_recipe(setup["recipe"]).target == 0.0  # optional: plain latents
    recipe = load_finetune_recipe(setup["recipe"]).replace(checkpoint=None)
    with pytest.raises(UserError, match="no checkpoint"):
        finetune(recipe, tmp_path / "o", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_training(setup, out, reference):
    """Same updates up to float summation order. Adam's first steps turn rounding noise in
    near-zero gradients into full-size steps of single elements, so each tensor's
    difference is compared, as a norm, with the norm of its update."""
    base, a, b = (_weights(p) for p in (setup["base"], out / "model.pth", reference / "model.pth"))
    for k in a:
        if a[k].is_floating_point():
            update = (b[k].float() - base[k].float()).norm().item()
            assert (a[k].float() - b[k].float()).norm().item() <= 0.05 * update + 1e-7, k


def _ddp_worker(rank, world, port, recipe, out, cache):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    finetune(recipe, out, cache_dir=cache, progress=False)


def test_ddp_gloo_two_processes(setup, decoder_run, tmp_path):
    """The DDP path (gloo, 2 processes, rank-strided batch) trains as one process."""
    out = tmp_path / "ddp"
    recipe = load_finetune_recipe(setup["recipe"])
    mp.start_processes(
        _ddp_worker,
        args=(2, _free_port(), recipe, out, setup["cache"]),
        nprocs=2,
        start_method="fork",
    )
    _assert_same_training(setup, out, decoder_run)
    assert len((out / "log.jsonl").read_text().splitlines()) == 6  # one writer


@pytest.mark.slow
def test_torchrun_two_processes(setup, decoder_run, tmp_path):
    out = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "qft",
        "finetune",
        str(setup["recipe"]),
        "--out",
        str(out),
        "--cache",
        str(setup["cache"]),
        "--no-progress",
    ]
    subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_same_training(setup, out, decoder_run)


def test_finetune_on_a_folder_with_the_recorded_lambda(setup, tmp_path):
    """`qft finetune -m CKPT --data DIR` on a checkpoint that records no λ: refused with a
    message naming --lambda, then run with the λ its settings file records
    (`qft calibrate --lambda`) on the images directly in DIR."""
    import shutil

    base = tmp_path / "mine.pth.tar"
    save_checkpoint(base, load_checkpoint(setup["base"]).model, "mbt2018-mean", {"N": 16, "M": 24})
    data = tmp_path / "my-images"
    shutil.copytree(setup["root"] / "data" / "train", data)
    args = [
        "finetune",
        str(setup["recipe"]),
        "-m",
        str(base),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "ft"),
        "--steps",
        "1",
        "--no-progress",
    ]
    with pytest.raises(UserError, match="--lambda"):
        from qft.finetune import finetune, load_finetune_recipe, override_recipe

        finetune(
            override_recipe(load_finetune_recipe(setup["recipe"]), data=data, checkpoint=str(base), steps=1),
            tmp_path / "refused",
            progress=False,
        )
    assert main(["calibrate", "-m", str(base), "--lambda", "0.02"]) == 0
    assert main(args) == 0
    ft = load_checkpoint(tmp_path / "ft" / "model.pth")
    assert ft.extra["lambda"] == 0.02 and ft.extra["finetune_recipe"]["data_root"] == str(data.resolve())
