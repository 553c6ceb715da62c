"""``qft quickstart``: the shipped models on a few bundled Kodak images, the honest split.

::

    qft quickstart                    # 2 Kodak images, under 2 minutes on 2 CPU cores
    qft quickstart --out my-folder    # outputs there (default: ./qft-quickstart)
    qft quickstart --full             # the whole matrix: USQ/RDOQ/TCQ-4/TCQ-8 × every shipped row, 24 images

The quick run evaluates the five shipped reference models with real bitstreams in five
rows — plain USQ (the anchor), USQ with the decoder target, TCQ-8 without and with it
(the calibrated default), and the best finetuned model (decoder + hyper-decoder finetuned
on TCQ-8 latents, with its own quantizer) — so it shows where the gain comes from. It
prints the BD-rate table and the paths of the tables and the RD plot. Resumes; cells are
cached in the output folder. The output folder is never inside the installed package.
"""

from __future__ import annotations

import argparse

__all__ = ["add_arguments", "run", "quick_recipe", "full_recipe"]

#: images of the default (quick) run
QUICK_IMAGES = 2
#: the quick run's rows: (label, method, decoder target; "auto": the calibrated one)
QUICK_QUANTIZERS = (("usq", "usq", "auto"), ("usq-rd", "usq", "rd"), ("tcq8-t0", "tcq8", 0.0), ("tcq8", "tcq8", "auto"))
#: the finetuned row of the quick run (the best shipped one: docs/design.md, "Decoder target")
QUICK_FINETUNED = "ft-tcq8-hyperdecoder"
#: USQ step scales of the quick run's anchor sweep (the local measure; down to 0.5 so that TCQ-8 at its
#: finer calibrated step stays inside the anchor's PSNR range); the full run sweeps more
QUICK_SWEEP = (0.5, 0.7, 0.85, 1.2, 1.45)
DEFAULT_OUT = "qft-quickstart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--full",
        action="store_true",
        help="the whole matrix (USQ, RDOQ, TCQ-4, TCQ-8 × every shipped row) on all 24 Kodak images",
    )
    parser.add_argument("--images", type=int, help=f"the first N Kodak images (default: {QUICK_IMAGES}; --full: 24)")
    parser.add_argument("--out", help=f"output folder (default: ./{DEFAULT_OUT}, --full: ./{DEFAULT_OUT}-full)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: all cores, at most 4)")
    parser.add_argument(
        "--workers", type=int, help="processes of one thread each (default: quick run 2 on 2 or more cores, --full 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _assets():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "assets"


def _anchors() -> tuple[str, ...]:
    return tuple(str(p) for p in sorted((_assets() / "anchors" / "kodak").glob("*.json")))


def quick_recipe(out: str, images: int = QUICK_IMAGES, threads: int = 1, workers: int = 1):
    """The quick run's :class:`~qft.eval.report.ReportRecipe`: the five rows of the module
    docstring on the first ``images`` bundled Kodak images (each row against base USQ
    only: no sweep of the base under the finetuned row's quantizer)."""
    from qft.eval.report import QuantizerSpec, ReportRecipe, shipped_rows

    quantizers = tuple(QuantizerSpec(label, method, target=target) for label, method, target in QUICK_QUANTIZERS)
    rows = shipped_rows([q.label for q in quantizers])
    rows = [rows[0]] + [r for r in rows if r.label == QUICK_FINETUNED]
    return ReportRecipe(
        name=f"quickstart ({images} Kodak images)",
        data=str(_assets() / "kodak"),
        out=out,
        quantizers=quantizers,
        rows=tuple(rows),
        images=images,
        sweep=QUICK_SWEEP,
        sweep_quantizers=("usq",),
        sweep_rows=False,
        anchors=_anchors(),
        threads=threads,
        ms_ssim=False,
        workers=workers,
        same_quantizer=False,
    )


def full_recipe(out: str, images: int = 24, threads: int = 1, workers: int = 1):
    """The full matrix: USQ, RDOQ, TCQ-4, TCQ-8 on every shipped row (finetuned models and
    control arms), the first ``images`` Kodak images."""
    from qft.eval.report import QuantizerSpec, ReportRecipe, shipped_rows

    quantizers = tuple(QuantizerSpec.parse(m) for m in ("usq", "rdoq", "tcq4", "tcq8"))
    return ReportRecipe(
        name=f"quickstart --full ({images} Kodak images)",
        data=str(_assets() / "kodak"),
        out=out,
        quantizers=quantizers,
        rows=tuple(shipped_rows([q.label for q in quantizers])),
        images=images,
        sweep_quantizers=("usq",),
        anchors=_anchors(),
        threads=threads,
        workers=workers,
    )


def run(args: argparse.Namespace) -> int:
    import os

    from pathlib import Path

    from qft.errors import UserError
    from qft.eval.report import run_report

    out = Path(args.out or (DEFAULT_OUT + ("-full" if args.full else ""))).resolve()
    package = Path(__file__).resolve().parents[1]
    if out == package or package in out.parents:
        raise UserError(f"{out} is inside the installed qft package; give an output folder of your own (--out)")
    if args.images is not None and not 1 <= args.images <= 24:
        raise UserError(f"--images must be between 1 and 24, got {args.images}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    threads = args.threads or min(4, os.cpu_count() or 1)
    n = args.images or (24 if args.full else QUICK_IMAGES)
    workers = args.workers or (1 if args.full else min(2, os.cpu_count() or 1, n))
    recipe = (full_recipe if args.full else quick_recipe)(str(out), n, threads, workers)
    summary = run_report(recipe, progress=not args.no_progress)
    print(summary["markdown"])
    print(f"tables: {out / 'bdrate.md'}, per image: {out / 'per_image.md'}")
    print("RD plot: " + summary["plots"][0])
    print(f"results (CompressAI JSON, one per row): {out / 'results'}")
    return 0
