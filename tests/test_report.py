"""qft report / calibrate / quickstart and the per-checkpoint settings file."""

from __future__ import annotations

import json
import math
import shutil

from pathlib import Path

import numpy as np
import pytest

from PIL import Image

import qft

from qft.cli import main
from qft.codec import RDTarget
from qft.errors import UserError
from qft.eval.bdrate import local_rate_change, pareto_front
from qft.models import create_model, load_checkpoint, save_checkpoint
from qft.models.zoo import write_delta
from qft.settings import read_settings, resolve_quantizer, settings_path, write_settings


def test_local_rate_change():
    anchor = [(1.0, 30.0), (2.0, 33.0), (4.0, 36.0)]
    assert local_rate_change(anchor, (2.0, 33.0)) == pytest.approx(0.0)
    assert local_rate_change(anchor, (1.8, 33.0)) == pytest.approx(-10.0)
    # log-rate interpolated: halfway in PSNR between 2 and 4 bpp is 2√2
    assert local_rate_change(anchor, (2 * 2**0.5, 34.5)) == pytest.approx(0.0)
    assert math.isnan(local_rate_change(anchor, (1.0, 37.0)))  # outside the anchor
    assert math.isnan(local_rate_change([(1.0, 30.0), (2.0, 29.0)], (1.5, 29.5)))  # one point on the front
    # a dominated sweep point (more rate, less quality: the decoder saturates) is not the anchor
    assert local_rate_change([*anchor, (5.0, 35.0)], (1.8, 33.0)) == pytest.approx(-10.0)


def test_pareto_front():
    assert pareto_front([1, 2, 3, 4], [30, 32, 31, 33]) == [0, 1, 3]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # smooth images: the random decoders reproduce them better
        a = np.cumsum(rng.integers(0, 9, (64, 96, 3)), axis=1) % 256
        Image.fromarray(a.astype(np.uint8)).save(root / "img" / f"{i}.png")
    ckpts = []
    for k in range(2):
        path = root / f"m{k}.pth"
        save_checkpoint(path, create_model("mbt2018-mean", N=16, M=16, seed=k), "mbt2018-mean", {"N": 16, "M": 16})
        ckpts.append(path)
    return root, ckpts


