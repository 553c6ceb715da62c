"""Options shared by the commands that load a checkpoint and quantize with it.

Quantizer defaults when the checkpoint has no ``qft calibrate`` settings file
(docs/design.md, "Quantizer calibration"; chosen on BSDS500 validation images across the
shipped reference models, never on a test set):

* USQ: step 1 (CompressAI's rounding).
* RDOQ: step 1, ``λ = m · (ln 2 / 6) Δ²``.
* TCQ-4/8: union step ``Δ = 0.7``, ``λ_T = m · 2^(1/12) (ln 2 / 6) (2Δ / 2^(1/6))²`` — VVC's
  rule (the high-rate slope of a scalar quantizer with TCQ's per-quantizer step, times
  2^(1/12)) scaled by ``m``.

``m`` is ``--lambda-mult``, default 0.025: the plain VVC rule (``m = 1``) makes TCQ lose to
USQ in the image domain of these noise-trained models. ``--lambda-t`` sets λ directly.

Decoder target of RDOQ/TCQ without a calibrated choice (:func:`default_target`): ``rd``
(``η`` per image) when the model's training λ is known, else the fixed ``η = 0.125``
(docs/design.md, "A user's checkpoint"). USQ stays plain rounding (target 0).
"""

from __future__ import annotations

import argparse
import math

from typing import Any

from trellis import METHODS, RESETS, Quantizer

__all__ = [
    "DEFAULT_LAMBDA_MULT",
    "add_checkpoint_arguments",
    "add_quantizer_arguments",
    "default_step",
    "default_lambda",
    "default_target",
    "quantizer_from_args",
    "target_value",
    "device_from_args",
]

DEFAULT_LAMBDA_MULT = 0.025
DEFAULT_TCQ_STEP = 0.7
#: η of the decoder target of RDOQ/TCQ for a checkpoint with neither calibration nor a known λ
DEFAULT_TARGET_ETA = 0.125
_SLOPE = math.log(2) / 6  # dD/dR of an entropy-coded uniform quantizer of step 1, per bit


def default_step(method: str) -> float:
    """The default step of a method: 1 for USQ/RDOQ, the calibrated union step for TCQ."""
    return DEFAULT_TCQ_STEP if method.startswith("tcq") else 1.0


def default_lambda(method: str, step: float, mult: float = DEFAULT_LAMBDA_MULT) -> float:
    """The default Lagrange multiplier of a method at a step (0 for USQ)."""
    if method == "usq":
        return 0.0
    if method == "rdoq":
        return mult * _SLOPE * step**2
    return mult * 2 ** (1 / 12) * _SLOPE * (2 * step / 2 ** (1 / 6)) ** 2


def default_target(method: str, model_lambda: float | None) -> str | float:
    """The decoder target of a method without a calibrated choice: 0 for USQ (plain
    rounding, the reference); for RDOQ/TCQ ``"rd"`` when the model's training λ is known,
    else :data:`DEFAULT_TARGET_ETA`."""
    if method == "usq":
        return 0.0
    return "rd" if model_lambda else DEFAULT_TARGET_ETA


def add_checkpoint_arguments(parser: argparse.ArgumentParser, many: bool = False) -> None:
    parser.add_argument("-m", "--checkpoint", required=True, nargs="+" if many else None, metavar="CKPT",
                        help="checkpoint file(s)" if many else "checkpoint file")
    parser.add_argument("--arch", help="architecture id (default: detected from the checkpoint's keys)")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="allow checkpoints that need full pickle loading (only for files you trust)")
    parser.add_argument("--cuda", action="store_true", help="run the transforms on CUDA (entropy parameters stay on CPU)")


def add_quantizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("quantizer (defaults: the checkpoint's qft calibrate file, else the global rule)")
    g.add_argument("-q", "--quantizer", choices=METHODS, default="usq", help="latent quantizer (default: usq)")
    g.add_argument("--step", type=float, help=f"USQ/RDOQ step, or TCQ union step (default: 1, TCQ {DEFAULT_TCQ_STEP})")
    g.add_argument("--lambda-t", type=float, help="λ of J = SSE + λ·bits (overrides --lambda-mult)")
    g.add_argument("--lambda-mult", type=float,
                   help=f"multiplier of the VVC-style λ rule (default: {DEFAULT_LAMBDA_MULT}, calibrated)")
    g.add_argument("--reset", choices=RESETS, default="channel", help="trellis chains (default: one per channel)")
    g.add_argument("--weights", default="auto", metavar="auto|none|decoder|FILE",
                   help="RDOQ/TCQ distortion weights per latent channel: the calibrated choice (auto, default), "
                        "none, the checkpoint's decoder-sensitivity weights, or a .npy/.json file")
    g.add_argument("--target", default="auto", type=_target_option, metavar="auto|rd|ETA",
                   help="decoder target: quantize y + ETA·(damped Gauss-Newton step towards a latent the decoder "
                        "renders closer to the image); rd: ETA chosen per image by the model's RD cost "
                        "(needs its training λ); auto (default): the calibrated choice, else for RDOQ/TCQ rd when the "
                        f"model's λ is known or {DEFAULT_TARGET_ETA} (USQ: 0, off)")


def target_value(value: Any, allow_auto: bool = True) -> str | float:
    """A decoder-target setting (``--target``, recipes, settings files): ``"auto"`` (when
    ``allow_auto``), ``"rd"`` (``η`` chosen per image) or a finite number ≥ 0, returned as
    float.

    Raises:
        ValueError: anything else (a bool, another string, NaN, a negative).
    """
    if value == "rd" or (allow_auto and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"expected {'auto, ' if allow_auto else ''}rd or a number >= 0, got {value!r}")
    return float(value)


def _target_option(text: str) -> str | float:
    """``--target`` on the command line: :func:`target_value` of ``auto``, ``rd`` or a number."""
    try:
        return target_value(text if text in ("auto", "rd") else float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, rd or a number >= 0, got {text!r}") from None


def quantizer_from_args(args: argparse.Namespace, settings: dict | None = None):
    """The :class:`qft.eval.settings.QuantizerChoice` of the options and a checkpoint's
    settings (:func:`qft.eval.settings.read_settings`); raises UserError for bad values."""
    from qft.eval.settings import resolve_quantizer

    return resolve_quantizer(args.quantizer, settings or {}, step=args.step, lambda_t=args.lambda_t,
                             lambda_mult=args.lambda_mult, reset=args.reset, weights=getattr(args, "weights", "auto"),
                             target=getattr(args, "target", "auto"))


def device_from_args(args: argparse.Namespace) -> str:
    import torch

    from qft.errors import UserError

    if args.cuda and not torch.cuda.is_available():
        raise UserError("--cuda given but no CUDA device is available")
    return "cuda" if args.cuda else "cpu"
