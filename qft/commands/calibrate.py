"""``qft calibrate``: per-checkpoint Δ, λ_T multiplier (and decoder weights) on held-out images.

::

    qft calibrate -m mbt2018-mean-0.013 --data ../shared/data/bsds500/val
    qft calibrate -m model.pth --data val/ --weights      # also estimate and try decoder weights
    qft calibrate -m model.pth --data val/ --weights --targets   # and the decoder target (η per image)

Writes ``<checkpoint>.qft.json`` beside the checkpoint (:mod:`qft.settings`); eval,
compress, finetune, report and quickstart then use its choices by default. Use images of
the training distribution's held-out split, never a test set (the command refuses folders
named like Kodak, Tecnick or CLIC). See :mod:`qft.eval.calibrate` for the search.
"""

from __future__ import annotations

import argparse

from qft.settings import target_value

__all__ = ["add_arguments", "run"]

_TEST_SETS = ("kodak", "tecnick", "clic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qft.eval.calibrate import MULTS, STEPS, TARGETS

    parser.add_argument("-m", "--checkpoint", required=True, nargs="+", metavar="CKPT",
                        help="checkpoint file(s) or shipped model name(s)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="allow checkpoints that need full pickle loading (only for files you trust)")
    parser.add_argument("--data", required=True, help="held-out images of the training distribution (e.g. BSDS500 val)")
    parser.add_argument("--images", type=int, default=8, help="first N images (default: 8)")
    parser.add_argument("--methods", nargs="+", default=["rdoq", "tcq4", "tcq8"], choices=("rdoq", "tcq4", "tcq8"))
    parser.add_argument("--steps", type=float, nargs="+", default=list(STEPS), help="TCQ union steps of the grid")
    parser.add_argument("--mults", type=float, nargs="+", default=list(MULTS), help="λ multipliers of the grid")
    parser.add_argument("--weights", action="store_true",
                        help="estimate the decoder-sensitivity weights (if not stored yet) and search with and without them")
    parser.add_argument("--targets", type=_target, nargs="*", metavar="rd|ETA",
                        help="also try the decoder target on every pick: rd (η chosen per image by the model's RD "
                             f"cost) or fixed η values (no values: {' '.join(map(str, TARGETS))})")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")


def _target(text: str) -> str | float:
    """``--targets`` values: :func:`~qft.commands._options.target_value` of ``rd`` or a
    number, less 0 (no target is always tried)."""
    try:
        value = target_value(text if text == "rd" else float(text), allow_auto=False)
    except ValueError:
        value = 0.0
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"expected rd or a number > 0, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qft.codec import list_images
    from qft.errors import UserError
    from qft.eval.calibrate import TARGETS, calibrate_checkpoint
    from qft.models import load_checkpoint
    from qft.settings import read_settings, write_settings
    from qft.threads import set_threads

    if any(t in part.lower() for part in Path(args.data).resolve().parts for t in _TEST_SETS):
        raise UserError(f"{args.data} looks like a test set; calibrate on held-out training images (e.g. BSDS500 val)")
    images = list_images(args.data)[: args.images]
    if not images:
        raise UserError(f"{args.data}: no images found")
    set_threads(args.threads)
    for spec in args.checkpoint:
        ck = load_checkpoint(spec, unsafe_load=args.unsafe_load)
        if "delta_of" in ck.extra:
            raise UserError(f"{spec} is a finetuned delta: it uses its base's settings; calibrate the base")
        settings = read_settings(ck)
        if args.weights and "weights" not in settings:
            from qft.sensitivity import estimate_weights

            settings["weights"] = estimate_weights(ck.model, images)
            write_settings(spec, ck.sha256, {"weights": settings["weights"]})
        targets = () if args.targets is None else args.targets or TARGETS
        update = calibrate_checkpoint(ck, images, settings, methods=args.methods, steps=args.steps, mults=args.mults,
                                      weights=args.weights, targets=targets, lmbda=ck.extra.get("lambda"),
                                      desc=Path(str(spec)).name)
        path = write_settings(spec, ck.sha256, update)
        for method in args.methods:
            c = update["methods"].get(method)
            if c is None or c.get("finetuned"):
                print(f"{spec} {method}: no configuration within USQ's PSNR range; defaults kept")
                continue
            def pct(x):
                return "beyond USQ's PSNR range" if x is None else f"{x:+.2f} %"

            alt = "; ".join(f"weights {w}: Δ {p['step']}, m {p['lambda_mult']}, η {p.get('target', 0)}, "
                            f"{pct(p['saving'])}" for w, p in c["by_weights"].items())
            print(f"{spec} {method}: step {c['step']}, λ multiplier {c['lambda_mult']}, weights {c['weights']}, "
                  f"target {c.get('target', 0)}: {pct(c['saving'])} rate at equal PSNR vs USQ ({alt})")
        for eta, s in update["calibration"]["usq_target"].items():
            saving = "outside USQ's PSNR range" if s is None else f"{s:+.2f} % rate at equal PSNR vs USQ"
            print(f"{spec} usq with target {eta} (a reference, not a default): {saving}")
        print(f"wrote {path}")
    return 0
