"""The ``qft`` command line.

Every subcommand lives in its own module under :mod:`qft.commands` and exposes
``add_arguments(parser)`` and ``run(args) -> int``. A module is imported only when its
subcommand runs, so ``qft --help`` stays fast (no torch import).

Errors caused by the user's input are raised as :class:`qft.errors.UserError` and printed
as one line (``qft <command>: error: ...``) with exit status 2. Warnings meant for the user
(an image converted to RGB, a stale calibration file ignored, …) are printed as one line
too (``qft <command>: warning: ...``); the deprecation notice that CompressAI's
``torch.jit.script`` calls raise on import under recent torch is not shown: nothing a user
can act on.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from collections.abc import Sequence

from qft.errors import UserError

__all__ = ["main", "COMMANDS"]

#: subcommand -> (module under qft.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "quickstart",
        "the shipped models on 2 bundled Kodak images: USQ vs TCQ-8, decoder target, finetuned",
    ),
    "train": ("train", "train a reference model from a YAML recipe"),
    "finetune": ("finetune", "finetune the decoder on latents quantized as at inference"),
    "ship": ("ship", "ship a finished finetuning run as a delta checkpoint of its base with a manifest entry"),
    "models": ("models", "list the registered architectures and their parameters, or the shipped checkpoints"),
    "init": ("init", "write a randomly initialised checkpoint of any architecture"),
    "compress": ("compress", "code an image into a .qft bitstream"),
    "decompress": ("decompress", "decode a .qft bitstream into a PNG"),
    "eval": ("eval", "evaluate checkpoints on an image folder with real bitstreams (CompressAI JSON)"),
    "calibrate": ("calibrate", "choose Δ, λ_T (and decoder weights) per checkpoint on held-out images"),
    "bdrate": ("bdrate", "BD-rate of a test curve against an anchor (CompressAI JSON)"),
    "report": ("report", "BD-rate tables and RD plots of quantizers x models on a dataset"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="qft",
        description="Post-training quantization and finetuning of learned image codecs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {name: sub.add_parser(name, help=h, description=h) for name, (_, h) in COMMANDS.items()}
    name = argv[0] if argv else None
    if name not in COMMANDS:
        parser.parse_args(argv)  # usage, --help or the error naming the commands
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        warnings.showwarning = _one_line_warning(name)
        module = importlib.import_module(f"qft.commands.{COMMANDS[name][0]}")
        module.add_arguments(parsers[name])
        args = parser.parse_args(argv)
        try:
            return int(module.run(args) or 0)
        except UserError as exc:
            print(f"qft {name}: error: {exc}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # output piped into `head` & co., which stopped reading
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1


def _one_line_warning(command: str):
    """A :func:`warnings.showwarning` that prints ``qft <command>: warning: <message>``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"qft {command}: warning: {message}", file=file or sys.stderr)

    return show
