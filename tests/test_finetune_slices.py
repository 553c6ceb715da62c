"""``qft finetune`` on the models quantized anew at every step — the channel-slice models
(TCM, DCAE, CCA; issue 21) and MLIC++ (issue 22) — with tiny models and synthetic images:
each part set and the control arm train exactly their parameters, every batch is quantized
as the codec quantizes it (same layout, order and indices), resume is bit-exact, the output
codes streams that decode exactly and ships as a delta, wrong parts and families give one
line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune_helpers import LAMBDA, write_images, write_recipe  # sibling helper module
from PIL import Image
from test_benchmarks import load_benchmark  # sibling test module: benchmark scripts as modules
from test_checkerboard_coding import TINY_ELIC  # sibling test modules: one tiny size per family
from test_dcae_cca import TINY as TINY_SLICE_MODELS
from test_mlicpp import TINY as TINY_MLICPP
from test_tcm import TINY as TINY_TCM

from trellis import Quantizer

from qft.cli import main
from qft.codec import Codec, LatentCoder
from qft.finetune import SliceObjective, part_prefixes, ship_finetune
from qft.finetune.slices import image_batch
from qft.models import ARCHITECTURES, create_model, load_checkpoint, save_checkpoint

TINY = {"tcm": TINY_TCM, **TINY_SLICE_MODELS, "mlicpp": TINY_MLICPP}
ARCHS = list(TINY)
ARMS = {
    "decoder": ("decoder", False),
    "decoder+entropy": ("decoder+entropy", False),
    "control": ("decoder+entropy", True),
}
#: the parts ``decoder`` trains, per family
DECODER = {arch: {"g_s.", "lrp_transforms."} for arch in TINY} | {"mlicpp": {"g_s.", "lrp_anchor.", "lrp_nonanchor."}}


def tiny_model(arch: str) -> torch.nn.Module:
    """A tiny random model whose latents span a few quantization steps (g_a's last
    convolution × 20)."""
    m = create_model(arch, seed=0, **TINY[arch])
    if isinstance(m.g_a, torch.nn.Sequential):
        last = m.g_a[-1]
    else:
        last = (m.g_a.analysis_transform if arch == "mlicpp" else m.g_a.down)[-1]
    with torch.no_grad():
        last.weight.mul_(20)
        last.bias.mul_(20)
    return m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two synthetic images, a tiny base checkpoint per architecture, a recipe."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("finetune-slices")
    write_images(root / "data" / "train", [(80, 72 + 16 * i) for i in range(2)])
    bases = {}
    for arch in ARCHS:
        bases[arch] = root / f"{arch}.pth"
        save_checkpoint(bases[arch], tiny_model(arch), arch, TINY[arch], extra={"lambda": LAMBDA})
    path = root / "recipe.yaml"
    write_recipe(path, bases["tcm"], root / "data", steps=2)
    return {"root": root, "bases": bases, "recipe": path}


def _run(setup, arch, out, *extra):
    return main(
        ["finetune", str(setup["recipe"]), "-m", str(setup["bases"][arch]), "--out", str(out), "--no-progress", *extra]
    )


def _arm_args(arm):
    parts, control = ARMS[arm]
    return ["--parts", parts] + (["--control"] if control else [])


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


class _Runs(dict):
    """``(arch, arm) -> out folder`` of a finished 2-step run, run when first asked for."""

    def __init__(self, setup):
        super().__init__()
        self.setup = setup

    def __missing__(self, key):
        arch, arm = key
        folder = self.setup["root"] / f"{arch}-{arm}"
        assert _run(self.setup, arch, folder, *_arm_args(arm)) == 0
        self[key] = folder
        return folder


@pytest.fixture(scope="module")
def runs(setup):
    return _Runs(setup)


#: TCM and MLIC++ (the two step adapters) in the default suite; DCAE and CCA (TCM's code
#: path, other modules) with -m slow
FAST = ("tcm", "mlicpp")
ARCH_PARAMS = list(FAST) + [pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a not in FAST]


@pytest.mark.parametrize("arm", list(ARMS))
@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_each_arm_trains_exactly_its_parts(setup, runs, arch, arm):
    """The tensors outside the part set are bit-identical to the base's; every trained
    module (top-level name) changed; the entropy path is frozen with parts decoder."""
    parts, control = ARMS[arm]
    base, new = _weights(setup["bases"][arch]), _weights(runs[arch, arm] / "model.pth")
    assert list(base) == list(new)
    prefixes = part_prefixes(load_checkpoint(setup["bases"][arch]).model, parts)
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all(k.startswith(prefixes) for k in changed)
    for p in prefixes:
        assert any(k.startswith(p) for k in changed), f"{p} did not train"
    if parts == "decoder":
        assert set(prefixes) == DECODER[arch]
    else:
        assert DECODER[arch] < set(prefixes)
        assert not any(p.startswith(("g_a", "h_a", "gaussian_conditional")) for p in prefixes)
        assert not any(p.rstrip(".") in ("entropy_bottleneck", "z_entropy_bottleneck") for p in prefixes)
    extra = load_checkpoint(runs[arch, arm] / "model.pth").extra
    assert extra["parts"] == parts and extra["control"] is control and extra["lambda"] == LAMBDA
    log = [json.loads(line) for line in (runs[arch, arm] / "log.jsonl").read_text().splitlines()]
    train = [e for e in log if e["kind"] == "train"]
    assert len(train) == 2 and all(np.isfinite(e["loss"]) and e["bpp"] > 0 for e in train)
    if parts == "decoder":  # distortion only
        assert all(e["loss"] == pytest.approx(LAMBDA * 255**2 * e["mse"], rel=1e-5) for e in train)


def test_control_arm_differs_from_the_quantized_arm(runs):
    a, b = _weights(runs["tcm", "decoder+entropy"] / "model.pth"), _weights(runs["tcm", "control"] / "model.pth")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("g_s."))


class _Recording(Quantizer):
    """A quantizer that records the indices it returns (slice by slice)."""

    def quantize(self, *args, **kwargs):
        res = super().quantize(*args, **kwargs)
        object.__getattribute__(self, "seen").append(res.indices)
        return res


@pytest.mark.parametrize("arch", ARCHS)
def test_training_quantizes_as_the_codec(arch):
    """The indices a training step codes are those the codec's encoder (its float32 entropy
    path) chooses for the same image, step by step with the LRP in between: each step's
    array, in its layout (MLIC++: the squeezed checkerboard halves) and coding order, is
    the codec's."""
    torch.set_num_threads(1)
    model = tiny_model(arch)
    model.update(force=True)
    q = _Recording("tcq8", step=0.6, lam=0.03)
    object.__setattr__(q, "seen", [])
    x = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        SliceObjective(model, "decoder+entropy", False, LAMBDA, q)({"x": x})
    coder = LatentCoder(model, ARCHITECTURES[arch].entropy, dtype=torch.float32)
    (lat,) = coder.quantize(x, Quantizer("tcq8", step=0.6, lam=0.03))
    assert len(q.seen) == coder.steps.num_steps
    for i, seen in enumerate(q.seen):
        np.testing.assert_array_equal(seen[0], coder.steps.gather(i, lat.result.indices))
    assert np.abs(lat.result.indices).max() >= 2


