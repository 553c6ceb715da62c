"""Every benchmark script (``benchmarks/``, ``benchmarks/archive/``) imports and shows its
``--help``: the scripts are not run by the suite, so this catches an import of moved or
renamed code. One subprocess runs them all (torch is imported once)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the scripts (helper modules, ``_*.py``, have no command line)
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("benchmarks/**/*.py") if not p.name.startswith("_"))

_RUNNER = """
import contextlib, io, json, runpy, sys
results = {}
for script in sys.argv[1:]:
    folder = script.rsplit("/", 1)[0]
    sys.path.insert(0, folder)  # sibling imports, as when the script is run
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(script, run_name="__main__")
        code = "no exit"
    except SystemExit as e:
        code = e.code or 0
    except BaseException as e:
        code = f"{type(e).__name__}: {e}"
    finally:
        sys.path.remove(folder)
    results[script] = {"code": code, "output": out.getvalue()[-2000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, *SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_benchmarks_are_found():
    assert "benchmarks/finetune_runs.py" in SCRIPTS and "benchmarks/archive/latent_gain.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_shows_help(helps, script):
    result = helps[script]
    assert result["code"] == 0, result["output"]
    assert "usage:" in result["output"], result["output"]


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package), for tests that
    call its functions."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def refine_sga():
    """``benchmarks/refine_sga.py`` as a module (its ``merge`` and ``resumed``)."""
    return load_benchmark("refine_sga")


def _record(**kw) -> dict:
    """The header fields of a ``refine_sga`` record that decide whether two join."""
    base = {"data": "kodak", "center_crop": None, "device": "cpu", "images": 1, "steps": [1000]}
    return {**base, "machine": {"cpu": kw.pop("cpu", "Intel")}, **kw}


@pytest.mark.parametrize(
    "other, message",
    [
        ({"device": "cuda"}, "differ in data, crop or device"),
        ({"center_crop": 320}, "differ in data, crop or device"),
        ({"data": "tecnick"}, "differ in data, crop or device"),
        ({"cpu": "AMD"}, "ran on other CPUs"),
    ],
)
def test_refine_sga_merge_refuses_records_of_another_run(refine_sga, tmp_path, other, message):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    paths[0].write_text(json.dumps(_record()))
    paths[1].write_text(json.dumps(_record(**other)))
    out = tmp_path / "merged.json"
    with pytest.raises(SystemExit, match=message):
        refine_sga.merge([str(p) for p in paths], str(out))
    assert not out.exists()


@pytest.mark.parametrize(
    "other, message",
    [
        ({"device": "cuda"}, "differs from this run"),
        ({"steps": [200]}, "differs from this run"),
        ({"cpu": "AMD"}, "ran on another CPU"),
    ],
)
def test_refine_sga_resume_refuses_another_run(refine_sga, other, message):
    with pytest.raises(SystemExit, match=message):
        refine_sga.resumed(_record(), _record(**other), "old.json")


@pytest.mark.parametrize(
    "other, message",
    [
        ({"device": "cuda"}, "differs from this run in data, crop or device"),
        ({"center_crop": 300}, "differs from this run in data, crop or device"),
        ({"cpu": "AMD"}, "ran on another CPU"),
    ],
)
def test_refine_sga_reuse_refuses_another_run(refine_sga, tmp_path, other, message):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**_record(**other), "per_model": {}}))
    with pytest.raises(SystemExit, match=message):
        refine_sga.reuse_source(str(path), _record())


def test_refine_sga_reuse_refuses_a_json_that_is_no_record(refine_sga, tmp_path):
    path = tmp_path / "family.json"
    path.write_text(json.dumps({"bd": -1.0}))
    with pytest.raises(SystemExit, match="is not a refine_sga record"):
        refine_sga.reuse_source(str(path), _record())


def test_refine_sga_reuses_only_rows_of_the_same_settings_and_image(refine_sga):
    usq, tcq = {"method": "usq", "step": 1.0}, {"method": "tcq8", "step": 0.63}
    old = {
        "per_model": {
            "m": {
                "configs": {"usq": usq, "tcq8": tcq},
                "rows": {
                    "usq": [{"image": "a.png", "bpp": 1.0}, {"image": "b.png", "bpp": 2.0}],
                    "tcq8": [{"image": "a.png", "bpp": 0.9}, {"image": "b.png", "bpp": 1.8}],
                },
            }
        }
    }
    now = {"usq": usq, "tcq8": {**tcq, "step": 0.55}}  # the trellis's settings changed
    assert refine_sga.reused_rows(old, "m", now, "b.png") == {"usq": {"image": "b.png", "bpp": 2.0, "reused": True}}
    assert refine_sga.reused_rows(old, "m", now, "c.png") == {}  # an image the old record lacks
    assert refine_sga.reused_rows(old, "other", now, "a.png") == {}  # a model it lacks
    assert refine_sga.reused_rows(None, "m", now, "a.png") == {}  # no --reuse


def _rows_record(images: list[str]) -> dict:
    """A one-model ``refine_sga`` record with a ``usq`` row per image."""
    rows = [{"image": i, "bpp": 1.0, "psnr": 30.0, "rd_cost": 1.0, "encode_s": 0.1} for i in images]
    entry = {"model_lambda": 0.01, "configs": {"usq": {"method": "usq"}}, "rows": {"usq": rows}}
    return {**_record(), "steps": [], "load_before": [0, 0, 0], "per_model": {"m": entry}}


def test_refine_sga_merge_keeps_only_the_images_named(refine_sga, tmp_path):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    paths[0].write_text(json.dumps(_rows_record(["a.png", "b.png", "c.png"])))
    paths[1].write_text(json.dumps(_rows_record(["d.png"])))
    out = tmp_path / "merged.json"
    refine_sga.merge([str(p) for p in paths], str(out), ["a.png", "d.png"])
    assert json.loads(out.read_text())["images"] == ["a.png", "d.png"]
    with pytest.raises(SystemExit, match="hold only"):
        refine_sga.merge([str(p) for p in paths], str(tmp_path / "other.json"), ["a.png", "e.png"])


def test_refine_sga_configs_keeps_the_named_and_refuses_unknown_or_no_anchor(refine_sga):
    table = {"usq": 1, "tcq8": 2, "sga4+usq": 3}
    assert refine_sga.selected(table, None) is table
    assert list(refine_sga.selected(table, ["sga4+usq", "usq"])) == ["usq", "sga4+usq"]
    with pytest.raises(SystemExit, match=r"no configuration \['bogus'\]"):
        refine_sga.selected(table, ["usq", "bogus"])
    with pytest.raises(SystemExit, match="name usq too"):
        refine_sga.selected(table, ["tcq8"])


def test_refine_sga_refuses_only_images_without_merge(refine_sga, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["refine_sga.py", "--only-images", "kodim01.png", "--data", "no-such-folder", "-o", "unused.json"]
    )
    with pytest.raises(SystemExit, match="--only-images: only with --merge"):
        refine_sga.main()
