"""Helpers of the benchmarks that run the ``qft`` command line as a user does: a fresh
``python -m qft`` process in the repository root, on the bundled Kodak images.

Imported by sibling scripts (``from _cli import …``): a script's folder is on ``sys.path``
when it runs.
"""

from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path
from typing import Any

#: the repository root (the working directory of every ``qft`` process)
ROOT = Path(__file__).resolve().parents[1]
#: the 24 Kodak images bundled with qft
KODAK = ROOT / "qft" / "assets" / "kodak"


def qft_command(*args: str | Path | float) -> list[str]:
    """The command line ``python -m qft ARGS…`` with this interpreter."""
    return [sys.executable, "-m", "qft", *map(str, args)]


def run_qft(*args: str | Path | float, quiet: bool = False) -> None:
    """Run ``qft ARGS…`` in the repository root; raises ``CalledProcessError`` when it
    fails. ``quiet``: its output is discarded (else it goes to this process's)."""
    sink = subprocess.DEVNULL if quiet else None
    subprocess.run(qft_command(*args), check=True, cwd=ROOT, stdout=sink, stderr=sink)


def kodak_images(images: int | None, folder: Path) -> Path:
    """A folder of the first ``images`` bundled Kodak images (``qft eval`` takes a folder):
    ``folder/kodak-N`` of links to them, made if missing; all 24 (None): the bundled folder."""
    if not images:
        return KODAK
    subset = folder / f"kodak-{images}"
    subset.mkdir(parents=True, exist_ok=True)
    for p in sorted(KODAK.glob("*.png"))[:images]:
        if not (subset / p.name).exists():
            (subset / p.name).symlink_to(p)
    return subset


def eval_checkpoints(
    checkpoints: list[str],
    method: str,
    data: Path,
    out: Path,
    *extra: str,
    workers: int = 1,
    quiet: bool = False,
) -> dict[str, Any]:
    """``qft eval -m CHECKPOINTS… -q METHOD EXTRA… --data DATA -o OUT --force --workers N``
    (real bitstreams); returns the JSON it wrote."""
    args = ["-m", *checkpoints, "-q", method, *extra, "--data", data, "-o", out, "--force", "--workers", workers]
    run_qft("eval", *args, quiet=quiet)
    return json.loads(Path(out).read_text())