def test_settings_precedence_and_identity(setup, recwarn):
    root, ckpts = setup
    ck = load_checkpoint(ckpts[0])
    assert read_settings(ck) == {}
    c = resolve_quantizer("tcq8", {})
    assert c.source == "default" and c.quantizer.step == 0.7 and c.weights is None
    w = [1.0 + i / 16 for i in range(16)]
    write_settings(
        ckpts[0],
        ck.sha256,
        {"weights": {"decoder": w}, "methods": {"tcq8": {"step": 0.8, "lambda_mult": 0.1, "weights": "decoder"}}},
    )
    s = read_settings(ck)
    c = resolve_quantizer("tcq8", s)
    assert c.source == "calibrated" and c.quantizer.step == 0.8 and np.array_equal(c.weights, w)
    assert resolve_quantizer("tcq8", s, weights="none").weights is None
    by = {
        "none": {"step": 0.63, "lambda_mult": 0.05, "weights": "none"},
        "decoder": {"step": 0.9, "lambda_mult": 0.025, "weights": "decoder"},
    }
    s2 = s | {"methods": {"tcq8": {**by["decoder"], "by_weights": by}}}
    assert resolve_quantizer("tcq8", s2).quantizer.step == 0.9  # calibrated choice: weighted
    assert resolve_quantizer("tcq8", s2, weights="none").quantizer.step == 0.63  # calibrated unweighted
    assert resolve_quantizer("tcq8", s, step=0.6).quantizer.step == 0.6  # explicit wins
    assert resolve_quantizer("tcq8", s, step_scale=2).quantizer.lam == pytest.approx(
        4 * resolve_quantizer("tcq8", s).quantizer.lam
    )
    with pytest.raises(UserError, match="no decoder weights"):
        resolve_quantizer("tcq8", {}, weights="decoder")
    # the decoder target: calibrated per pick, explicit values win, USQ's default stays 0
    by_t = {w: p | {"target": 0.25 if w == "decoder" else 0.0} for w, p in by.items()}
    s3 = s | {"methods": {"tcq8": {**by_t["decoder"], "by_weights": by_t}}}
    assert resolve_quantizer("tcq8", s3).target == 0.25 and resolve_quantizer("tcq8", s3, weights="none").target == 0
    assert resolve_quantizer("tcq8", s3, target=0.0).target == 0 and resolve_quantizer("usq", s3).target == 0
    assert resolve_quantizer("usq", s3, target=0.125).describe()["target"] == 0.125
    with pytest.raises(UserError, match="--target"):
        resolve_quantizer("tcq8", s3, target=-0.5)
    # rd: the per-image choice at the model's training λ, which the settings must know
    assert "model_lambda" not in s
    with pytest.raises(UserError, match="does not record"):
        resolve_quantizer("tcq8", s, target="rd")
    rd = resolve_quantizer("tcq8", s | {"model_lambda": 0.013}, target="rd")
    assert rd.target == RDTarget(0.013) and rd.describe()["target"] == "rd"
    s4 = s | {"model_lambda": 0.013, "methods": {"tcq8": {**by["none"], "target": "rd"}}}
    assert resolve_quantizer("tcq8", s4).target == RDTarget(0.013)  # a calibrated (or recorded) rd
    # a finetuned delta reads its base's settings
    delta = root / "ft.pth"
    q = {"method": "tcq8", "step": 0.65, "lam": 0.01, "theta": 0.5, "reset": "channel"}

    def finetuned(extra: dict | None = None) -> dict:
        """The settings read for a delta of ckpts[0] (g_s) whose metadata holds ``extra``."""
        delta.unlink(missing_ok=True)
        write_delta(delta, ck.model, ckpts[0], ("g_s.",), extra)
        return read_settings(load_checkpoint(delta))

    assert finetuned()["methods"]["tcq8"]["step"] == 0.8
    # a finetuned model defaults to the quantizer it was finetuned on (λ follows Δ²)
    c = resolve_quantizer("tcq8", finetuned({"quantizer": q}), step_scale=2)
    assert (c.quantizer.step, c.quantizer.lam, c.weights, c.target) == (1.3, pytest.approx(0.04), None, 0.0)
    # finetuned on plain latents: the encoder-side target is the base's calibrated one
    write_settings(
        ckpts[0],
        ck.sha256,
        {"methods": {"tcq8": {"step": 0.8, "lambda_mult": 0.1, "weights": "decoder", "target": 0.25}}},
    )
    c = resolve_quantizer("tcq8", read_settings(load_checkpoint(delta)))
    assert (c.quantizer.step, c.weights, c.target) == (0.65, None, 0.25)
    assert resolve_quantizer("tcq8", finetuned({"quantizer": {**q, "target": 0.125}})).target == 0.125
    rd_delta = finetuned({"lambda": 0.02, "quantizer": {**q, "target": "rd"}})
    assert resolve_quantizer("tcq8", rd_delta).target == RDTarget(0.02)
    # another checkpoint's file is ignored with a warning
    other = load_checkpoint(ckpts[1])
    settings_path(ckpts[1]).write_text(settings_path(ckpts[0]).read_text())
    with pytest.warns(UserWarning, match="another checkpoint"):
        assert read_settings(other) == {}
    settings_path(ckpts[1]).unlink()
    settings_path(ckpts[0]).unlink()
    delta.unlink()


def test_weights_change_the_stream_not_the_decoder(setup, tmp_path, capsys):
    root, ckpts = setup
    w = np.geomspace(0.01, 100, 16)
    np.save(tmp_path / "w.npy", w)
    img = root / "img" / "0.png"

    def code(name: str, *extra: str) -> bytes:
        """``qft compress`` with TCQ-8 (Δ 0.1, λ_T 1e-3) and ``extra``, then ``qft
        decompress`` of its stream; the stream's bytes."""
        stream = tmp_path / f"{name}.qft"
        args = ["-m", str(ckpts[0]), "-q", "tcq8", "--step", "0.1", "--lambda-t", "1e-3", *extra]
        assert main(["compress", *args, str(img), "-o", str(stream)]) == 0
        assert main(["decompress", str(stream), "-m", str(ckpts[0]), "-o", str(tmp_path / f"{name}.png")]) == 0
        return stream.read_bytes()

    a = code("a")
    assert code("b", "--weights", str(tmp_path / "w.npy")) != a
    assert len(a) > 100  # a latent with many nonzero indices
    assert main(["compress", "-m", str(ckpts[0]), "--step", "0.01", str(img), "-o", str(tmp_path / "c.qft")]) == 2
    assert "too small for the 16-bit coding tables" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "-m", str(ckpts[0]), "--target", "-1", str(img), "-o", str(tmp_path / "d.qft")])
    assert "expected auto, rd or a number >= 0" in capsys.readouterr().err
    assert code("t", "--target", "0.25") != a


