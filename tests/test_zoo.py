"""qft.models.zoo: shipped checkpoints by name, finetuned delta checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from qft.errors import UserError
from qft.models import create_model, load_checkpoint, save_checkpoint
from qft.models.zoo import (
    ASSETS,
    MANIFEST,
    add_manifest_entry,
    base_entries,
    read_manifest,
    resolve,
    shipped,
    write_delta,
)


def test_manifest_names_resolve_to_files():
    entries = shipped()
    assert entries, "the package ships reference checkpoints"
    for e in entries:
        path = resolve(e["name"])
        assert path == ASSETS / e["file"] and path.is_file()
        if "finetuned_from" in e:
            assert (ASSETS / e["finetuned_from"]).is_file()


def test_shipped_checkpoints_fit_the_budget():
    """The manifest's sizes are the files' and all together stay within 50 MB."""
    entries = shipped()
    for e in entries:
        assert (ASSETS / e["file"]).stat().st_size == e["bytes"], e["file"]
    assert sum(e["bytes"] for e in entries) <= 50e6


def test_unknown_name_points_to_the_list():
    with pytest.raises(UserError, match=r"does not exist .*mbt2018-mean-.*qft models --shipped"):
        resolve("no-such-model")


def test_models_shipped_lists_every_entry(capsys):
    from qft.cli import main

    assert main(["models", "--shipped", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [e["name"] for e in shipped()]
    what = {r["name"]: r["trained"] for r in rows}
    # continued from the first shipped file by 6,000 steps (manifest "history")
    assert what["mbt2018-mean-0.013"] == "reference model, 7,500 training steps"
    assert what["mbt2018-mean-0.013-ft-control"].startswith("decoder finetuned: 600 steps noise proxy")
    assert what["mbt2018-mean-0.013-ft-tcq8-hyperdecoder"] == (
        "decoder+hyperdecoder finetuned: 600 steps noise proxy, then 600 steps on tcq8 latents"
        " (from mbt2018-mean-0.013.pth)"
    )
    assert main(["models", "--shipped"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "arch", "λ", "MB", "what"] and len(lines) == len(rows) + 1


def test_shipped_name_loads():
    entry = next(e for e in shipped() if "finetuned_from" not in e)
    ck = load_checkpoint(entry["name"])
    assert ck.arch == "mbt2018-mean" and ck.path == entry["name"]
    # a shipped base is a bare state_dict: its λ comes from the manifest (finetune needs it)
    assert ck.extra["lambda"] == entry["lambda"]


def test_copied_shipped_file_gets_no_manifest_lambda(tmp_path):
    entry = next(e for e in shipped() if "finetuned_from" not in e)
    copy = tmp_path / entry["file"]
    copy.write_bytes((ASSETS / entry["file"]).read_bytes())
    assert "lambda" not in load_checkpoint(copy).extra


@pytest.fixture
def base(tmp_path):
    model = create_model("mbt2018-mean", N=8, M=12, seed=0)
    path = tmp_path / "base.pth"
    save_checkpoint(path, model, "mbt2018-mean", {"N": 8, "M": 12}, extra={"lambda": 0.01})
    return path, model


def test_delta_roundtrip(base, tmp_path):
    path, model = base
    with torch.no_grad():
        for p in model.g_s.parameters():
            p.add_(0.125)  # exactly representable: fp16 keeps it
    delta = tmp_path / "ft.pth"
    write_delta(delta, model, path, ("g_s.",), {"quantizer": {"method": "tcq8"}})
    saved = torch.load(delta, weights_only=True)
    assert all(k.startswith("g_s.") for k in saved["state_dict"])
    ck = load_checkpoint(delta)
    assert ck.extra["quantizer"] == {"method": "tcq8"} and ck.extra["delta_of"] == "base.pth"
    got, want = ck.model.state_dict(), model.state_dict()
    for k, v in want.items():
        if k.startswith(("g_s.", "g_a.", "h_s.")):
            assert torch.equal(got[k], v.half().float() if k.startswith("g_s.") else v), k
    with pytest.raises(UserError, match="exists"):
        write_delta(delta, model, path, ("g_s.",))


def test_delta_with_other_base_refused(base, tmp_path):
    path, model = base
    delta = tmp_path / "ft.pth"
    write_delta(delta, model, path, ("g_s.",))
    save_checkpoint(
        path, create_model("mbt2018-mean", N=8, M=12, seed=1), "mbt2018-mean", {"N": 8, "M": 12}, force=True
    )
    with pytest.raises(UserError, match="finetuned from another base.pth"):
        load_checkpoint(delta)
    path.unlink()
    with pytest.raises(UserError, match="neither beside it nor shipped"):
        load_checkpoint(delta)


def test_manifest_of_any_folder(tmp_path):
    """read_manifest / base_entries / add_manifest_entry: the shipped manifest or any
    folder's; an entry is appended atomically and a listed file name is refused."""
    assert read_manifest(tmp_path) == [] and base_entries(tmp_path) == []
    assert [e["file"] for e in base_entries()] == [
        e["file"] for e in sorted(shipped(), key=lambda e: e["lambda"]) if "finetuned_from" not in e
    ]
    add_manifest_entry({"file": "b.pth", "lambda": 0.02}, tmp_path)
    add_manifest_entry({"file": "a.pth", "lambda": 0.01}, tmp_path)
    add_manifest_entry({"file": "a-ft.pth", "lambda": 0.01, "finetuned_from": "a.pth"}, tmp_path)
    assert [e["file"] for e in read_manifest(tmp_path)] == ["b.pth", "a.pth", "a-ft.pth"]
    assert [(e["file"], e["name"]) for e in base_entries(tmp_path)] == [("a.pth", "a"), ("b.pth", "b")]
    before = (tmp_path / MANIFEST).read_bytes()
    with pytest.raises(UserError, match="already lists a.pth"):
        add_manifest_entry({"file": "a.pth", "lambda": 0.5}, tmp_path)
    assert (tmp_path / MANIFEST).read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_manifest_split_into_bases_and_finetunes():
    from qft.models.zoo import base_entries, is_finetuned, shipped_finetunes

    bases, finetunes = base_entries(), shipped_finetunes()
    assert bases and not any(is_finetuned(e) for e in bases)
    assert [e["lambda"] for e in bases] == sorted(e["lambda"] for e in bases)
    assert all(is_finetuned(e) for e in finetunes)
    assert sorted(e["name"] for e in bases + finetunes) == sorted(e["name"] for e in shipped())
