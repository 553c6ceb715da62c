"""``qft calibrate``: per-checkpoint Δ, λ_T multiplier (and decoder weights) on held-out images.

::

    qft calibrate -m mbt2018-mean-0.013 --data ../shared/data/bsds500/val
    qft calibrate -m model.pth --data val/ --weights      # also estimate and try decoder weights
    qft calibrate -m model.pth --data val/ --weights --targets   # and the decoder target (η per image)
    qft calibrate -m model.pth --lambda 0.013        # only record the model's training λ

Writes ``<checkpoint>.qft.json`` beside the checkpoint (:mod:`qft.settings`); eval,
compress, finetune, report and quickstart then use its choices by default. The file also
records the model's training λ (``model_lambda``: from ``--lambda``, else the checkpoint),
which the decoder target ``rd`` needs, so it travels with the checkpoint. Use images of
the training distribution's held-out split, never a test set (the command refuses folders
named like Kodak, Tecnick or CLIC unless ``--allow-test-set``). See
:mod:`qft.eval.calibrate` for the search.
"""

from __future__ import annotations

import argparse

from qft.settings import target_value

__all__ = ["add_arguments", "carried_grid", "run"]

_TEST_SETS = ("kodak", "tecnick", "clic")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qft.eval.calibrate import MULTS, STEPS, TARGETS

    parser.add_argument(
        "-m",
        "--checkpoint",
        required=True,
        nargs="+",
        metavar="CKPT",
        help="checkpoint file(s) or shipped model name(s)",
    )
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow checkpoints that need full pickle loading (only for files you trust)",
    )
    parser.add_argument(
        "--data",
        help="held-out images of the training distribution (e.g. BSDS500 val); without it, only --lambda is recorded",
    )
    parser.add_argument(
        "--lambda",
        dest="lmbda",
        type=_positive,
        metavar="L",
        help="the model's training λ (of λ·255²·MSE + bpp), recorded in the settings file; "
        "needed by --targets rd when the checkpoint does not record it",
    )
    parser.add_argument(
        "--allow-test-set",
        action="store_true",
        help="calibrate on a folder named like a test set (Kodak, Tecnick, CLIC) anyway",
    )
    parser.add_argument("--images", type=int, default=8, help="first N images (default: 8)")
    parser.add_argument("--methods", nargs="+", default=["rdoq", "tcq4", "tcq8"], choices=("rdoq", "tcq4", "tcq8"))
    parser.add_argument("--steps", type=float, nargs="+", default=list(STEPS), help="TCQ union steps of the grid")
    parser.add_argument("--mults", type=float, nargs="+", default=list(MULTS), help="λ multipliers of the grid")
    parser.add_argument(
        "--weights",
        action="store_true",
        help="estimate the decoder-sensitivity weights (if not stored yet) and search with and without them",
    )
    parser.add_argument(
        "--targets",
        type=_target,
        nargs="*",
        metavar="rd|ETA",
        help="also search with the decoder target, jointly with the step, λ multiplier and weights, each "
        "scored against USQ with the same target: rd (η chosen per image by the model's RD cost) or fixed "
        f"η values (no values: {' '.join(map(str, TARGETS))})",
    )
    parser.add_argument(
        "--plain-rows",
        type=int,
        nargs="+",
        default=[0],
        metavar="N",
        help="TCQ's numbers of plain rows to search (elements of the first N scale rows rounded at step 1 outside "
        "the trellis; default: 0 only)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")


