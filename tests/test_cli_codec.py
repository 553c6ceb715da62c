"""The compress / decompress / eval commands end to end on a tiny checkpoint."""

import json

import numpy as np
import pytest

from PIL import Image

from qft.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    assert main(["init", "--arch", "mbt2018-mean", "--N", "16", "--M", "24", "-o", str(d / "m.pth")]) == 0
    rng = np.random.default_rng(0)
    (d / "imgs").mkdir()
    for i, (h, w) in enumerate([(40, 56), (33, 70)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "imgs" / f"i{i}.png")
    return d


@pytest.mark.parametrize("q", ["usq", "rdoq", "tcq4", "tcq8"])
def test_compress_decompress(workdir, q, capsys):
    d = workdir
    s, o = d / f"{q}.qft", d / f"{q}.png"
    assert main(["compress", "-m", str(d / "m.pth"), "-q", q, str(d / "imgs" / "i1.png"), "-o", str(s)]) == 0
    assert main(["decompress", str(s), "-m", str(d / "m.pth"), "-o", str(o)]) == 0
    assert Image.open(o).size == (70, 33)
    # never overwrite without --force
    assert main(["decompress", str(s), "-m", str(d / "m.pth"), "-o", str(o)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["decompress", str(s), "-m", str(d / "m.pth"), "-o", str(o), "--force"]) == 0


def test_errors_are_one_line(workdir, capsys):
    d = workdir
    (d / "junk.qft").write_bytes(b"\x89Q" + b"\x01" * 40)
    cases = [
        ["decompress", str(d / "junk.qft"), "-m", str(d / "m.pth"), "-o", str(d / "x.png")],
        ["compress", "-m", str(d / "m.pth"), str(d / "missing.png"), "-o", str(d / "x.qft")],
        ["compress", "-m", str(d / "imgs" / "i0.png"), str(d / "imgs" / "i0.png"), "-o", str(d / "x.qft")],
        [
            "compress",
            "-m",
            str(d / "m.pth"),
            "--step",
            "-1",
            "-q",
            "tcq8",
            str(d / "imgs" / "i0.png"),
            "-o",
            str(d / "x.qft"),
        ],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(err) == 1, argv


def test_warnings_are_one_line(workdir, capsys):
    d = workdir
    Image.fromarray(np.full((20, 30), 128, np.uint8), "L").save(d / "gray.png")
    capsys.readouterr()
    assert main(["compress", "-m", str(d / "m.pth"), str(d / "gray.png"), "-o", str(d / "gray.qft")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["qft compress: warning: gray.png: grayscale image replicated to RGB"]


def test_eval_json(workdir):
    d = workdir
    out = d / "r.json"
    argv = [
        "eval",
        "-m",
        str(d / "m.pth"),
        str(d / "m.pth"),
        "-q",
        "tcq8",
        "--data",
        str(d / "imgs"),
        "-o",
        str(out),
        "--per-image",
    ]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r) >= {"name", "description", "results", "qft"}
    for key in ("psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time"):
        assert len(r["results"][key]) == 2
    assert r["qft"]["quantizer"]["method"] == "tcq8" and len(r["qft"]["per_image"][0]) == 2
    # the same checkpoint twice: one common quantizer, recorded whole at the top level
    assert r["qft"]["quantizer"] == {k: v for k, v in r["qft"]["checkpoints"][0]["quantizer"].items() if k != "source"}
    assert r["results"]["bpp"] == r["qft"]["bpp_real"]
    assert r["results"]["ms-ssim-rgb"] == [None, None]  # too small for MS-SSIM: null, strict JSON
    assert all(0 < e < r_ for r_, e in zip(r["qft"]["bpp_real"], r["qft"]["bpp_estimated"]))  # header + rANS overhead
    assert main(argv) == 2  # exists, no --force


def test_outputs_are_checked_before_work_and_written_atomically(workdir, capsys):
    d = workdir
    m, img = str(d / "m.pth"), str(d / "imgs" / "i0.png")
    assert main(["compress", "-m", m, img, "-o", str(d / "ok.qft")]) == 0
    before = (d / "imgs" / "i0.png").read_bytes()
    cases = {
        "no such folder": ["compress", "-m", m, img, "-o", str(d / "missing" / "x.qft")],
        "is a folder": ["compress", "-m", m, img, "-o", str(d / "imgs"), "--force"],
        "the output is the input": ["compress", "-m", m, img, "-o", img, "--force"],
        "cannot write a '.xyz' image": ["decompress", str(d / "ok.qft"), "-m", m, "-o", str(d / "out.xyz")],
        "output is the input ": ["decompress", str(d / "ok.qft"), "-m", m, "-o", str(d / "ok.qft"), "--force"],
        "no such folder ": ["eval", "-m", m, "--data", str(d / "imgs"), "-o", str(d / "missing" / "r.json")],
    }
    for match, argv in cases.items():
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(err) == 1 and match.strip() in err[0], (argv, err)
    assert (d / "imgs" / "i0.png").read_bytes() == before
    assert not (d / "missing").exists() and not (d / "out.xyz").exists()
    assert not list(d.glob(".*.tmp"))
    assert main(["decompress", str(d / "ok.qft"), "-m", m, "-o", str(d / "ok.ppm")]) == 0
    assert Image.open(d / "ok.ppm").size == (56, 40)
