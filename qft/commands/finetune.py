"""``qft finetune``: finetune the decoder on genuinely quantized latents.

::

    qft finetune -m mine.pth.tar --data my-images/ --lambda 0.013 --out runs/ft-mine   # the default recipe
    qft finetune recipes/finetune/cpu.yaml -m base.pth --lambda 0.0130
    qft finetune RECIPE -m base.pth -q usq --parts decoder+hyperdecoder --out runs/ft/usq
    qft finetune RECIPE -m base.pth --control            # the noise-proxy control arm
    qft finetune recipes/finetune/slices-cpu.yaml -m tcm.pth --parts decoder+entropy   # TCM, DCAE, CCA, MLIC++
    torchrun --nproc_per_node=4 -m qft finetune RECIPE -m base.pth --device cuda

Command-line options override the recipe; without a recipe, ``recipes/finetune/cpu.yaml``
of the qft source tree is used. ``--data DIR`` trains on the images directly in ``DIR``
(instead of the recipe's ``data``). Outputs go to ``runs/finetune/<recipe name>/`` unless
``--out`` is given; ``model.pth`` there is a
normal qft checkpoint whose metadata names the base model (``finetuned_from``), the
quantizer, the parts and λ. See :mod:`qft.finetune.loop` for the layout.
"""

from __future__ import annotations

import argparse
import json
import os

from pathlib import Path

from qft.commands._options import add_quantizer_arguments, add_run_arguments, stop_after_from_args
from qft.finetune.parts import PARTS

__all__ = ["add_arguments", "run"]

#: the quantizer options whose recipe value is kept when not given on the command line
_QUANTIZER_OPTIONS = {
    "quantizer": "method",
    "step": "step",
    "lambda_t": "lambda_t",
    "lambda_mult": "lambda_mult",
    "reset": "reset",
    "weights": "weights",
    "target": "target",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML file (default: recipes/finetune/cpu.yaml)")
    parser.add_argument("-m", "--checkpoint", help="base model checkpoint (overrides the recipe)")
    parser.add_argument("--arch", help="architecture id (default: detected from the checkpoint)")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow checkpoints that need full pickle loading (only for files you trust)",
    )
    add_quantizer_arguments(parser)
    parser.set_defaults(**{k: None for k in _QUANTIZER_OPTIONS})
    parser.add_argument(
        "--parts",
        choices=PARTS,
        help="trained parts: decoder (g_s; for TCM/DCAE/CCA also the LRP), decoder+hyperdecoder "
        "(hyperprior models: + h_s), decoder+entropy (TCM/DCAE/CCA: + the whole entropy path after z)",
    )
    parser.add_argument(
        "--requantize-every",
        type=int,
        metavar="K",
        help="decoder+hyperdecoder: re-quantize the training latents with the current "
        "hyper-decoder every K steps (0: keep the base model's indices)",
    )
    parser.add_argument(
        "--lambda",
        dest="lmbda",
        type=float,
        help="λ of the loss λ·255²·MSE (+ bpp): the base model's rate point",
    )
    parser.add_argument("--steps", type=int, help="training steps")
    parser.add_argument(
        "--data", type=Path, metavar="DIR", help="train on the images directly in DIR (default: the recipe's data)"
    )
    parser.add_argument("--lr", type=float, help="Adam learning rate")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="override the recipe's device")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")
    parser.add_argument(
        "--control",
        action="store_true",
        help="control arm: conventional noise-proxy training of the same parts",
    )
    parser.add_argument("--cache", type=Path, help="latent cache folder (default: OUT/cache)")
    parser.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pth")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/finetune/<recipe name>)")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from qft.finetune import default_recipe, finetune, load_finetune_recipe, override_recipe

    recipe_path = args.recipe or default_recipe()
    recipe = load_finetune_recipe(recipe_path)
    overrides = {
        field: getattr(args, option)
        for option, field in {
            **_QUANTIZER_OPTIONS,
            "checkpoint": "checkpoint",
            "arch": "arch",
            "parts": "parts",
            "requantize_every": "requantize_every",
            "lmbda": "lmbda",
            "steps": "steps",
            "lr": "lr",
            "device": "device",
            "threads": "threads",
        }.items()
    }
    recipe = override_recipe(recipe, data=args.data, **overrides)
    out = args.out or Path("runs") / "finetune" / Path(recipe_path).stem
    summary = finetune(
        recipe,
        out,
        control=args.control,
        cache_dir=args.cache,
        resume=args.resume,
        stop_after=stop_after_from_args(args),
        unsafe_load=args.unsafe_load,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0
    keys = (
        "finetuned_from",
        "parts",
        "control",
        "lambda",
        "step",
        "steps",
        "finished",
        "wall_time_s",
        "model",
    )
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0