def test_report_end_to_end_and_resume(setup, tmp_path, capsys):
    root, ckpts = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: tiny
data: {root / "img"}
out: {tmp_path / "out"}
models:
  - {{label: base, checkpoints: [{ckpts[0]}, {ckpts[1]}]}}
extra_rows:
  - {{label: other, checkpoints: [{ckpts[1]}, null], quantizers: [tcq8]}}
  - {{label: ft-usq, checkpoints: [{ckpts[1]}, {ckpts[0]}], quantizers: [usq]}}
  - {{label: control-usq, checkpoints: [{ckpts[0]}, {ckpts[1]}], quantizers: [usq],
     settings_from: [{ckpts[1]}, {ckpts[0]}]}}
  - {{label: usq-again, checkpoints: [{ckpts[1]}, {ckpts[0]}], quantizers: [usq], control: control-usq}}
quantizers: [usq, {{label: tcq8, method: tcq8, lambda_mult: 0.1}}]
sweep: [0.9, 1.2]
sweep_quantizers: [usq, tcq8]
ms_ssim: false
versus: {{tcq8: usq}}
""")
    assert main(["report", str(recipe), "--no-progress"]) == 0
    out = tmp_path / "out"
    cells = sorted((out / "cells").iterdir())
    # base: 2 quantizers x 3 scales per rate point; other's cell (m1, tcq8) is base's: shared
    assert len(cells) == 2 * 2 * 3
    summary = json.loads((out / "bdrate.json").read_text())
    rows = {(r["row"], r["quantizer"]): r for r in summary["rows"]}
    assert set(rows) == {
        ("base", "tcq8"),
        ("other", "tcq8"),
        ("ft-usq", "usq"),
        ("control-usq", "usq"),
        ("usq-again", "usq"),
    }
    # a row named otherwise, paired with its control by the row's `control` field
    again, ft = rows[("usq-again", "usq")]["vs_control"], rows[("ft-usq", "usq")]["vs_control"]
    assert again.pop("test") == "usq-again/usq" and ft.pop("test") == "ft-usq/usq"
    assert again == ft
    assert rows[("other", "tcq8")]["vs_base_same_quantizer"]["rate_points"] == [0]
    assert rows[("ft-usq", "usq")]["vs_control"]["rate_points"] == [0, 1]
    assert rows[("other", "tcq8")]["vs_control"] is None
    # versus: a row's TCQ-8 against the same row's USQ (for the base row: its vs_base_usq)
    assert rows[("base", "tcq8")]["vs_quantizer"] == rows[("base", "tcq8")]["vs_base_usq"]
    assert rows[("other", "tcq8")]["vs_quantizer"] is None  # the row has no USQ
    assert "anchor: the same model under" in (out / "bdrate.md").read_text()
    res = json.loads((out / "results" / "base-usq.json").read_text())
    assert len(res["results"]["bpp"]) == 2 and res["qft"]["checkpoints"][0]["quantizer"]["method"] == "usq"
    assert all(b > 0 for b in res["results"]["bpp"])
    assert (out / "rd-psnr-rgb.png").stat().st_size > 0 and (out / "per_image.md").is_file()
    mtimes = [c.stat().st_mtime_ns for c in cells]
    assert main(["report", str(recipe), "--no-progress"]) == 0  # resumes: no cell rewritten
    assert [c.stat().st_mtime_ns for c in sorted((out / "cells").iterdir())] == mtimes


def test_bd_over_the_rate_points_on_both_fronts():
    """A test curve that turns down at its last point (a larger-λ model no better than the
    one below) drops that point from both curves; the BD is the one over the rest."""
    from qft.eval import report
    from qft.eval.bdrate import bd_rate

    def cell(bpp, psnr):
        return {"images": [{"bpp": bpp, "psnr-rgb": psnr, "ms-ssim-rgb": 0.9}]}

    anchor = [(0.3, 28.0), (0.45, 29.5), (0.6, 30.5), (0.8, 31.0), (0.95, 31.1)]
    test = [(0.28, 28.1), (0.4, 29.4), (0.55, 30.5), (0.75, 31.1), (0.9, 31.05)]
    curves = {
        ("base", "usq"): [(i, cell(*p)) for i, p in enumerate(anchor)],
        ("base", "tcq8"): [(i, cell(*p)) for i, p in enumerate(test)],
    }
    recipe = report.ReportRecipe(name="t", data="", out="", quantizers=(), rows=(), sweep=())
    out = report._compare(recipe, {}, curves, ("base", "tcq8"), ("base", "usq"))["psnr-rgb"]
    assert out["pareto_points"] == [0, 1, 2, 3]
    expected = bd_rate(
        {"bpp": [p[0] for p in anchor[:4]], "psnr-rgb": [p[1] for p in anchor[:4]]},
        {"bpp": [p[0] for p in test[:4]], "psnr-rgb": [p[1] for p in test[:4]]},
        "psnr-rgb",
    )["pchip"]
    assert out["bd_pchip"] == pytest.approx(expected) and out["bd_pchip"] < 0


def test_report_without_row_sweeps(setup, tmp_path):
    """sweep_rows: false evaluates the base under another row's quantizer at step scale 1
    only: no sweep cells for it, and that row's same-quantizer column has no local value."""
    root, ckpts = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
