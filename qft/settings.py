"""Quantizer settings: the defaults, the per-checkpoint calibration file and the rule that
turns a method and the user's options into the quantizer every command uses.

This module sits between the codec and its users (eval, train, finetune, commands); it
knows nothing of the command line (the commands map their options onto
:func:`resolve_quantizer`'s arguments).

**Defaults** when the checkpoint has no ``qft calibrate`` settings file (docs/design.md,
"Quantizer calibration"; chosen on BSDS500 validation images across the shipped reference
models, never on a test set):

* USQ: step 1 (CompressAI's rounding).
* RDOQ: step 1, ``λ_T = m · (ln 2 / 6) Δ²``.
* TCQ-4/8: union step ``Δ = 0.7``, ``λ_T = m · 2^(1/12) (ln 2 / 6) (2Δ / 2^(1/6))²`` — VVC's
  rule (the high-rate slope of a scalar quantizer with TCQ's per-quantizer step, times
  2^(1/12)) scaled by ``m``.

``m`` is ``lambda_mult`` (``--lambda-mult``), default 0.025: the plain VVC rule (``m = 1``)
makes TCQ lose to USQ in the image domain of these noise-trained models. ``lambda_t``
(``--lambda-t``) sets λ_T directly.

**Names of the two λs.** ``lambda_t`` is the trellis Lagrangian λ_T of
``J = SSE + λ_T·bits`` (the engine's ``trellis.Quantizer.lam``); ``lmbda`` (CompressAI's
name) is the model's training λ of ``λ·255²·MSE + bpp``, recorded in checkpoints as
``"lambda"`` and read here as ``model_lambda`` (for ``--target rd``).

**Settings file.** ``qft calibrate`` writes ``<checkpoint>.qft.json`` next to the
checkpoint (for a shipped model, next to the shipped file)::

    {"format": "qft-settings/1",
     "checkpoint_sha256": "…",            # the file it belongs to
     "weights": {"decoder": [w_0, …, w_{C-1}], "estimator": …, "data": …},
     "methods": {"tcq8": {"step": 0.7, "lambda_mult": 0.025, "weights": "decoder",
                          "saving": -3.1, …}, "rdoq": {…}, "tcq4": {…}},
     "calibration": {"data": …, "images": […], "grid": …}}

:func:`resolve_quantizer` turns a method and the user's explicit options into the
quantizer and distortion weights, in this order of precedence: explicit option > the
checkpoint's settings file > the global defaults above. A settings file whose
``checkpoint_sha256`` differs from the checkpoint is ignored with a warning (it belongs to
another file); a finetuned delta checkpoint uses its base's settings (its encoder is the
base's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trellis import Quantizer

from qft.errors import UserError
from qft.files import atomic_write

if TYPE_CHECKING:  # torch is imported when a checkpoint is read, not by `qft <command> --help`
    from qft.codec import RDTarget, SGARefine
    from qft.models import LoadedCheckpoint

__all__ = [
    "DEFAULT_LAMBDA_MULT",
    "DEFAULT_TCQ_STEP",
    "default_step",
    "default_lambda",
    "DEFAULT_TARGET_ETA",
    "default_target",
    "target_value",
    "SETTINGS_FORMAT",
    "WEIGHT_CHOICES",
    "REFINE_CHOICES",
    "DEFAULT_REFINE_STEPS",
    "QuantizerChoice",
    "quantizer_identity",
    "settings_path",
    "read_settings",
    "write_settings",
    "resolve_quantizer",
    "weights_digest",
]

DEFAULT_LAMBDA_MULT = 0.025
DEFAULT_TCQ_STEP = 0.7
_SLOPE = math.log(2) / 6  # dD/dR of an entropy-coded uniform quantizer of step 1, per bit

SETTINGS_FORMAT = "qft-settings/1"
#: ``--weights``: the settings' choice, none, the checkpoint's decoder weights, or a file
WEIGHT_CHOICES = ("auto", "none", "decoder")
#: ``--refine``: the encoder's latent refinement (qft.codec.refine): none, or SGA
REFINE_CHOICES = ("none", "sga")
#: ``--refine-steps``: Adam steps per image of SGA
DEFAULT_REFINE_STEPS = 200


def default_step(method: str) -> float:
    """The default step of a method: 1 for USQ/RDOQ, the calibrated union step for TCQ."""
    return DEFAULT_TCQ_STEP if method.startswith("tcq") else 1.0


def default_lambda(method: str, step: float, mult: float = DEFAULT_LAMBDA_MULT) -> float:
    """The default trellis λ_T of a method at a step (0 for USQ)."""
    if method == "usq":
        return 0.0
    if method == "rdoq":
        return mult * _SLOPE * step**2
    return mult * 2 ** (1 / 12) * _SLOPE * (2 * step / 2 ** (1 / 6)) ** 2


#: η of the decoder target of RDOQ/TCQ for a checkpoint with neither calibration nor a known λ
DEFAULT_TARGET_ETA = 0.125


def default_target(method: str, model_lambda: float | None) -> str | float:
    """The decoder target of a method without a calibrated choice: 0 for USQ (plain
    rounding, the reference); for RDOQ/TCQ ``"rd"`` when the model's training λ is known,
    else :data:`DEFAULT_TARGET_ETA` (docs/design.md, "A user's checkpoint")."""
    if method == "usq":
        return 0.0
    return "rd" if model_lambda else DEFAULT_TARGET_ETA


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


def settings_path(checkpoint: str | Path) -> Path:
    """``<checkpoint without .pth>.qft.json`` beside the (resolved) checkpoint file."""
    from qft.models.zoo import resolve

    path = resolve(checkpoint)
    return path.with_name(path.name.removesuffix(".pth") + ".qft.json")


def read_settings(ck: LoadedCheckpoint) -> dict[str, Any]:
    """The settings of a loaded checkpoint: its settings file, ``{}`` when there is none
    (or it belongs to another file: a warning says so). A delta checkpoint reads its
    base's file; a finetuned checkpoint's own method defaults to the quantizer (step, λ,
    weights) it was finetuned on, and to the decoder target it was finetuned with or, when
    it was finetuned on plainly quantized latents, the base's calibrated target (an
    encoder-side choice that the finetuning did not see: docs/design.md, "Decoder target")."""
    from qft.models.zoo import base_of, resolve

    path, sha = resolve(ck.path), ck.sha256
    if "delta_of" in ck.extra:
        path = base_of(path, str(ck.extra["delta_of"]))
        sha = str(ck.extra.get("base_sha256"))
    settings = _read_file(settings_path(path), sha)
    if isinstance(ck.extra.get("lambda"), (int, float)):  # the model's training λ, for --target rd
        settings = settings | {"model_lambda": float(ck.extra["lambda"])}
    rec = ck.extra.get("quantizer")
    if isinstance(rec, dict) and {"method", "step", "lam"} <= set(rec):
        # a finetuned model: by default its quantizer is the one it was finetuned on
        methods = dict(settings.get("methods", {}))
        target = rec.get("target", methods.get(rec["method"], {}).get("target", 0.0))
        methods[rec["method"]] = {
            "step": rec["step"],
            "lambda_t": rec["lam"],
            "weights": "decoder" if "weights" in rec else "none",
            "target": target,
            "finetuned": True,
        }
        settings = settings | {"methods": methods}
    return settings


def _read_file(file: Path, sha: str) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        settings = json.loads(file.read_text())
    except (OSError, ValueError):
        raise UserError(f"{file} is not a readable settings file; delete it or re-run qft calibrate") from None
    if settings.get("format") != SETTINGS_FORMAT:
        raise UserError(f"{file}: format {settings.get('format')!r}, this version reads {SETTINGS_FORMAT}")
    if settings.get("checkpoint_sha256") != sha:
        warnings.warn(f"{file} belongs to another checkpoint file; ignored (re-run qft calibrate)", stacklevel=2)
        return {}
    return settings


def write_settings(checkpoint: str | Path, sha256: str, update: dict[str, Any]) -> Path:
    """Merge ``update`` into the checkpoint's settings file (created if absent)."""
    file = settings_path(checkpoint)
    settings: dict[str, Any] = {}
    if file.is_file():
        settings = json.loads(file.read_text())
        if settings.get("checkpoint_sha256") != sha256:
            settings = {}
    settings |= {"format": SETTINGS_FORMAT, "checkpoint_sha256": sha256} | update
    return atomic_write(file, json.dumps(settings, indent=1))