def _positive(text: str) -> float:
    """``--lambda``: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


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

    if args.data is None:
        if args.lmbda is None:
            raise UserError("qft calibrate needs --data (held-out images to calibrate on), or --lambda to record")
        for spec in args.checkpoint:
            ck = load_checkpoint(spec, unsafe_load=args.unsafe_load)
            if "delta_of" in ck.extra:
                raise UserError(f"{spec} is a finetuned delta: it uses its base's settings; calibrate the base")
            print(f"wrote {write_settings(spec, ck.sha256, {'model_lambda': args.lmbda})} (λ {args.lmbda:g})")
        return 0
    parts = Path(args.data).resolve().parts
    if not args.allow_test_set and any(t in part.lower() for part in parts for t in _TEST_SETS):
        raise UserError(
            f"{args.data} looks like a test set; calibrate on held-out training images (e.g. BSDS500 val), "
            "or pass --allow-test-set if it is not one"
        )
    images = list_images(args.data)[: args.images]
    if not images:
        raise UserError(f"{args.data}: no images found")
    loaded = []
    for spec in args.checkpoint:  # every check before the first grid
        ck = load_checkpoint(spec, unsafe_load=args.unsafe_load)
        if "delta_of" in ck.extra:
            raise UserError(f"{spec} is a finetuned delta: it uses its base's settings; calibrate the base")
        settings = read_settings(ck)
        if args.lmbda is not None:
            settings["model_lambda"] = args.lmbda
        if args.targets is not None and "rd" in (args.targets or TARGETS) and "model_lambda" not in settings:
            raise UserError(
                f"{spec} does not record its training λ, which --targets rd needs; give it with "
                "--lambda L (e.g. --lambda 0.013), or name fixed targets only (--targets 0.125 0.25)"
            )
        loaded.append((spec, ck, settings))
    set_threads(args.threads)
    for spec, ck, settings in loaded:
        if args.weights and "weights" not in settings:
            from qft.sensitivity import estimate_weights

            settings["weights"] = estimate_weights(ck.model, images)
            write_settings(spec, ck.sha256, {"weights": settings["weights"]})
        targets = () if args.targets is None else args.targets or TARGETS
        update = calibrate_checkpoint(
            ck,
            images,
            settings,
            methods=args.methods,
            steps=args.steps,
            mults=args.mults,
            weights=args.weights,
            targets=targets,
            lmbda=settings.get("model_lambda"),
            plain_rows=args.plain_rows,
            desc=Path(str(spec)).name,
        )
        update["calibration"] = carried_grid(settings.get("calibration"), update["calibration"], args.methods)
        if "model_lambda" in settings:
            update["model_lambda"] = settings["model_lambda"]
        path = write_settings(spec, ck.sha256, update)
        for method in args.methods:
            c = update["methods"].get(method)
            if c is None or c.get("finetuned"):
                print(f"{spec} {method}: no configuration within USQ's PSNR range; defaults kept")
                continue

            def pct(x):
                return "beyond USQ's PSNR range" if x is None else f"{x:+.2f} %"

            alt = "; ".join(
                f"weights {w}: Δ {p['step']}, m {p['lambda_mult']}, η {p.get('target', 0)}, "
                f"plain rows {p.get('plain_rows', 0)}, {pct(p['saving'])}"
                for w, p in c["by_weights"].items()
            )
            print(
                f"{spec} {method}: step {c['step']}, λ multiplier {c['lambda_mult']}, weights {c['weights']}, "
                f"target {c.get('target', 0)}, plain rows {c.get('plain_rows', 0)}: {pct(c['saving'])} rate at "
                "equal PSNR vs USQ, "
                f"{pct(c.get('saving_vs_usq_target'))} vs USQ with the same target ({alt})"
            )
        for eta, s in update["calibration"]["usq_target"].items():
            saving = "outside USQ's PSNR range" if s is None else f"{s:+.2f} % rate at equal PSNR vs USQ"
            print(f"{spec} usq with target {eta} (a reference, not a default): {saving}")
        print(f"wrote {path}")
    return 0


def carried_grid(old: dict | None, new: dict, methods) -> dict:
    """The calibration record ``new`` with the grid entries of the methods this run did not
    search carried over from ``old`` (the record before, on the same images), so that the
    settings keep the measurements behind every method's pick."""
    if not old or (old.get("data"), old.get("images")) != (new["data"], new["images"]):
        return new
    kept = [g for g in old.get("grid", []) if g["method"] not in (*methods, "usq")]
    if not kept:
        return new
    return new | {"grid": new["grid"] + kept, "carried": sorted({g["method"] for g in kept})}
