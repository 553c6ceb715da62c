"""A newcomer's path (issue 25): defaults on an unseen checkpoint, λ in the settings file,
calibrate's early checks, finetune overrides and recipe paths, the Python API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from qft.cli import main
from qft.codec import RDTarget
from qft.models import create_model, load_checkpoint, save_checkpoint
from qft.models.zoo import ASSETS
from qft.settings import read_settings, resolve_quantizer, settings_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A checkpoint as users save them (a training dict, no λ, no settings) and two images."""
    root = tmp_path_factory.mktemp("user")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        a = np.cumsum(rng.integers(0, 9, (64, 64, 3)), axis=1) % 256
        Image.fromarray(a.astype(np.uint8)).save(root / "img" / f"{i}.png")
    model = create_model("mbt2018-mean", N=16, M=16, seed=0)
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": {}}, root / "mine.pth.tar")
    return root


def test_unseen_checkpoint_defaults_to_the_decoder_target(user):
    """No calibration, no λ: RDOQ/TCQ aim at the decoder target with the fixed η; with a
    known λ, η per image; USQ stays plain rounding."""
    ck = load_checkpoint(user / "mine.pth.tar")
    settings = read_settings(ck)
    assert "model_lambda" not in settings
    assert resolve_quantizer("tcq8", settings).target == 0.125
    assert resolve_quantizer("rdoq", settings).target == 0.125
    assert resolve_quantizer("usq", settings).target == 0
    assert resolve_quantizer("tcq8", settings, target=0.0).target == 0
    assert resolve_quantizer("tcq8", {"model_lambda": 0.013}).target == RDTarget(0.013)
    with pytest.raises(Exception, match="--lambda"):
        resolve_quantizer("tcq8", settings, target="rd")


def test_shipped_settings_work_outside_the_assets_folder(tmp_path):
    """The shipped file and its .qft.json copied elsewhere keep the calibrated rd target:
    the settings file records the model's λ."""
    for name in ("mbt2018-mean-0.013.pth", "mbt2018-mean-0.013.qft.json"):
        shutil.copy(ASSETS / name, tmp_path / name)
    ck = load_checkpoint(tmp_path / "mbt2018-mean-0.013.pth")
    assert "lambda" not in ck.extra  # no manifest outside the assets folder
    choice = resolve_quantizer("tcq8", read_settings(ck))
    assert choice.source == "calibrated" and choice.target == RDTarget(0.013)


