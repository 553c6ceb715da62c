"""``qft ship`` / :func:`qft.finetune.ship.ship_finetune`: a finished finetuning run as a
delta checkpoint of its base and a manifest entry, on a tiny model and synthetic images."""

from __future__ import annotations

import json

import pytest
import torch

from finetune_helpers import LAMBDA, tiny_base, write_images, write_recipe  # sibling helper module

from qft.cli import main
from qft.errors import UserError
from qft.finetune import ship_finetune
from qft.models import load_checkpoint
from qft.models.zoo import read_manifest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base checkpoint in ``models/`` with a manifest, a decoder-only USQ run from it and
    a decoder+hyperdecoder run continued from that run (2 steps each)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ship")
    write_images(root / "data" / "train", [(200, 208)] * 2)
    base = tiny_base(root / "models" / "base.pth")
    (root / "models" / "manifest.json").write_text(json.dumps([{"file": "base.pth", "lambda": LAMBDA}]) + "\n")
    path = root / "recipe.yaml"
    write_recipe(path, base, root / "data", steps=2, method="usq", lambda_mult=None, weights="none")
    one, two = root / "runs" / "one", root / "runs" / "two"
    assert main(["finetune", str(path), "--out", str(one), "--no-progress"]) == 0
    assert (
        main(
            [
                "finetune",
                str(path),
                "-m",
                str(one / "model.pth"),
                "--parts",
                "decoder+hyperdecoder",
                "--out",
                str(two),
                "--no-progress",
            ]
        )
        == 0
    )
    return {"root": root, "base": base, "one": one, "two": two}


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_ship_one_run(runs, tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    base = folder / "base.pth"
    base.write_bytes(runs["base"].read_bytes())  # a folder of its own: no manifest yet
    assert main(["ship", str(runs["one"]), "--base", str(base)]) == 0
    printed = json.loads(capsys.readouterr().out)
    delta = folder / "base-ft-usq.pth"
    [entry] = read_manifest(folder)
    assert printed["file"] == entry["file"] == delta.name
    assert entry["finetuned_from"] == "base.pth" and entry["parts"] == "decoder" and entry["steps"] == 2
    assert entry["quantizer"]["method"] == "usq" and entry["control"] is False and entry["lambda"] == LAMBDA
    assert (entry["arch"], entry["N"], entry["M"]) == ("mbt2018-mean", 16, 24)
    assert entry["bytes"] == delta.stat().st_size and entry["dtype"] == "float16 delta of the base (g_s.)"
    assert "stages" not in entry and entry["recipe"].endswith("recipe.yaml")
    assert entry["train_data"].endswith("data: train")
    # only g_s, in fp16; the delta loads to the run's decoder (to fp16 precision) and the base's rest
    saved = _state(delta)["state_dict"]
    assert saved and all(k.startswith("g_s.") and v.dtype == torch.float16 for k, v in saved.items())
    shipped, trained = load_checkpoint(delta).model.state_dict(), _state(runs["one"] / "model.pth")["state_dict"]
    base_sd = _state(base)["state_dict"]
    for k, v in shipped.items():
        if k.startswith("g_s."):
            assert torch.equal(v, trained[k].half().float()), k
        elif k.startswith(("g_a.", "h_a.", "h_s.")):
            assert torch.equal(v, base_sd[k]), k
    assert not list(folder.glob(".*.tmp"))


def test_ship_refuses_to_overwrite(runs, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    base = folder / "base.pth"
    base.write_bytes(runs["base"].read_bytes())
    ship_finetune([runs["one"]], base, name="ft")
    manifest, delta = (folder / "manifest.json").read_bytes(), (folder / "ft.pth").read_bytes()
    with pytest.raises(UserError, match="already in"):
        ship_finetune([runs["one"]], base, name="ft")
    (folder / "ft.pth").unlink()  # the entry alone still blocks the name
    with pytest.raises(UserError, match="already in"):
        ship_finetune([runs["one"]], base, name="ft")
    assert (folder / "manifest.json").read_bytes() == manifest and not (folder / "ft.pth").exists()
    assert main(["ship", str(runs["one"]), "--base", str(base), "--name", "ft"]) == 2
    (folder / "ft.pth").write_bytes(delta)


def test_ship_stages(runs):
    """Two runs, base side first: one delta with g_s and h_s, steps counted over both stages;
    the default base is the one the first run started from, its folder gets the file."""
    entry = ship_finetune([runs["one"], runs["two"]])
    folder = runs["base"].parent
    assert entry["file"] == "base-ft-usq-hyperdecoder.pth" and (folder / entry["file"]).is_file()
    assert read_manifest(folder)[-1] == entry
    assert entry["steps"] == 4 and entry["parts"] == "decoder+hyperdecoder"
    assert [s["parts"] for s in entry["stages"]] == ["decoder", "decoder+hyperdecoder"]
    assert [s["requantize_every"] for s in entry["stages"]] == [0, 0]
    assert entry["dtype"] == "float16 delta of the base (g_s., h_s.)"
    prefixes = {k.split(".")[0] for k in _state(folder / entry["file"])["state_dict"]}
    assert prefixes == {"g_s", "h_s"}
    ck = load_checkpoint(folder / entry["file"])
    assert ck.extra["steps"] == 4 and ck.extra["delta_of"] == "base.pth"


def test_ship_refuses_a_broken_chain_or_unfinished_run(runs, tmp_path):
    with pytest.raises(UserError, match="was not finetuned from"):
        ship_finetune([runs["two"]], runs["base"], name="x")  # stage 2 alone: its parent is stage 1
    with pytest.raises(UserError, match="no finished qft finetune run"):
        ship_finetune([tmp_path], runs["base"], name="x")
    with pytest.raises(UserError, match="not found"):
        ship_finetune([runs["one"]], tmp_path / "missing.pth", name="x")
    assert not (runs["base"].parent / "x.pth").exists()


def test_no_delta_without_its_entry(runs, tmp_path, monkeypatch):
    import qft.finetune.ship as ship

    def fail(entry, folder):
        raise OSError("disk full")

    base = tmp_path / "base.pth"
    base.write_bytes(runs["base"].read_bytes())
    monkeypatch.setattr(ship, "add_manifest_entry", fail)
    with pytest.raises(OSError):
        ship_finetune([runs["one"]], base, name="ft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.pth"]