def weights_digest(weights: np.ndarray | None) -> str | None:
    """SHA-256 of distortion weights as contiguous float64 (``None`` for no weights): what
    identifies them in the finetuning cache and the report's cells."""
    if weights is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(weights, np.float64).tobytes()).hexdigest()


def quantizer_identity(quantizer: Quantizer) -> dict[str, Any]:
    """The quantizer's fields as a dict: what identifies it in the finetuning cache and the
    report's cells. TCQ's plain rows appear when set, so a quantizer without them keeps the
    identity it had before they existed (and caches and cells made then stay valid)."""
    out = dataclasses.asdict(quantizer)
    if not out["plain_rows"]:
        del out["plain_rows"]
    return out


@dataclass(frozen=True)
class QuantizerChoice:
    """A quantizer with its encoder-side distortion weights and decoder target, and where
    they came from."""

    quantizer: Quantizer
    weights: np.ndarray | None
    source: str  # "explicit", "calibrated" or "default"
    target: float | RDTarget = 0.0  # η of the decoder target (qft.codec.latent), or its per-image choice; 0: none
    refine: SGARefine | None = None  # the encoder's latent refinement (qft.codec.refine); None: none

    def describe(self) -> dict[str, Any]:
        from qft.codec import target_record

        q = self.quantizer
        return {
            "method": q.method,
            "step": q.step,
            "lambda_t": q.lam,
            "reset": q.reset,
            "plain_rows": q.plain_rows,
            "weights": self.weights is not None,
            "target": target_record(self.target),
            "refine": "none" if self.refine is None else self.refine.record(q),
            "source": self.source,
        }


