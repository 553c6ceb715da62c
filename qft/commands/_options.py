"""Options shared by the commands that load a checkpoint and quantize with it.

Quantizer defaults (see docs/design.md, "Default Δ and λ_T"):

* USQ: step 1 (CompressAI's rounding).
* RDOQ: step 1, ``λ = m · (ln 2 / 6)``.
* TCQ-4/8: union step ``Δ = 2^(1/6)/2 ≈ 0.561`` (VVC), ``λ_T = m · 2^(1/12) (ln 2 / 6) (2Δ / 2^(1/6))²``
  (VVC's rule: the high-rate slope of a scalar quantizer of the same per-quantizer step, × 2^(1/12)).

``m`` is ``--lambda-mult`` (default 0.25: the VVC rule alone lets TCQ lose to USQ in the
image domain; see docs/design.md). ``--lambda-t`` sets λ directly.
"""

from __future__ import annotations

import argparse
import math

from trellis import METHODS, RESETS, Quantizer

__all__ = [
    "DEFAULT_LAMBDA_MULT",
    "add_checkpoint_arguments",
    "add_quantizer_arguments",
    "default_step",
    "default_lambda",
    "quantizer_from_args",
    "device_from_args",
]

DEFAULT_LAMBDA_MULT = 0.25
_SLOPE = math.log(2) / 6  # dD/dR of an entropy-coded uniform quantizer of step 1, per bit
_VVC_STEP = 2 ** (1 / 6) / 2


def default_step(method: str) -> float:
    """The default step of a method: 1 for USQ/RDOQ, VVC's union step for TCQ."""
    return _VVC_STEP if method.startswith("tcq") else 1.0


def default_lambda(method: str, step: float, mult: float = DEFAULT_LAMBDA_MULT) -> float:
    """The default Lagrange multiplier of a method at a step (0 for USQ)."""
    if method == "usq":
        return 0.0
    if method == "rdoq":
        return mult * _SLOPE * step**2
    return mult * 2 ** (1 / 12) * _SLOPE * (2 * step / 2 ** (1 / 6)) ** 2


def add_checkpoint_arguments(parser: argparse.ArgumentParser, many: bool = False) -> None:
    parser.add_argument("-m", "--checkpoint", required=True, nargs="+" if many else None, metavar="CKPT",
                        help="checkpoint file(s)" if many else "checkpoint file")
    parser.add_argument("--arch", help="architecture id (default: detected from the checkpoint's keys)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="allow checkpoints that need full pickle loading (only for files you trust)")
    parser.add_argument("--cuda", action="store_true", help="run the transforms on CUDA (entropy parameters stay on CPU)")


def add_quantizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quantizer")
    g.add_argument("-q", "--quantizer", choices=METHODS, default="usq", help="latent quantizer (default: usq)")
    g.add_argument("--step", type=float, help="USQ/RDOQ step, or TCQ union step (default: 1, TCQ 0.561)")
    g.add_argument("--lambda-t", type=float, help="λ of J = SSE + λ·bits (overrides --lambda-mult)")
    g.add_argument("--lambda-mult", type=float, default=DEFAULT_LAMBDA_MULT,
                   help=f"multiplier of the VVC-style default λ (default: {DEFAULT_LAMBDA_MULT})")
    g.add_argument("--reset", choices=RESETS, default="channel", help="trellis chains (default: one per channel)")


def quantizer_from_args(args: argparse.Namespace) -> Quantizer:
    """Builds the quantizer; raises ValueError (a UserError in the CLI) for bad values."""
    from qft.errors import UserError

    method = args.quantizer
    step = default_step(method) if args.step is None else args.step
    lam = default_lambda(method, step, args.lambda_mult) if args.lambda_t is None else args.lambda_t
    try:
        return Quantizer(method, step=step, lam=lam, reset=args.reset)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def device_from_args(args: argparse.Namespace) -> str:
    import torch

    from qft.errors import UserError

    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda given but no CUDA device is available")
    return "cuda" if args.cuda else "cpu"
