"""``qft train``: train reference models from a YAML recipe.

::

    qft train recipes/reference/mbt2018-mean-cpu.yaml                 # whole schedule
    qft train RECIPE --lambda 0.0130 --out runs/ref --resume          # one point, continue
    qft train RECIPE --device cuda --threads 8 --steps 20000          # overrides
    qft train RECIPE --lambda 0.013 --init mbt2018-mean-0.013 --warm-steps 5000  # continue

The schedule trains the highest λ first and warm-starts each lower λ from the previous
one. Outputs go to ``runs/reference/<recipe name>/`` unless ``--out`` is given; see
:mod:`qft.train.loop` for the layout.
"""

from __future__ import annotations

import argparse
import json

from pathlib import Path

from qft.commands._options import add_run_arguments, stop_after_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file (see recipes/reference/)")
    parser.add_argument(
        "--lambda",
        dest="lmbda",
        type=float,
        help="train only this rate point of the schedule",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the recipe's device")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue existing checkpoints, skip finished points",
    )
    parser.add_argument(
        "--init",
        metavar="CKPT",
        help="start the --lambda point from this model checkpoint (file or shipped name) "
        "and train it for the warm-start step count (--warm-steps)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/reference/<recipe name>)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (overrides the recipe)")
    parser.add_argument(
        "--steps",
        type=int,
        help="steps of the first point (overrides schedule.first_steps)",
    )
    parser.add_argument("--warm-steps", type=int, help="steps of each warm-started point")
    add_run_arguments(parser, "steps of the current point")


def run(args: argparse.Namespace) -> int:
    from qft.train import load_recipe, train

    recipe = load_recipe(args.recipe)
    overrides = {
        k: v
        for k, v in (
            ("threads", args.threads),
            ("first_steps", args.steps),
            ("warm_steps", args.warm_steps),
        )
        if v is not None
    }
    if overrides:
        recipe = recipe.replace(**overrides)
    out = args.out or Path("runs") / "reference" / Path(args.recipe).stem
    summaries = train(
        recipe,
        out,
        lmbda=args.lmbda,
        device=args.device,
        resume=args.resume,
        stop_after=stop_after_from_args(args),
        init_from=args.init,
        progress=not args.no_progress,
    )
    for s in summaries:
        print(
            json.dumps(
                {
                    k: s[k]
                    for k in (
                        "lambda",
                        "init",
                        "step",
                        "steps",
                        "finished",
                        "wall_time_s",
                        "val",
                    )
                }
            )
        )
    return 0
