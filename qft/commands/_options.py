"""Options shared by the commands that load a checkpoint and quantize with it.

The command-line face of :mod:`qft.settings`: the quantizer options map one to one onto
:func:`qft.settings.resolve_quantizer`'s arguments, whose docstring (and the module's) gives
the defaults and their precedence.
"""

from __future__ import annotations

import argparse

from trellis import MAX_PLAIN_ROWS, METHODS, RESETS

from qft.errors import UserError
from qft.settings import (
    DEFAULT_LAMBDA_MULT,
    DEFAULT_REFINE_STEPS,
    DEFAULT_TARGET_ETA,
    DEFAULT_TCQ_STEP,
    REFINE_CHOICES,
    QuantizerChoice,
    resolve_quantizer,
    target_value,
)

__all__ = [
    "add_checkpoint_arguments",
    "add_output_arguments",
    "add_quantizer_arguments",
    "add_run_arguments",
    "stop_after_from_args",
    "quantizer_from_args",
    "device_from_args",
]


def add_checkpoint_arguments(parser: argparse.ArgumentParser, many: bool = False) -> None:
    parser.add_argument(
        "-m",
        "--checkpoint",
        required=True,
        nargs="+" if many else None,
        metavar="CKPT",
        help="checkpoint file(s)" if many else "checkpoint file",
    )
    parser.add_argument("--arch", help="architecture id (default: detected from the checkpoint's keys)")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="allow checkpoints that need full pickle loading (only for files you trust)",
    )
    parser.add_argument(
        "--cuda", action="store_true", help="run the transforms on CUDA (entropy parameters stay on CPU)"
    )


def add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``-o/--output`` (required; ``what`` it is) and ``--force``: an existing output is
    refused unless ``--force`` (:func:`qft.files.check_output`, before any work)."""
    parser.add_argument("-o", "--output", required=True, help=what)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def add_run_arguments(parser: argparse.ArgumentParser, steps: str = "steps") -> None:
    """The options of a training run (``qft train``, ``qft finetune``: the one training
    scaffold): ``--stop-after STEP`` (once STEP ``steps`` are done; checked by
    :func:`stop_after_from_args`) and ``--no-progress``."""
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help=f"stop with a checkpoint once STEP {steps} are done",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def stop_after_from_args(args: argparse.Namespace) -> int | None:
    """``--stop-after`` (None: run to the end).

    Raises:
        UserError: it is below 1.
    """
    if args.stop_after is not None and args.stop_after < 1:
        raise UserError("--stop-after must be at least 1")
    return args.stop_after


def add_quantizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quantizer (defaults: the checkpoint's qft calibrate file, else the global rule)")
    g.add_argument("-q", "--quantizer", choices=METHODS, default="usq", help="latent quantizer (default: usq)")
    g.add_argument("--step", type=float, help=f"USQ/RDOQ step, or TCQ union step (default: 1, TCQ {DEFAULT_TCQ_STEP})")
    g.add_argument("--lambda-t", type=float, help="trellis λ_T of J = SSE + λ_T·bits (overrides --lambda-mult)")
    g.add_argument(
        "--lambda-mult",
        type=float,
        help=f"multiplier of the VVC-style λ rule (default: {DEFAULT_LAMBDA_MULT}, calibrated)",
    )
    g.add_argument("--reset", choices=RESETS, default="channel", help="trellis chains (default: one per channel)")
    g.add_argument(
        "--plain-rows",
        type=int,
        metavar="N",
        help=f"TCQ: elements of the first N scale-table rows (scale below SCALE_TABLE[N]; 12: about 0.48) are "
        f"rounded at step 1 outside the trellis (0 to {MAX_PLAIN_ROWS}; default: calibrated, else 0)",
    )
    g.add_argument(
        "--weights",
        default="auto",
        metavar="auto|none|decoder|FILE",
        help="RDOQ/TCQ distortion weights per latent channel: the calibrated choice (auto, default), "
        "none, the checkpoint's decoder-sensitivity weights, or a .npy/.json file",
    )
    g.add_argument(
        "--target",
        default="auto",
        type=_target_option,
        metavar="auto|rd|ETA",
        help="decoder target: quantize y + ETA·(damped Gauss-Newton step towards a latent the decoder "
        "renders closer to the image); rd: ETA chosen per image by the model's RD cost "
        "(needs its training λ); auto (default): the calibrated choice, else for RDOQ/TCQ rd when the "
        f"model's λ is known or {DEFAULT_TARGET_ETA} (USQ: 0, off)",
    )
    g.add_argument(
        "--refine",
        choices=REFINE_CHOICES,
        default="none",
        help="encoder-side latent refinement before quantization: sga (stochastic Gumbel annealing, Adam on "
        "the model's RD loss at its training λ; with -q tcq4/tcq8 the last half of the steps run through the "
        "relaxed trellis; the decoder target is then off) or none (default)",
    )
    g.add_argument(
        "--refine-steps",
        type=int,
        default=DEFAULT_REFINE_STEPS,
        metavar="N",
        help=f"Adam steps per image of --refine sga (default: {DEFAULT_REFINE_STEPS})",
    )
    g.add_argument(
        "--refine-fallback",
        action="store_true",
        help="with --refine sga and -q rdoq/tcq4/tcq8: also code SGA's latent by USQ and keep the stream with "
        "the lower RD cost at the model's λ (about 1.6x SGA + USQ's encode time; the stream says which)",
    )


def _target_option(text: str) -> str | float:
    """``--target`` on the command line: :func:`target_value` of ``auto``, ``rd`` or a number."""
    try:
        return target_value(text if text in ("auto", "rd") else float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, rd or a number >= 0, got {text!r}") from None


def quantizer_from_args(args: argparse.Namespace, settings: dict | None = None) -> QuantizerChoice:
    """The :class:`qft.settings.QuantizerChoice` of the options and a checkpoint's
    settings (:func:`qft.settings.read_settings`); raises UserError for bad values."""
    return resolve_quantizer(
        args.quantizer,
        settings or {},
        step=args.step,
        lambda_t=args.lambda_t,
        lambda_mult=args.lambda_mult,
        reset=args.reset,
        weights=getattr(args, "weights", "auto"),
        target=getattr(args, "target", "auto"),
        refine=getattr(args, "refine", "none"),
        refine_steps=getattr(args, "refine_steps", DEFAULT_REFINE_STEPS),
        refine_fallback=getattr(args, "refine_fallback", False),
        plain_rows=getattr(args, "plain_rows", None),
    )


def device_from_args(args: argparse.Namespace) -> str:
    import torch

    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda given but no CUDA device is available")
    return "cuda" if args.cuda else "cpu"