def _recorded_lambda_t(method_settings: dict[str, Any]) -> float | None:
    """The λ_T a method's settings record: ``"lambda_t"``, or ``"lambda"`` as settings
    written before the two λs had distinct names called it."""
    return method_settings.get("lambda_t", method_settings.get("lambda"))


def _weights_file(path: str) -> np.ndarray:
    try:
        if path.endswith(".json"):
            data = json.loads(Path(path).read_text())
            data = data.get("weights", {}).get("decoder", data) if isinstance(data, dict) else data
            return np.asarray(data, np.float64)
        return np.load(path).astype(np.float64)
    except (OSError, ValueError) as exc:
        raise UserError(f"--weights {path}: not a readable weights file ({exc.__class__.__name__})") from None


def resolve_quantizer(
    method: str,
    settings: dict[str, Any],
    *,
    step: float | None = None,
    lambda_t: float | None = None,
    lambda_mult: float | None = None,
    reset: str = "channel",
    weights: str = "auto",
    step_scale: float = 1.0,
    target: str | float = "auto",
    refine: str = "none",
    refine_steps: int = DEFAULT_REFINE_STEPS,
    refine_fallback: bool = False,
    plain_rows: int | None = None,
) -> QuantizerChoice:
    """The quantizer of ``method`` for a checkpoint with ``settings`` (:func:`read_settings`).

    Args:
        step, lambda_t, lambda_mult: explicit values (``None``: calibrated, else default).
        plain_rows: TCQ's plain rows (:attr:`trellis.Quantizer.plain_rows`; ``None``: the
            calibrated value, else 0).
        weights: ``"auto"`` (the calibrated choice: decoder weights if calibration chose
            them), ``"none"``, ``"decoder"`` (the settings' decoder weights) or a file
            (``.npy`` or a settings/JSON file) holding one weight per latent channel.
        step_scale: multiplies the resolved step (λ follows the step through the rule,
            unless ``lambda_t`` is explicit); sweeps the rate around the operating point.
        target: ``η`` of the decoder target (a number ≥ 0), ``"rd"`` (an
            :class:`~qft.codec.RDTarget` at the model's training λ, ``settings["model_lambda"]``),
            or ``"auto"``: the calibrated one (``qft calibrate --targets``; 0 if the
            calibration tried none), else :func:`default_target`.
        refine: ``"none"`` or ``"sga"``: the latents refined by ``refine_steps`` Adam steps
            of SGA (:class:`~qft.codec.SGARefine`) at the model's training λ before the
            quantizer codes them. With SGA the decoder target is off (``"auto"`` gives 0, an
            explicit one is refused): SGA already optimises the latent for the decoder, by the
            full loss rather than one linearised step (docs/design.md, "SGA refinement").
        refine_fallback: with SGA and a quantizer other than USQ, also code SGA's latent by
            USQ and keep the stream with the lower RD cost (:attr:`SGARefine.usq_fallback`).

    Raises:
        UserError: decoder weights asked for but not estimated; unreadable weights file;
            invalid values; SGA without the model's λ, or with a decoder target.
    """
    from qft.codec import RDTarget, SGARefine

    if refine not in REFINE_CHOICES:
        raise UserError(f"--refine must be one of {', '.join(REFINE_CHOICES)}, got {refine!r}")
    sga = None
    if refine == "sga":
        if "model_lambda" not in settings:
            raise UserError(
                "--refine sga minimises the model's RD loss at its training λ, which this checkpoint does "
                "not record; record it with qft calibrate -m CKPT --lambda L"
            )
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 1:
            raise UserError(f"--refine-steps must be an integer >= 1, got {refine_steps!r}")
        if target not in ("auto", 0, 0.0):
            raise UserError("--refine sga replaces the decoder target; drop --target (or give --target 0)")
        target = 0.0
        if refine_fallback and method == "usq":
            raise UserError("--refine-fallback weighs another quantizer against USQ; give -q rdoq, tcq4 or tcq8")
        sga = SGARefine(float(settings["model_lambda"]), refine_steps, usq_fallback=bool(refine_fallback))
    elif refine_fallback:
        raise UserError("--refine-fallback chooses between two SGA-refined streams; give --refine sga")

    cal = settings.get("methods", {}).get(method, {})
    choice = cal.get("weights", "none") if weights == "auto" else weights
    cal = cal.get("by_weights", {}).get(choice, cal)  # calibrated for this weight choice
    explicit = step is not None or lambda_t is not None or lambda_mult is not None
    source = "explicit" if explicit else "calibrated" if cal else "default"
    step = step if step is not None else cal.get("step", default_step(method))
    step *= step_scale
    mult = lambda_mult if lambda_mult is not None else cal.get("lambda_mult", DEFAULT_LAMBDA_MULT)
    if lambda_t is not None:
        lam = lambda_t
    elif lambda_mult is None and _recorded_lambda_t(cal) is not None:  # a finetuned model's λ_T (∝ Δ²)
        lam = _recorded_lambda_t(cal) * step_scale**2
    else:
        lam = default_lambda(method, step, mult)
    w = None
    if method != "usq" and choice != "none":
        if choice == "decoder":
            if "weights" not in settings:
                raise UserError("no decoder weights for this checkpoint; run qft calibrate --weights first")
            w = np.asarray(settings["weights"]["decoder"], np.float64)
        else:
            w = _weights_file(choice)
        if w.ndim != 1 or not np.all(np.isfinite(w)) or not np.all(w > 0):
            raise UserError("distortion weights must be one finite positive value per latent channel")
    try:
        auto = cal.get("target", 0.0) if cal else default_target(method, settings.get("model_lambda"))
        eta = target_value(auto if target == "auto" else target, allow_auto=False)
    except ValueError:
        raise UserError(f"--target must be auto, rd or a number >= 0, got {target!r}") from None
    if eta == "rd":
        if "model_lambda" not in settings:
            raise UserError(
                "--target rd weighs rate against distortion at the model's training λ, which this "
                "checkpoint does not record; record it with qft calibrate -m CKPT --lambda L, "
                "or give a fixed η instead (e.g. --target 0.125)"
            )
        eta = RDTarget(settings["model_lambda"])
    if plain_rows is None:
        plain_rows = int(cal.get("plain_rows", 0)) if method.startswith("tcq") else 0
    try:
        q = Quantizer(method, step=step, lam=lam, reset=reset, plain_rows=plain_rows)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    try:
        _ = q.table  # built (and cached) here, so a step too fine for 16-bit tables fails clearly
    except ValueError:
        raise UserError(
            f"step {step:g} is too small for the 16-bit coding tables; use a step of at least 0.05"
        ) from None
    return QuantizerChoice(q, w, source, eta, sga)
