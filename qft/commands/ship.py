"""``qft ship``: ship a finished finetuning run as a delta checkpoint of its base and a
manifest entry (:mod:`qft.finetune.ship`).

::

    qft ship runs/finetune/tcq8                     # beside its base: <base>-ft-tcq8.pth
    qft ship runs/stage1 runs/stage2 --name my-ft   # a run continued from another, as stages
    qft ship runs/ft --base models/base.pth         # the base given (else the run's own)
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]

EPILOG = """\
The delta holds only the trained parts (g_s; h_s, or a slice model's LRP and entropy
path, when trained) in fp16 and names its base by file name and SHA-256: it is written
beside the base (for a shipped base, into qft/assets/checkpoints), and its entry
(quantizer, parts, λ, steps, SHA-256, size, recipe, wall time, machine) is added to the
manifest.json of that folder; every -m then takes it by path, and a shipped one by name.
Runs given one after the other are the stages of one model (each finetuned from the
previous one's model.pth, checked by SHA-256). An existing file or manifest entry of the
same name is never overwritten."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="qft finetune output folder(s) with model.pth and summary.json; several: the stages, base side first",
    )
    parser.add_argument(
        "--base", help="base checkpoint, path or shipped name (default: the one the first run started from)"
    )
    parser.add_argument(
        "--name", help="file name without .pth (default: <base>-ft-<method|control>[-hyperdecoder|-entropy])"
    )
    parser.add_argument(
        "--train-data", help="the manifest's description of the training data (default: from the recipe)"
    )


def run(args: argparse.Namespace) -> int:
    from qft.finetune.ship import ship_finetune

    entry = ship_finetune(args.runs, args.base, args.name, train_data=args.train_data)
    print(json.dumps({k: entry[k] for k in ("file", "finetuned_from", "parts", "steps", "bytes", "sha256")}))
    return 0
