"""BD-rate through the bjontegaard package, and the qft bdrate command."""

import json

import numpy as np
import pytest

from qft.cli import main
from qft.eval import bd_rate

ANCHOR = {"results": {"bpp": [0.2, 0.4, 0.8, 1.6], "psnr-rgb": [28.0, 31.0, 34.0, 37.0]}}


def scaled(factor):
    return {"results": {"bpp": [r * factor for r in ANCHOR["results"]["bpp"]], "psnr-rgb": ANCHOR["results"]["psnr-rgb"]}}


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


def test_cli(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(ANCHOR))
    (tmp_path / "t.json").write_text(json.dumps(scaled(0.9)))
    assert main(["bdrate", str(tmp_path / "a.json"), str(tmp_path / "t.json"), "--method", "cubic",
                 "-o", str(tmp_path / "bd.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("BD-rate (cubic, default): -10.000")
    assert json.loads((tmp_path / "bd.json").read_text())["bd_rate"]["pchip"] == pytest.approx(-10)
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bdrate", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 2
