"""``qft bdrate``: BD-rate of a test curve against an anchor (CompressAI JSON files).

::

    qft bdrate ../shared/anchors/kodak/compressai-mbt2018-mean_mse.json tcq8.json
    qft bdrate usq.json tcq8.json --metric ms-ssim-rgb --method cubic -o bd.json

Prints all three methods, the chosen one (default pchip) first; warns when the curves
overlap too little. Curves without a BD-rate (fewer than 2 points, not monotonic, lists of
other lengths or of non-numbers), and a chosen method that gives none, end in one error line.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("anchor", help="anchor results JSON")
    parser.add_argument("test", help="test results JSON")
    parser.add_argument("--metric", default="psnr-rgb", choices=("psnr-rgb", "ms-ssim-rgb"))
    parser.add_argument("--method", default="pchip", choices=("pchip", "cubic", "akima"))
    parser.add_argument("-o", "--output", help="write the BD-rates as JSON")


def run(args: argparse.Namespace) -> int:
    import json
    import math

    from pathlib import Path

    from qft.errors import UserError
    from qft.eval.bdrate import BD_METHODS, bd_rate, curve
    from qft.files import atomic_write, check_output

    if args.output:  # replaced if it exists, but never an input, a folder or in a missing folder
        check_output(args.output, force=True, inputs=(args.anchor, args.test))
    curves = []
    for path in (args.anchor, args.test):
        try:
            curves.append(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
        try:
            curve(curves[-1], args.metric)
        except ValueError as exc:
            raise UserError(f"{path}: {exc} (give CompressAI results JSON files)") from None
    bd = bd_rate(*curves, metric=args.metric)
    if math.isnan(bd[args.method]):
        reasons = "; ".join(w for w in bd["warnings"] if w.startswith(args.method)) or "undefined"
        raise UserError(f"no {args.method} BD-rate for these curves: {reasons}")
    order = [args.method] + [m for m in BD_METHODS if m != args.method]
    for m in order:
        print(f"BD-rate ({m}{', default' if m == args.method else ''}): {bd[m]:+.3f} %")
    for w in bd["warnings"]:
        print(f"warning: {w}")
    if args.output:
        atomic_write(
            args.output,
            json.dumps(
                {"anchor": args.anchor, "test": args.test, "metric": args.metric, "method": args.method, "bd_rate": bd},
                indent=2,
            ),
        )
    return 0
