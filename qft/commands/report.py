"""``qft report``: BD-rate tables and RD plots of the quantizer × model matrix.

::

    qft report recipes/report/kodak.yaml
    qft report recipes/report/tecnick.yaml --images 8 --out runs/report/tecnick-8
    qft report recipes/report/kodak.yaml --workers 2          # 2 processes of one thread each
    torchrun --nnodes 4 --nproc_per_node 8 … -m qft report RECIPE --out /shared/folder   # cells shared out by rank

Resumes: finished cells (checkpoint × quantizer × images) are read back from ``OUT/cells``.
See :mod:`qft.eval.report` for the recipe fields and the outputs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="report recipe YAML (see recipes/report/)")
    parser.add_argument("--data", help="image folder (overrides the recipe)")
    parser.add_argument("--images", type=int, help="first N images only")
    parser.add_argument("--out", help="output folder (default: the recipe's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--workers", type=int, metavar="N", help="evaluate in N processes of one thread each")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from qft.errors import UserError
    from qft.eval.report import load_report_recipe, run_report

    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    recipe = load_report_recipe(
        args.recipe, data=args.data, images=args.images, out=args.out, threads=args.threads, workers=args.workers
    )
    summary = run_report(recipe, progress=not args.no_progress)
    if summary.get("rank"):
        return 0
    print(summary["markdown"])
    print(
        f"wrote {recipe.out}/bdrate.md, bdrate.json, per_image.md, results/*.json and plots: "
        + ", ".join(summary["plots"])
    )
    return 0
