"""BD-rate through the bjontegaard package, and the qft bdrate command."""

import json

import numpy as np
import pytest

from qft.cli import main
from qft.eval import bd_rate
from qft.eval.bdrate import front_bd_rate

ANCHOR = {"results": {"bpp": [0.2, 0.4, 0.8, 1.6], "psnr-rgb": [28.0, 31.0, 34.0, 37.0]}}


def scaled(factor):
    return {
        "results": {"bpp": [r * factor for r in ANCHOR["results"]["bpp"]], "psnr-rgb": ANCHOR["results"]["psnr-rgb"]}
    }


@pytest.mark.parametrize("factor", [0.9, 1.05])
def test_known_rate_scaling(factor):
    """Scaling every rate by f at equal quality is a BD-rate of (f - 1) for every method."""
    bd = bd_rate(ANCHOR, scaled(factor))
    for m in ("pchip", "cubic", "akima"):
        assert bd[m] == pytest.approx(100 * (factor - 1), abs=1e-6)


def test_no_overlap_is_nan_with_warning():
    far = {"bpp": [0.1, 0.2], "psnr-rgb": [10.0, 11.0]}
    bd = bd_rate(ANCHOR, far)
    assert np.isnan(bd["pchip"]) and bd["warnings"]


def test_front_bd_rate_keeps_the_points_on_both_fronts():
    """A rate point off either curve's front (beaten in rate and quality by another) is left
    out of both curves; the rest gives the BD of the scaled rates."""
    a = list(zip(ANCHOR["results"]["bpp"], ANCHOR["results"]["psnr-rgb"]))
    t = [(r * 0.9, q) for r, q in a]
    bd, sel = front_bd_rate(a, t)
    assert sel == [0, 1, 2, 3] and bd == pytest.approx(-10, abs=1e-6)
    t[3] = (t[3][0], 33.9)  # the top test point now below the third one's quality
    bd, sel = front_bd_rate(a, t)
    assert sel == [0, 1, 2] and bd == pytest.approx(-10, abs=1e-6)
    tied = [(r, 30.0) for r, _ in a]  # every test point at one quality: the front ties, no BD
    assert np.isnan(front_bd_rate(a, tied)[0])
    with pytest.raises(ValueError, match="3 test points"):
        front_bd_rate(a, t[:3])


def test_cli(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(ANCHOR))
    (tmp_path / "t.json").write_text(json.dumps(scaled(0.9)))
    assert (
        main(
            [
                "bdrate",
                str(tmp_path / "a.json"),
                str(tmp_path / "t.json"),
                "--method",
                "cubic",
                "-o",
                str(tmp_path / "bd.json"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("BD-rate (cubic, default): -10.000")
    assert json.loads((tmp_path / "bd.json").read_text())["bd_rate"]["pchip"] == pytest.approx(-10)
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bdrate", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 2


@pytest.mark.parametrize(
    "curve,match",
    [
        ({"bpp": [0.5], "psnr-rgb": [30.0]}, "1 point"),
        ({"bpp": [], "psnr-rgb": []}, "0 point"),
        ({"bpp": [0.2, 0.4, 0.8], "psnr-rgb": [30.0, 29.0, 34.0]}, "not monotonic"),
        ({"bpp": [0.2, "0.4"], "psnr-rgb": [28.0, 31.0]}, "not a list of finite numbers"),
        ({"bpp": [0.2, 0.4], "psnr-rgb": [28.0, float("nan")]}, "not a list of finite numbers"),
        ({"bpp": [0.2, 0.4], "psnr-rgb": [28.0, 31.0, 34.0, 37.0]}, "2 'bpp' but 4"),
        ({"bpp": [0.0, 0.4], "psnr-rgb": [28.0, 31.0]}, "<= 0"),
        ([0.2, 0.4], "JSON object"),
        ({"results": [1, 2]}, "no 'bpp'"),
    ],
)
def test_curves_without_a_bd_rate_are_refused(tmp_path, capsys, curve, match):
    with pytest.raises(ValueError, match=f"test: .*{match}"):
        bd_rate(ANCHOR, curve)
    (tmp_path / "a.json").write_text(json.dumps(ANCHOR))
    (tmp_path / "t.json").write_text(json.dumps(curve))
    capsys.readouterr()
    assert main(["bdrate", str(tmp_path / "a.json"), str(tmp_path / "t.json")]) == 2
    captured = capsys.readouterr()
    assert not captured.out and len(captured.err.splitlines()) == 1 and match in captured.err


def test_cli_refuses_an_undefined_bd_rate(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(ANCHOR))
    (tmp_path / "t.json").write_text(json.dumps({"bpp": [0.1, 0.2], "psnr-rgb": [10.0, 11.0]}))
    assert main(["bdrate", str(tmp_path / "a.json"), str(tmp_path / "t.json")]) == 2
    assert "no pchip BD-rate" in capsys.readouterr().err