def test_calibrate_lambda_and_early_checks(user, tmp_path, capsys):
    ckpt = tmp_path / "m.pth.tar"
    shutil.copy(user / "mine.pth.tar", ckpt)
    # rd needs λ: refused before any grid, naming --lambda
    assert main(["calibrate", "-m", str(ckpt), "--data", str(user / "img"), "--targets", "rd"]) == 2
    assert "--lambda" in capsys.readouterr().err and not settings_path(ckpt).exists()
    assert main(["calibrate", "-m", str(ckpt)]) == 2
    assert "--data" in capsys.readouterr().err
    # only record λ
    assert main(["calibrate", "-m", str(ckpt), "--lambda", "0.02"]) == 0
    assert json.loads(settings_path(ckpt).read_text())["model_lambda"] == 0.02
    assert resolve_quantizer("tcq8", read_settings(load_checkpoint(ckpt))).target == RDTarget(0.02)
    # the test-set guard and its override
    kodak = tmp_path / "kodak"
    shutil.copytree(user / "img", kodak)
    assert main(["calibrate", "-m", str(ckpt), "--data", str(kodak)]) == 2
    assert "--allow-test-set" in capsys.readouterr().err
    assert (
        main(
            [
                "calibrate",
                "-m",
                str(ckpt),
                "--data",
                str(kodak),
                "--allow-test-set",
                "--images",
                "1",
                "--methods",
                "tcq8",
                "--steps",
                "0.7",
                "--mults",
                "0.05",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert json.loads(settings_path(ckpt).read_text())["model_lambda"] == 0.02  # kept


def test_recipe_paths_and_shipped_names(tmp_path):
    from qft.finetune import load_finetune_recipe, override_recipe
    from qft.train.recipe import recipe_path

    text = (ROOT / "recipes" / "finetune" / "cpu.yaml").read_text()
    text = text.replace("checkpoint: null", "checkpoint: mbt2018-mean-0.013").replace(
        "root: ../shared/data/bsds500", "root: data"
    )
    recipe_file = tmp_path / "ft.yaml"  # no pyproject.toml above: the recipe's folder is the root
    recipe_file.write_text(text)
    r = load_finetune_recipe(recipe_file)
    assert r.checkpoint == "mbt2018-mean-0.013" and r.data_root == str(tmp_path / "data")
    assert recipe_path(recipe_file, "/abs/x") == "/abs/x" and recipe_path(recipe_file, None) is None
    assert recipe_path(ROOT / "recipes" / "report" / "kodak.yaml", "qft/assets/kodak") == str(ROOT / "qft/assets/kodak")
    r2 = override_recipe(r, data=tmp_path, steps=5, lmbda=0.02, parts="decoder+hyperdecoder", method="usq")
    assert (r2.data_root, r2.train_splits, r2.steps, r2.lmbda, r2.parts) == (
        str(tmp_path),
        (".",),
        5,
        0.02,
        "decoder+hyperdecoder",
    )
    assert r2.method == "usq" and r2.step is None
    with pytest.raises(Exception, match="not a folder"):
        override_recipe(r, data=tmp_path / "missing")


def test_report_recipe_paths_are_recipe_relative(tmp_path):
    from qft.eval.report import load_report_recipe

    (tmp_path / "r.yaml").write_text(
        "data: imgs\nout: out\nquantizers: [usq]\nmodels: [{label: base, checkpoints: [m.pth, mbt2018-mean-0.013]}]\n"
    )
    r = load_report_recipe(tmp_path / "r.yaml")
    assert r.data == str(tmp_path / "imgs") and r.out == str(tmp_path / "out")
    assert r.rows[0].checkpoints == (str(tmp_path / "m.pth"), "mbt2018-mean-0.013")
    assert load_report_recipe(tmp_path / "r.yaml", out="here").out == "here"  # the command line's: as given


def test_import_qft_is_light():
    code = "import sys, qft; assert 'torch' not in sys.modules; from qft import Codec, Quantizer, bd_rate; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr


def test_readme_api_reproduces_the_cli_bytes(user, tmp_path):
    """The README's Python snippet codes the same bytes as `qft compress` with the same
    quantizer, and decodes."""
    from qft import Codec, finetune
    from qft import load_checkpoint as top_load

    assert callable(finetune) and top_load is load_checkpoint
    image = user / "img" / "0.png"
    for q in ("usq", "tcq8"):
        out_file = tmp_path / f"{q}.qft"
        assert main(["compress", "-m", str(user / "mine.pth.tar"), "-q", q, str(image), "-o", str(out_file)]) == 0
        codec = Codec.from_checkpoint(user / "mine.pth.tar", quantizer=q)
        out = codec.compress(image)
        assert out["bitstream"] == out_file.read_bytes()
        assert codec.decompress(out["bitstream"])["x_hat"].shape == (1, 3, 64, 64)
    assert codec.choice.target == 0.125  # the CLI's default for an unseen checkpoint


def test_api_codec_keeps_the_base_codecs_calls(user):
    """qft.Codec extends qft.codec.Codec without changing it: the base's parameters of
    from_checkpoint and compress stand unchanged in the subclass (added ones are
    keyword-only), and a call valid on the base means the same on both."""
    import inspect

    from qft import Codec
    from qft.codec import Codec as CodecBase

    base = inspect.signature(CodecBase.from_checkpoint).parameters
    sub = inspect.signature(Codec.from_checkpoint).parameters
    assert list(sub)[: len(base)] == list(base) and all(sub[k] == base[k] for k in base)
    assert all(p.kind is p.KEYWORD_ONLY for k, p in sub.items() if k not in base)
    assert Codec.compress is CodecBase.compress
    image, ckpt = user / "img" / "0.png", load_checkpoint(user / "mine.pth.tar")
    plain, api = CodecBase.from_checkpoint(user / "mine.pth.tar"), Codec.from_checkpoint(ckpt)
    assert plain.checkpoint.sha256 == api.checkpoint.sha256 == ckpt.sha256
    assert plain.compress(image)["bitstream"] == api.compress(image)["bitstream"]  # USQ, no target: both


def test_readme_snippet_reproduces_the_cli_bytes(tmp_path, monkeypatch):
    """The README's first Python block, run as written (a shipped model, a Kodak image),
    writes the bytes `qft compress` writes."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    image = ROOT / "qft" / "assets" / "kodak" / "kodim01.png"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace('"kodim01.png"', repr(str(image))), "README", "exec"), {})
    assert main(["compress", "-m", "mbt2018-mean-0.013", "-q", "tcq8", str(image), "-o", "cli.qft"]) == 0
    assert (tmp_path / "kodim01.qft").read_bytes() == (tmp_path / "cli.qft").read_bytes()


@pytest.fixture(scope="module")
def tiny_report(user, tmp_path_factory):
    """A report recipe on two tiny checkpoints and the two images."""
    root = tmp_path_factory.mktemp("tiny-report")
    for k in range(2):
        save_checkpoint(
            root / f"m{k}.pth", create_model("mbt2018-mean", N=16, M=16, seed=k), "mbt2018-mean", {"N": 16, "M": 16}
        )
    (root / "r.yaml").write_text(
        f"data: {user / 'img'}\nquantizers: [usq, tcq8]\nsweep: [0.8, 1.25]\n"
        "models: [{label: base, checkpoints: [m0.pth, m1.pth]}]\n"
    )
    return root


@pytest.mark.slow
def test_eval_and_report_workers_match_one_process(user, tiny_report, tmp_path):
    """--workers N (processes of one thread each) gives the rows of one process."""
    from qft.eval.report import load_report_recipe, run_report

    ckpts = [str(tiny_report / "m0.pth"), str(tiny_report / "m1.pth")]
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.json"
        assert (
            main(
                [
                    "eval",
                    "-m",
                    *ckpts,
                    "-q",
                    "tcq8",
                    "--data",
                    str(user / "img"),
                    "-o",
                    str(out),
                    "--per-image",
                    "--workers",
                    str(workers),
                ]
            )
            == 0
        )
        outs[workers] = json.loads(out.read_text())
    for a, b in zip(outs[1]["qft"]["per_image"], outs[2]["qft"]["per_image"]):
        assert [(r["image"], r["bpp"], r["psnr-rgb"]) for r in a] == [(r["image"], r["bpp"], r["psnr-rgb"]) for r in b]
    rows = [
        run_report(load_report_recipe(tiny_report / "r.yaml", out=str(tmp_path / f"r{w}"), workers=w), progress=False)[
            "rows"
        ]
        for w in (1, 2)
    ]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_report_cells_sharded_over_torchrun_ranks(tiny_report, tmp_path):
    """Two gloo processes under torchrun share the cells and rank 0 writes the same tables
    as one process."""
    from qft.eval.report import load_report_recipe, run_report

    serial = run_report(load_report_recipe(tiny_report / "r.yaml", out=str(tmp_path / "one")), progress=False)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "qft",
        "report",
        str(tiny_report / "r.yaml"),
        "--out",
        str(tmp_path / "two"),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("# qft report") == 1  # rank 0 alone prints the table
    sharded = json.loads((tmp_path / "two" / "bdrate.json").read_text())
    assert sharded["rows"] == serial["rows"]
    assert sorted(p.name for p in (tmp_path / "two" / "cells").iterdir()) == sorted(
        p.name for p in (tmp_path / "one" / "cells").iterdir()
    )