data: {root / "img"}
out: {tmp_path / "out"}
models:
  - {{label: base, checkpoints: [{ckpts[0]}, {ckpts[1]}], quantizers: [usq]}}
  - {{label: other, checkpoints: [{ckpts[1]}, null], quantizers: [tcq8]}}
quantizers: [usq, {{label: tcq8, method: tcq8, lambda_mult: 0.1}}]
sweep: [0.9, 1.2]
sweep_rows: false
ms_ssim: false
""")
    assert main(["report", str(recipe), "--no-progress"]) == 0
    # base USQ swept (2 points x 3 scales), the base under other's TCQ-8 at scale 1 (point 0),
    # other's own cell; with the row sweeps there would be two more
    assert len(list((tmp_path / "out" / "cells").iterdir())) == 2 * 3 + 1 + 1
    summary = json.loads((tmp_path / "out" / "bdrate.json").read_text())
    other = next(r for r in summary["rows"] if r["row"] == "other")
    assert other["vs_base_same_quantizer"]["psnr-rgb"]["local"] == [None]
    assert other["vs_base_usq"]["rate_points"] == [0]


def test_report_rows_sharing_a_checkpoint_file_content(setup, tmp_path):
    """Two rows whose checkpoints are copies of one file (other paths, same weights) share
    their cells, and each row still finds its own (it used to lose the first owner)."""
    root, ckpts = setup
    copy = tmp_path / "copy.pth"
    shutil.copy(ckpts[0], copy)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
data: {root / "img"}
images: 1
out: {tmp_path / "out"}
models:
  - {{label: base, checkpoints: [{ckpts[0]}, {ckpts[1]}]}}
  - {{label: copy, checkpoints: [{copy}, null], quantizers: [usq]}}
quantizers: [usq]
sweep: []
ms_ssim: false
same_quantizer: false
""")
    assert main(["report", str(recipe), "--no-progress"]) == 0
    summary = json.loads((tmp_path / "out" / "bdrate.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["copy"]


def test_shipped_rows_evaluate_the_control_arm_like_each_finetuned_row(monkeypatch):
    from qft.eval import report
    from qft.models import zoo

    def entry(name, lmbda, **ft):
        return {"name": name, "file": f"{name}.pth", "lambda": lmbda, **ft}

    def ft(base, method, control=False):
        return {
            "finetuned_from": f"{base}.pth",
            "quantizer": {"method": method},
            "parts": "decoder",
            "control": control,
        }

    entries = [
        entry("b2", 0.02),
        entry("b1", 0.01),
        entry("b1-ft-usq", 0.01, **ft("b1", "usq")),
        entry("b1-ft-tcq8", 0.01, **ft("b1", "tcq8")),
        entry("b2-ft-tcq8", 0.02, **ft("b2", "tcq8")),
        entry("b1-ft-control", 0.01, **ft("b1", "usq", True)),
    ]
    monkeypatch.setattr(zoo, "read_manifest", lambda folder=zoo.ASSETS: entries)
    rows = {r.label: r for r in report.shipped_rows(["usq", "tcq8"])}
    assert rows["base"].checkpoints == ("b1", "b2")
    assert rows["ft-tcq8"].checkpoints == ("b1-ft-tcq8", "b2-ft-tcq8")
    assert rows["control-tcq8"].checkpoints == ("b1-ft-control", None)
    assert rows["control-tcq8"].settings_from == ("b1-ft-tcq8", "b2-ft-tcq8")
    assert rows["control-usq"].quantizers == ("usq",) and rows["control-usq"].settings_from == ("b1-ft-usq", None)


def test_report_recipe_errors(tmp_path):
    from qft.eval.report import load_report_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nquantizers: [usq]\nmodels: [{label: a, checkpoints: [a.pth]}]\nfoo: 1\n")
    with pytest.raises(UserError, match="unknown field"):
        load_report_recipe(bad)
    for row, match in [
        ("{label: a, checkpoints: [a.pth], chekpoint: 1}", r"row a: unknown field\(s\) \['chekpoint'\]"),
        ("{labl: a, checkpoints: [a.pth]}", r"models\[0\]: unknown field\(s\) \['labl'\]"),
        ("{label: a, checkpoint: [a.pth]}", r"row a: unknown field\(s\) \['checkpoint'\]"),
        ("{label: a}", r"row a: missing field\(s\) \['checkpoints'\]"),
        ("{label: a, checkpoints: a.pth}", "row a: checkpoints is a list"),
        ("a.pth", r"models\[0\] is a mapping"),
    ]:
        bad.write_text(f"data: x\nquantizers: [usq]\nmodels: [{row}]\n")
        with pytest.raises(UserError, match=match):
            load_report_recipe(bad)
    bad.write_text("data: x\nquantizers: [usq]\nmodels: [{label: a, checkpoints: [a.pth], control: c}]\n")
    with pytest.raises(UserError, match="control row 'c' is not a row"):
        load_report_recipe(bad)
    bad.write_text("data: x\nquantizers: [{method: tcq8, target: -1}]\nmodels: [{label: a, checkpoints: [a.pth]}]\n")
    with pytest.raises(UserError, match="target must be auto, rd or a number >= 0"):
        load_report_recipe(bad)
    bad.write_text(
        "data: x\nquantizers: [{method: tcq8, plain_rows: 40}]\nmodels: [{label: a, checkpoints: [a.pth]}]\n"
    )
    with pytest.raises(UserError, match="plain_rows must be an integer"):
        load_report_recipe(bad)
    bad.write_text(
        "data: x\nquantizers: [{method: tcq8, plain_rows: 12}]\nmodels: [{label: a, checkpoints: [a.pth]}]\n"
    )
    assert load_report_recipe(bad).quantizers[0].plain_rows == 12
    bad.write_text("data: x\nquantizers: [usq]\nmodels: [{label: a, checkpoints: [a.pth]}]\nversus: {tcq8: usq}\n")
    with pytest.raises(UserError, match="versus maps quantizer labels"):
        load_report_recipe(bad)


def test_calibrate_writes_settings_and_refuses_test_sets(setup, tmp_path, capsys):
    root, ckpts = setup
    kodak = tmp_path / "kodak"
    kodak.mkdir()
    assert main(["calibrate", "-m", str(ckpts[1]), "--data", str(kodak)]) == 2
    assert "looks like a test set" in capsys.readouterr().err
    assert (
        main(
            [
                "calibrate",
                "-m",
                str(ckpts[1]),
                "--data",
                str(root / "img"),
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
                "--weights",
                "--targets",
                "0.25",
            ]
        )
        == 0
    )
    with pytest.raises(SystemExit):
        main(["calibrate", "-m", str(ckpts[1]), "--data", str(root / "img"), "--targets", "0"])
    assert "expected rd or a number > 0" in capsys.readouterr().err
    settings = json.loads(settings_path(ckpts[1]).read_text())
    w = np.asarray(settings["weights"]["decoder"])
    assert w.shape == (16,) and (w > 0).all() and len(settings["weights"]["sensitivity"]) == 16
    assert settings["checkpoint_sha256"] == load_checkpoint(ckpts[1]).sha256
    grid = settings["calibration"]["grid"]
    # the joint search: USQ's sweep and the whole grid, without the target and with η = 0.25
    for t in (0.0, 0.25):
        assert [(g["method"], g["weights"]) for g in grid if g["target"] == t] == [("usq", "none")] * 9 + [
            ("tcq8", "none"),
            ("tcq8", "decoder"),
        ]
    assert all(g["bpp"] > 0 for g in grid)
    assert all(g["saving_vs_usq_target"] == g["saving"] for g in grid if g["target"] == 0)
    assert set(settings["calibration"]["usq_target"]) == {"0.25"}
    settings_path(ckpts[1]).unlink()


def test_calibrate_keeps_the_best_target(monkeypatch):
    """The joint search on synthetic RD points: a pick keeps the η with the best saving."""
    from qft.eval import calibrate as cal

    def fake_evaluate(ck, grid, images, settings, desc):
        for g in grid:
            if g["method"] == "usq":  # PSNR = 30 + 3 log2(bpp); the target buys 0.5 dB
                g["bpp"] = 1.0 / g["step"]
                g["psnr"] = 30 + 3 * math.log2(g["bpp"]) + (0.5 if g["target"] else 0.0)
            else:  # 3 % below USQ at 30 dB; 8 % with η = 0.25, no better with 0.125
                g["bpp"], g["psnr"] = (0.92 if g["target"] == 0.25 else 0.97), 30.0

    monkeypatch.setattr(cal, "_evaluate_grid", fake_evaluate)
    out = cal.calibrate_checkpoint(
        None, [], {}, methods=("tcq8",), steps=(0.7,), mults=(0.05,), targets=(0.25, 0.125, 0.0)
    )
    pick = out["methods"]["tcq8"]
    assert pick["target"] == 0.25 and pick["saving"] == pytest.approx(-8.0)
    assert pick["by_weights"]["none"]["target"] == 0.25
    assert out["calibration"]["usq_target"]["0.125"] == pytest.approx(100 * (2 ** (-0.5 / 3) - 1))
    no_gain = cal.calibrate_checkpoint(None, [], {}, methods=("tcq8",), steps=(0.7,), mults=(0.05,), targets=(0.125,))
    assert no_gain["methods"]["tcq8"]["target"] == 0.0 and no_gain["methods"]["tcq8"]["saving"] == pytest.approx(-3.0)
    # with the model's λ the RD cost decides, also beyond USQ's PSNR range (no saving there)

    def beyond(ck, grid, images, settings, desc):
        fake_evaluate(ck, grid, images, settings, desc)
        for g in grid:
            if g["method"] == "tcq8" and g["target"] == 0.125:
                g["bpp"], g["psnr"] = 1.3, 34.0  # above the USQ curve's 30.97 dB

    monkeypatch.setattr(cal, "_evaluate_grid", beyond)
    kw = dict(methods=("tcq8",), steps=(0.7,), mults=(0.05,), targets=(0.125,))
    assert cal.calibrate_checkpoint(None, [], {}, **kw)["methods"]["tcq8"]["target"] == 0.0
    out = cal.calibrate_checkpoint(None, [], {}, lmbda=0.01, **kw)
    assert out["methods"]["tcq8"]["target"] == 0.125 and out["methods"]["tcq8"]["saving"] is None
    # rd (η per image) joins the search after the fixed values and competes like them

    def with_rd(ck, grid, images, settings, desc):
        fake_evaluate(ck, grid, images, settings, desc)
        for g in grid:
            if g["method"] == "tcq8" and g["target"] == "rd":
                g["bpp"], g["psnr"] = 0.9, 30.0

    monkeypatch.setattr(cal, "_evaluate_grid", with_rd)
    out = cal.calibrate_checkpoint(None, [], {}, methods=("tcq8",), steps=(0.7,), mults=(0.05,), targets=("rd", 0.25))
    assert [g["target"] for g in out["calibration"]["grid"] if g["method"] == "tcq8"] == [0.0, 0.25, "rd"]
    assert out["methods"]["tcq8"]["target"] == "rd" and out["methods"]["tcq8"]["saving"] == pytest.approx(-10.0)
    assert set(out["calibration"]["usq_target"]) == {"0.25", "rd"}


def test_calibrate_chooses_step_with_the_target(monkeypatch):
    """Δ is chosen with the target on, against USQ with the same target (issue 24): a step
    that loses without the target but wins with it is the target's pick; a step that moves
    the rate out of ``RATE_BAND`` around USQ's is not, whatever it saves against the sweep."""
    from qft.eval import calibrate as cal

    def fake_evaluate(ck, grid, images, settings, desc):
        for g in grid:
            if g["method"] == "usq":  # PSNR = 30 + 3 log2(bpp); the target buys 0.5 dB
                g["bpp"] = 1.0 / g["step"]
                g["psnr"] = 30 + 3 * math.log2(g["bpp"]) + (0.5 if g["target"] else 0.0)
            else:  # Δ 0.7: 3 % below USQ either way; Δ 1.0: 1 % without, 4 % below USQ + target with
                # it; Δ 1.4: 20 % below, at 0.8 of USQ's rate (out of the band)
                better = g["step"] == 1.0 and g["target"] == "rd"
                g["bpp"] = {0.7: 0.97, 1.0: 0.96 if better else 0.99, 1.4: 0.8}[g["step"]]
                g["psnr"] = 30.5 if g["target"] else 30.0

    monkeypatch.setattr(cal, "_evaluate_grid", fake_evaluate)
    kw = dict(methods=("tcq8",), steps=(0.7, 1.0, 1.4), mults=(0.05,), lmbda=0.01)
    assert cal.calibrate_checkpoint(None, [], {}, **kw)["methods"]["tcq8"]["step"] == 0.7
    out = cal.calibrate_checkpoint(None, [], {}, targets=("rd",), **kw)
    pick = out["methods"]["tcq8"]
    assert (pick["step"], pick["target"]) == (1.0, "rd")
    assert pick["saving_vs_usq_target"] == pytest.approx(-4.0)
    far = next(g for g in out["calibration"]["grid"] if (g["method"], g["step"], g["target"]) == ("tcq8", 1.4, "rd"))
    assert far["saving_vs_usq_target"] == pytest.approx(-20.0)


def test_calibrate_searches_plain_rows_for_tcq(monkeypatch):
    """TCQ's grid runs over the plain rows asked for (RDOQ's does not), the pick carries its
    number, and a record of the same images keeps the grid of the methods not searched."""
    from qft.commands.calibrate import carried_grid
    from qft.eval import calibrate as cal

    def fake_evaluate(ck, grid, images, settings, desc):
        for g in grid:
            if g["method"] == "usq":
                g["bpp"] = 1.0 / g["step"]
                g["psnr"] = 30 + 3 * math.log2(g["bpp"])
            else:  # 12 plain rows: 4 % below USQ, none: 2 %
                g["bpp"], g["psnr"] = (0.96 if g.get("plain_rows") == 12 else 0.98), 30.0

    monkeypatch.setattr(cal, "_evaluate_grid", fake_evaluate)
    out = cal.calibrate_checkpoint(
        None, [], {}, methods=("rdoq", "tcq8"), steps=(0.63,), mults=(0.1,), plain_rows=(0, 12)
    )
    grid = out["calibration"]["grid"]
    assert sorted(g["plain_rows"] for g in grid if g["method"] == "tcq8") == [0, 12]
    assert all("plain_rows" not in g for g in grid if g["method"] in ("usq", "rdoq"))
    assert out["methods"]["tcq8"]["plain_rows"] == 12 and "plain_rows" not in out["methods"]["rdoq"]
    old = dict(out["calibration"])
    new = cal.calibrate_checkpoint(None, [], {}, methods=("tcq8",), steps=(0.63,), mults=(0.1,))["calibration"]
    merged = carried_grid(old, new, ("tcq8",))
    assert merged["carried"] == ["rdoq"]
    assert [g["method"] for g in merged["grid"]].count("rdoq") == 1
    assert [g.get("plain_rows") for g in merged["grid"] if g["method"] == "tcq8"] == [0]
    assert carried_grid(old | {"images": ["other.png"]}, new, ("tcq8",)) is new


def test_calibrate_default_weights_by_saving():
    """The default between the weight picks is the better saving even where the RD cost
    prefers the other (a lower-rate point), and the RD cost only where a saving is missing."""
    from qft.eval.calibrate import default_pick

    def cost(p):
        return 0.01 * 255**2 * 10 ** (-p["psnr"] / 10) + p["bpp"]

    picks = {
        "none": {"saving": -13.8, "saving_vs_usq_target": -1.0, "bpp": 0.83, "psnr": 28.6, "target": "rd"},
        "decoder": {"saving": -9.7, "saving_vs_usq_target": -2.0, "bpp": 0.77, "psnr": 28.4, "target": "rd"},
    }
    # the same target: the saving against USQ with it decides
    assert default_pick(picks, cost) is picks["decoder"]
    picks["decoder"]["target"] = 0.0  # different targets: the saving against plain USQ
    assert cost(picks["decoder"]) < cost(picks["none"]) and default_pick(picks, cost) is picks["none"]
    picks["none"]["saving"] = None  # beyond USQ's curve
    assert default_pick(picks, cost) is picks["decoder"]


def test_quickstart_on_one_image(tmp_path, capsys):
    """The README's main command on the shipped models and the first Kodak image: the five
    rows of the split, in the folder the user named."""
    folder = tmp_path / "qs"
    assert main(["quickstart", "--images", "1", "--out", str(folder), "--threads", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| base | tcq8 |" in out and "| base | usq-rd |" in out and "| ft-tcq8-hyperdecoder | tcq8 |" in out
    assert f"RD plot: {folder / 'rd-psnr-rgb.png'}" in out
    summary = json.loads((folder / "bdrate.json").read_text())
    rows = {(r["row"], r["quantizer"]) for r in summary["rows"]}
    assert summary["images"] == 1 and rows == {
        ("base", "usq-rd"),
        ("base", "tcq8-t0"),
        ("base", "tcq8"),
        ("ft-tcq8-hyperdecoder", "tcq8"),
    }
    base_tcq8 = next(r for r in summary["rows"] if (r["row"], r["quantizer"]) == ("base", "tcq8"))
    assert len(base_tcq8["vs_base_usq"]["psnr-rgb"]["local"]) == 5  # one per shipped rate point
    assert (folder / "rd-psnr-rgb.png").is_file()


def test_quickstart_output_folder(tmp_path, monkeypatch, capsys):
    """--out is the folder written, with --full too; the default is under the current
    directory; never inside the package."""
    from qft.commands.quickstart import full_recipe, quick_recipe

    assert full_recipe(str(tmp_path / "x")).out == str(tmp_path / "x")
    assert len(full_recipe("x").quantizers) == 4 and len(full_recipe("x").rows) > 2
    assert [r.label for r in quick_recipe("y", 2).rows] == ["base", "ft-tcq8-hyperdecoder"]
    package = Path(qft.__file__).parent
    assert main(["quickstart", "--out", str(package / "assets" / "qs")]) == 2
    assert "inside the installed qft package" in capsys.readouterr().err
    assert not (package / "assets" / "qs").exists()


@pytest.mark.parametrize(
    "name", ["kodak", "tecnick", "kodak-hyperdecoder", "tecnick-hyperdecoder", "kodak-target", "tecnick-target"]
)
def test_shipped_recipes_load(name):
    from pathlib import Path

    from qft.eval.report import load_report_recipe

    recipe = load_report_recipe(Path(__file__).parents[1] / "recipes" / "report" / f"{name}.yaml")
    assert recipe.rows[0].label == "base" and len(recipe.rows[0].checkpoints) == 5
    if name.endswith("-hyperdecoder"):
        rows = {r.label: r for r in recipe.rows}
        assert rows["control-tcq8-hyperdecoder"].settings_from == rows["ft-tcq8-hyperdecoder-fixed"].checkpoints
        assert rows["ft-tcq8-hyperdecoder-rq200"].control == "control-tcq8-hyperdecoder"
        continued = rows["control-tcq8-hyperdecoder-continued"]
        assert continued.settings_from == rows["ft-tcq8-hyperdecoder-2stage"].checkpoints
        assert rows["ft-tcq8-hyperdecoder-2stage"].control == continued.label
    elif name.endswith("-target"):
        targets = {q.label: q.target for q in recipe.quantizers}
        assert targets["tcq8"] == "auto" and targets["tcq8-t0"] == 0 and targets["usq-t0.125"] == 0.125
    else:
        assert {"usq", "rdoq", "tcq4", "tcq8", "tcq8-vvc-w1"} <= {q.label for q in recipe.quantizers}
