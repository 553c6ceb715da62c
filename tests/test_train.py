"""Tests of ``qft train`` on a tiny model and synthetic images (no shared data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from compressai.models import MeanScaleHyperprior
from PIL import Image

from qft.cli import main
from qft.errors import UserError
from qft.train import lambda_tag, load_recipe, train
from qft.train.data import load_images, sample_batch


def _recipe_dict(root) -> dict:
    return {
        "arch": "mbt2018-mean",
        "N": 8,
        "M": 8,
        "seed": 3,
        "threads": 1,
        "device": "cpu",
        "batch_size": 2,
        "crop": 64,
        "optimizer": {
            "lr": 1e-3,
            "aux_lr": 1e-3,
            "clip_max_norm": 1.0,
            "decay_at": 0.5,
            "decay_factor": 0.1,
        },
        "data": {
            "root": str(root),
            "train": ["train"],
            "val": "val",
            "val_images": 2,
            "val_crop": 64,
        },
        "checkpoint_every": 2,
        "validate_every": 3,
        "log_every": 2,
        "schedule": {"lambdas": [0.05, 0.01], "first_steps": 6, "warm_steps": 2},
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        (root / split).mkdir()
        for i in range(n):
            img = rng.integers(0, 256, size=(72 + 8 * i, 96, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / split / f"{i}.png")
    return root


@pytest.fixture
def recipe_file(tmp_path, dataset):
    def write(**changes):
        d = _recipe_dict(dataset)
        d.update(changes)
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    return write


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


class TestRecipe:
    def test_missing_file(self, tmp_path):
        with pytest.raises(UserError, match="no such file"):
            load_recipe(tmp_path / "nope.yaml")

    def test_unknown_key(self, recipe_file):
        with pytest.raises(UserError, match="unknown key 'bogus'"):
            load_recipe(recipe_file(bogus=1))

    def test_missing_key(self, recipe_file, tmp_path):
        path = recipe_file()
        d = yaml.safe_load(path.read_text())
        del d["optimizer"]["aux_lr"]
        path.write_text(yaml.safe_dump(d))
        with pytest.raises(UserError, match="missing key 'aux_lr'"):
            load_recipe(path)

    def test_invalid_yaml(self, tmp_path):
        path = tmp_path / "bad.yaml"
        path.write_text("arch: [unclosed\n")
        with pytest.raises(UserError, match="invalid YAML"):
            load_recipe(path)

    def test_lambdas_must_decrease(self, recipe_file):
        with pytest.raises(UserError, match="strictly decreasing"):
            load_recipe(
                recipe_file(
                    schedule={
                        "lambdas": [0.01, 0.05],
                        "first_steps": 1,
                        "warm_steps": 1,
                    }
                )
            )

    def test_schedule_and_lr(self, recipe_file):
        r = load_recipe(recipe_file())
        assert [(p.lmbda, p.steps, p.parent) for p in r.points] == [
            (0.05, 6, None),
            (0.01, 2, 0.05),
        ]
        assert [r.lr_at(s, 6) for s in range(6)] == [1e-3] * 3 + [1e-3 * 0.1] * 3

    def test_cli_reports_user_error(self, tmp_path, capsys):
        assert main(["train", str(tmp_path / "nope.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("qft train: error:")

    def test_stop_after_below_one(self, recipe_file, tmp_path, capsys):
        """qft train and qft finetune (one option, one check) refuse --stop-after 0 in one
        line, before any work."""
        for command, recipe in (("train", [str(recipe_file())]), ("finetune", [])):  # finetune: its default recipe
            out = tmp_path / command
            assert main([command, *recipe, "--stop-after", "0", "--out", str(out)]) == 2
            assert capsys.readouterr().err.strip().splitlines() == [
                f"qft {command}: error: --stop-after must be at least 1"
            ]
            assert not out.exists()


def test_batches_depend_only_on_seed_and_step(dataset):
    images = load_images(dataset, ["train"])
    a = sample_batch(images, 0, 5, 3, 64)
    assert a.shape == (3, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, sample_batch(images, 0, 5, 3, 64))
    assert not torch.equal(a, sample_batch(images, 0, 6, 3, 64))


def test_resume_is_bit_exact(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file())
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(recipe, full, lmbda=0.05, progress=False)
    s = train(recipe, parts, lmbda=0.05, stop_after=3, progress=False)
    assert s[0]["step"] == 3 and not s[0]["finished"]
    with pytest.raises(UserError, match="--resume"):
        train(recipe, parts, lmbda=0.05, progress=False)
    stale = parts / lambda_tag(0.05) / ".checkpoint.pth.x1y2z3.tmp"  # left by a run killed while saving
    stale.write_bytes(b"half")
    s = train(recipe, parts, lmbda=0.05, resume=True, progress=False)
    assert not stale.exists()
    assert s[0]["finished"]
    tag = lambda_tag(0.05)
    a, b = _weights(full / tag / "checkpoint.pth"), _weights(parts / tag / "checkpoint.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    log = [json.loads(line) for line in (parts / tag / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log if e["kind"] == "train"]
    assert steps == sorted(steps) and steps[-1] == 6
    assert {"loss", "bpp", "mse", "lr", "step_time_s"} <= set(log[1])


def test_schedule_warm_start_and_export(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file())
    out = tmp_path / "out"
    summaries = train(recipe, out, progress=False)
    assert [s["init"] for s in summaries] == ["scratch", lambda_tag(0.05)]
    assert all(s["finished"] for s in summaries)
    # resuming a finished schedule trains nothing and changes nothing
    before = _weights(out / lambda_tag(0.01) / "checkpoint.pth")
    train(recipe, out, resume=True, progress=False)
    after = _weights(out / lambda_tag(0.01) / "checkpoint.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)

    ckpt = torch.load(out / lambda_tag(0.01) / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == ckpt["steps"] == 2 and ckpt["lambda"] == 0.01

    sd = torch.load(out / lambda_tag(0.01) / "model.pth", weights_only=True)
    assert sd["g_a.0.weight"].dtype == torch.float16
    model = MeanScaleHyperprior.from_state_dict(sd)
    model.update(force=True)
    assert (model.N, model.M) == (8, 8)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
    assert dec["x_hat"].shape == x.shape


def test_cli_trains_one_point(recipe_file, tmp_path, capsys):
    path = recipe_file()
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                str(path),
                "--lambda",
                "0.01",
                "--out",
                str(out),
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    # parent missing: trained from scratch for first_steps
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["init"] == "scratch" and line["steps"] == 2 and line["finished"]
    assert main(["train", str(path), "--lambda", "0.02", "--out", str(out)]) == 2


def test_init_continues_a_model_checkpoint(recipe_file, tmp_path):
    """--init starts one point from a model file (fp16 export here) for warm_steps."""
    recipe = load_recipe(recipe_file())
    train(recipe, tmp_path / "base", lmbda=0.05, progress=False)
    init = tmp_path / "base" / lambda_tag(0.05) / "model.pth"
    frozen = recipe.replace(lr=1e-12)  # Adam moves each weight by about lr: none here
    (s,) = train(frozen, tmp_path / "cont", lmbda=0.01, init_from=init, progress=False)
    assert s["finished"] and s["steps"] == recipe.warm_steps
    assert s["init"].startswith("model.pth (sha256 ")
    start = torch.load(init, weights_only=True)
    end = _weights(tmp_path / "cont" / lambda_tag(0.01) / "checkpoint.pth")
    for k, v in start.items():
        if k.endswith(".weight"):
            torch.testing.assert_close(end[k], v.float(), rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="--init needs --lambda"):
        train(recipe, tmp_path / "x", init_from=init, progress=False)
    wider = recipe.replace(N=16)
    with pytest.raises(UserError, match="N=8 but the recipe trains N=16"):
        train(wider, tmp_path / "y", lmbda=0.01, init_from=init, progress=False)


def test_amp_key(recipe_file):
    assert load_recipe(recipe_file()).amp is True
    assert load_recipe(recipe_file(amp=False)).amp is False
    with pytest.raises(UserError, match="amp must be true or false"):
        load_recipe(recipe_file(amp="yes"))


def test_training_images_convert_as_the_codec_reads_them(tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(tmp_path / "train" / "grey.png")
    with pytest.warns(UserWarning, match="grayscale image replicated to RGB"):
        (img,) = load_images(tmp_path, ["train"])
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and (img == 200).all()


def test_channel_slice_recipe(recipe_file, tmp_path):
    """A TCM recipe (width parameters under ``params``) trains, resumes from its own
    checkpoint's parameters and exports a model that loads as TCM; a wrong parameter is
    one line."""
    from qft.models import load_checkpoint

    params = {"Z": 8, "attn_dim": 16, "cc_dims": [16, 8]}
    recipe = load_recipe(recipe_file(arch="tcm", N=32, M=20, params=params))
    assert recipe.model_params == {"N": 32, "M": 20, **params}
    (s,) = train(recipe.replace(first_steps=2), tmp_path / "tcm", lmbda=0.05, progress=False)
    assert s["finished"] and np.isfinite(s["val"]["loss"])
    loaded = load_checkpoint(tmp_path / "tcm" / lambda_tag(0.05) / "model.pth")
    assert loaded.arch == "tcm" and loaded.params == {"N": 32, "M": 20, **params}
    with pytest.raises(UserError, match="tcm has no parameter depth"):
        load_recipe(recipe_file(arch="tcm", N=32, M=20, params={"depth": 3}))
    with pytest.raises(UserError, match="params must be a mapping"):
        load_recipe(recipe_file(arch="tcm", params=[1]))


def test_checkerboard_recipe(recipe_file, tmp_path):
    """An MLIC++ recipe trains through the model's own forward and exports a model that
    loads as MLIC++."""
    from test_mlicpp import TINY as TINY_MLICPP  # sibling test module: the family's tiny size

    from qft.models import load_checkpoint

    params = {k: v for k, v in TINY_MLICPP.items() if k not in ("N", "M", "generation")}
    recipe = load_recipe(recipe_file(arch="mlicpp", N=TINY_MLICPP["N"], M=TINY_MLICPP["M"], params=params))
    (s,) = train(recipe.replace(first_steps=2), tmp_path / "mlicpp", lmbda=0.05, progress=False)
    assert s["finished"] and np.isfinite(s["val"]["loss"])
    loaded = load_checkpoint(tmp_path / "mlicpp" / lambda_tag(0.05) / "model.pth")
    assert loaded.arch == "mlicpp"