def test_rate_pulls_mu_towards_y():
    """The rate of decoder+entropy has a gradient in μ (the coded cell fixed in the y
    domain): with λ = 0 the last slice's μ transform, which nothing but ŷ and the rate
    reads, learns from the rate alone; with parts decoder (no rate in the loss) it gets no
    gradient. (The rate's value, cell masses of the coded indices, is
    test_finetune.py::test_cell_rate_matches_the_coding_tables.)"""
    torch.set_num_threads(1)
    model = tiny_model("tcm")
    q = Quantizer("tcq8", step=0.6, lam=0.03)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    last = model.cc_mean_transforms[-1][-1].weight
    for parts, moves in (("decoder+entropy", True), ("decoder", False)):
        model.zero_grad()
        out = SliceObjective(model, parts, False, 0.0, q)({"x": x})
        out["loss"].backward()
        assert (last.grad is not None and last.grad.abs().sum() > 0) == moves


@pytest.mark.parametrize("arm", ["decoder+entropy", "control"])
@pytest.mark.parametrize("arch", FAST)
def test_resume_is_exact(setup, runs, tmp_path, arch, arm):
    out = tmp_path / "resumed"
    assert _run(setup, arch, out, *_arm_args(arm), "--stop-after", "1") == 0
    assert not (out / "model.pth").exists()
    assert _run(setup, arch, out, *_arm_args(arm), "--resume") == 0
    a, b = _weights(out / "model.pth"), _weights(runs[arch, arm] / "model.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_finetuned_model_codes_and_ships(setup, runs, tmp_path, arch):
    """The finetuned checkpoint codes TCQ-8 and USQ streams that decode exactly; shipped
    as a delta (its trained parts) it loads to the same coding."""
    ft = load_checkpoint(runs[arch, "decoder+entropy"] / "model.pth")
    x = torch.rand(1, 3, 60, 70, generator=torch.Generator().manual_seed(4))
    codec = Codec.from_checkpoint(ft)
    for q in (Quantizer("tcq8", step=0.6, lam=0.03), Quantizer("usq")):
        enc = codec.compress(x, q)
        dec = Codec.from_checkpoint(load_checkpoint(runs[arch, "decoder+entropy"] / "model.pth")).decompress(
            enc["bitstream"]
        )
        np.testing.assert_array_equal(dec["y_hat"], enc["y_hat"])
    folder = tmp_path / "zoo"
    folder.mkdir()
    base = folder / f"{arch}.pth"
    base.write_bytes(setup["bases"][arch].read_bytes())
    entry = ship_finetune([runs[arch, "decoder+entropy"]], base=base)
    assert entry["file"] == f"{arch}-ft-tcq8-entropy.pth" and all(p in entry["dtype"] for p in DECODER[arch])
    delta = load_checkpoint(folder / entry["file"])
    enc = Codec.from_checkpoint(delta).compress(x, Quantizer("tcq8", step=0.6, lam=0.03))
    np.testing.assert_array_equal(Codec.from_checkpoint(delta).decompress(enc["bitstream"])["y_hat"], enc["y_hat"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_finetune_mlicpp_on_cuda(setup, tmp_path):
    """MLIC++ decoder+entropy with the model on the GPU (fp32; the quantizer on the CPU):
    the output loads on the CPU and codes TCQ-8 streams that decode exactly."""
    out = tmp_path / "cuda"
    assert _run(setup, "mlicpp", out, *_arm_args("decoder+entropy"), "--device", "cuda") == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["device"].startswith("cuda") and all(np.isfinite(r["loss"]) for r in log if r["kind"] == "train")
    ft = load_checkpoint(out / "model.pth")
    assert next(ft.model.parameters()).device.type == "cpu"
    codec = Codec.from_checkpoint(ft)
    enc = codec.compress(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6)), Quantizer("tcq8"))
    np.testing.assert_array_equal(codec.decompress(enc["bitstream"])["y_hat"], enc["y_hat"])


def test_parts_that_do_not_apply_are_refused(setup, tmp_path, capsys):
    assert _run(setup, "tcm", tmp_path / "a", "--parts", "decoder+hyperdecoder") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "qft finetune: error: parts decoder+hyperdecoder does not apply to tcm; its parts are: decoder, decoder+entropy"
    ]
    hyper = tmp_path / "mbt.pth"
    save_checkpoint(hyper, create_model("mbt2018-mean", N=8, M=8, seed=0), "mbt2018-mean", {"N": 8, "M": 8})
    assert (
        main(
            [
                "finetune",
                str(setup["recipe"]),
                "-m",
                str(hyper),
                "--lambda",
                "0.01",
                "--parts",
                "decoder+entropy",
                "--out",
                str(tmp_path / "b"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "its parts are: decoder, decoder+hyperdecoder" in capsys.readouterr().err
    assert _run(setup, "cca", tmp_path / "c", "--parts", "decoder+entropy", "--requantize-every", "2") == 2
    assert "requantize_every" in capsys.readouterr().err
    assert _run(setup, "dcae", tmp_path / "d", "--target", "0.25") == 2
    assert "decoder target" in capsys.readouterr().err
    assert _run(setup, "tcm", tmp_path / "e", "--cache", str(tmp_path / "cache")) == 2
    assert "--cache does not apply to tcm" in capsys.readouterr().err
    assert _run(setup, "mlicpp", tmp_path / "f", "--parts", "decoder+hyperdecoder") == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qft finetune: error: parts decoder+hyperdecoder does not apply to mlicpp; "
        "its parts are: decoder, decoder+entropy"
    ]
    elic = tmp_path / "elic.pth"
    save_checkpoint(elic, create_model("elic2022-official", seed=0, **TINY_ELIC), "elic2022-official", TINY_ELIC)
    assert (
        main(["finetune", str(setup["recipe"]), "-m", str(elic), "--lambda", "0.01", "--out", str(tmp_path / "g")]) == 2
    )
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("qft finetune: error: elic2022-official cannot be finetuned: qft finetune supports")
    assert line.endswith("tcm, dcae, cca, mlicpp")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c", "d", "e", "f", "g", "cache"))


def test_image_batch_is_split_over_processes():
    """A process's share of the batch (images and control noise) does not depend on the
    number of processes."""
    images = [np.random.default_rng(i).integers(0, 256, (80, 96, 3), dtype=np.uint8) for i in range(3)]
    whole = image_batch(images, 0, 5, 4, 64, range(4), noise_channels=6)
    odd = image_batch(images, 0, 5, 4, 64, range(1, 4, 2), noise_channels=6)
    for k in ("x", "u"):
        assert torch.equal(whole[k][1::2], odd[k])
    assert whole["u"].shape == (4, 6, 4, 4) and whole["u"].abs().max() <= 0.5


@pytest.mark.slow
def test_benchmark_end_to_end(setup, tmp_path):
    """benchmarks/finetune_slices.py on the tiny TCM: three arms of 2 steps, the base and
    each arm coded on one image, the JSON written (to a temporary folder)."""
    bench = load_benchmark("finetune_slices")
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    img = np.random.default_rng(5).integers(0, 256, size=(64, 96, 3), dtype=np.uint8)
    Image.fromarray(img).save(kodak / "kodim01.png")
    Image.fromarray(img[::-1]).save(kodak / "kodim02.png")
    out = tmp_path / "result.json"
    args = ["-m", str(setup["bases"]["tcm"]), "--lambda", str(LAMBDA), "--steps", "2", "--images", "1"]
    args += ["--kodak", str(kodak), "--recipe", str(setup["recipe"]), "--data", str(setup["root"] / "data" / "train")]
    args += ["--runs", str(tmp_path / "runs"), "--out", str(out), "--no-progress"]
    assert bench.main(args) == 0
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {
        "base-usq",
        "base-tcq8",
        "decoder-tcq8",
        "entropy-tcq8",
        "control-tcq8",
        "control-usq",
    }
    assert record["images"] == ["kodim01.png"]
    assert {a["parts"] for a in record["arms"].values()} == {"decoder", "decoder+entropy"}
    assert record["arms"]["control"]["control"] is True and record["arms"]["control"]["step"] == 2
    assert record["rows"]["base-tcq8"]["rd_cost_change_vs_base_same_quantizer_pct"] == 0
    assert all(np.isfinite(r["rd_cost"]) and r["bpp"] > 0 for r in record["rows"].values())


def _ddp_worker(rank, world, port, recipe, out):
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from qft.finetune import finetune

    finetune(recipe, out, control=True, progress=False)


@pytest.mark.slow
def test_ddp_gloo_two_processes(setup, runs, tmp_path):
    """The control arm (per-element noise) of the tiny TCM under DDP (gloo, 2 processes,
    each one element of the batch) trains as one process: the same updates up to the
    order of float sums."""
    import socket

    import torch.multiprocessing as mp

    from qft.finetune import load_finetune_recipe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recipe = load_finetune_recipe(setup["recipe"]).replace(parts="decoder+entropy")
    out = tmp_path / "ddp"
    mp.start_processes(_ddp_worker, args=(2, port, recipe, out), nprocs=2, start_method="fork")
    base, a, b = (_weights(p) for p in (setup["bases"]["tcm"], out / "model.pth", runs["tcm", "control"] / "model.pth"))
    for k in a:
        if a[k].is_floating_point():
            update = (b[k].float() - base[k].float()).norm().item()
            assert (a[k].float() - b[k].float()).norm().item() <= 0.05 * update + 1e-7, k
