"""``qft quickstart``: the shipped models on the bundled Kodak, USQ vs RDOQ/TCQ-4/TCQ-8.

::

    qft quickstart            # 4 Kodak images, a few minutes on 2 CPU cores
    qft quickstart --full     # all 24 images

Runs the report matrix (:mod:`qft.eval.report`) over the shipped reference checkpoints
and, when shipped, their finetuned decoders (each with the quantizer it was finetuned
for), with real bitstreams; prints the BD-rate table and where the plots are. Resumes.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]

#: images of the default (quick) run
QUICK_IMAGES = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="all 24 Kodak images (default: the first 4)")
    parser.add_argument("--images", type=int, help="the first N Kodak images (default: 4; --full: 24)")
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores, at most 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import os

    from pathlib import Path

    from qft.eval.report import QuantizerSpec, ReportRecipe, run_report, shipped_rows

    assets = Path(__file__).resolve().parents[1] / "assets"
    n = args.images or (24 if args.full else QUICK_IMAGES)
    quantizers = tuple(QuantizerSpec.parse(m) for m in ("usq", "rdoq", "tcq4", "tcq8"))
    recipe = ReportRecipe(
        name=f"quickstart ({n} Kodak images)",
        data=str(assets / "kodak"),
        out=args.out + ("" if n == QUICK_IMAGES else f"-{n}"),
        quantizers=quantizers,
        rows=tuple(shipped_rows([q.label for q in quantizers])),
        images=n,
        sweep_quantizers=("usq",),
        anchors=tuple(str(p) for p in sorted((assets / "anchors" / "kodak").glob("*.json"))),
        threads=args.threads or min(4, os.cpu_count() or 1),
    )
    summary = run_report(recipe, progress=not args.no_progress)
    print(summary["markdown"])
    print(f"tables: {recipe.out}/bdrate.md, per image: {recipe.out}/per_image.md")
    print("plots: " + ", ".join(summary["plots"]))
    return 0
