"""Finetuning recipes: a YAML file read into a validated :class:`FinetuneRecipe`.

Layout, every key required (``null`` where allowed)::

    checkpoint: null            # base model; null: give --checkpoint
    arch: null                  # null: detected from the checkpoint's keys
    lambda: null                # λ of λ·255²·MSE (+ bpp); null: the checkpoint's "lambda"
    parts: decoder              # decoder | decoder+hyperdecoder (hyperpriors) |
                                # decoder+entropy (channel slices; qft.finetune.parts)
    requantize_every: 0         # decoder+hyperdecoder: re-quantize with the current h_s
                                # every K steps; 0: the base model's indices throughout
    quantizer:                  # as `qft compress` (qft.settings.resolve_quantizer)
      method: tcq8              # usq | rdoq | tcq4 | tcq8
      step: null                # null: the method's default step
      lambda_t: null            # null: lambda_mult × the default λ_T
      lambda_mult: null         # null: calibrated (qft calibrate), else 0.025
      reset: channel
      weights: auto             # auto | none | decoder | FILE (as --weights)
      target: 0                 # optional (default 0: plain latents, which train the better
                                # decoder, docs/design.md): decoder target (as --target)
    seed: 0
    threads: 1
    device: auto                # auto | cpu | cuda
    batch_size: 8               # global batch (split over DDP processes)
    crop: 256                   # image crop, a multiple of 64 (latent crop crop/16)
    steps: 2000
    optimizer:
      lr: 5.0e-5                # Adam on the trained parts
      clip_max_norm: 1.0
    data:
      root: ../shared/data/bsds500   # relative to the project root
      train: [train, test]
    checkpoint_every: 250
    log_every: 25

Relative paths (``checkpoint``, ``data.root``) follow the rule of every recipe
(:func:`qft.train.recipe.recipe_path`): against the recipe's project root (the folder
above it holding ``pyproject.toml``), else the recipe's folder; ``checkpoint`` may be the
name of a shipped model.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

from trellis import METHODS, RESETS

from qft.errors import UserError
from qft.finetune.parts import PARTS
from qft.settings import target_value
from qft.train.recipe import check_section, read_yaml, recipe_path

__all__ = ["FinetuneRecipe", "default_recipe", "load_finetune_recipe", "override_recipe"]

_TOP = {
    "checkpoint",
    "arch",
    "lambda",
    "parts",
    "requantize_every",
    "quantizer",
    "seed",
    "threads",
    "device",
    "batch_size",
    "crop",
    "steps",
    "optimizer",
    "data",
    "checkpoint_every",
    "log_every",
}
_QUANTIZER = {"method", "step", "lambda_t", "lambda_mult", "reset", "weights"}
_OPTIMIZER = {"lr", "clip_max_norm"}
_DATA = {"root", "train"}


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    """A validated finetuning recipe (see the module docstring for the YAML layout)."""

    path: str
    checkpoint: str | None
    arch: str | None
    lmbda: float | None
    parts: str
    requantize_every: int
    method: str
    step: float | None
    lambda_t: float | None
    lambda_mult: float | None
    reset: str
    weights: str
    target: str | float
    seed: int
    threads: int
    device: str
    batch_size: int
    crop: int
    steps: int
    lr: float
    clip_max_norm: float
    data_root: str
    train_splits: tuple[str, ...]
    checkpoint_every: int
    log_every: int

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (str/int/float/list/None only), stored in checkpoints."""
        d = dataclasses.asdict(self)
        d["train_splits"] = list(self.train_splits)
        return d

    def replace(self, **changes: Any) -> FinetuneRecipe:
        """A copy with some fields changed (CLI overrides), re-validated."""
        new = dataclasses.replace(self, **changes)
        _validate(new)
        return new


def _validate(r: FinetuneRecipe) -> None:
    where = f"recipe {r.path}"
    if r.parts not in PARTS:
        raise UserError(f"{where}: parts must be one of {', '.join(PARTS)}, not '{r.parts}'")
    if r.method not in METHODS:
        raise UserError(f"{where}: quantizer.method must be one of {', '.join(METHODS)}, not '{r.method}'")
    if r.reset not in RESETS:
        raise UserError(f"{where}: quantizer.reset must be one of {', '.join(RESETS)}")
    if r.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{where}: device must be auto, cpu or cuda, not '{r.device}'")
    checks = [
        ("lambda", r.lmbda is None or r.lmbda > 0),
        ("quantizer.step", r.step is None or r.step > 0),
        ("quantizer.lambda_t", r.lambda_t is None or r.lambda_t >= 0),
        ("quantizer.lambda_mult", r.lambda_mult is None or r.lambda_mult >= 0),
        ("threads", r.threads >= 1),
        ("batch_size", r.batch_size >= 1),
        ("crop", r.crop >= 64 and r.crop % 64 == 0),
        ("steps", r.steps >= 1),
        ("requantize_every", r.requantize_every >= 0),
        ("optimizer.lr", r.lr > 0),
        ("optimizer.clip_max_norm", r.clip_max_norm > 0),
        ("checkpoint_every", r.checkpoint_every >= 1),
        ("log_every", r.log_every >= 1),
    ]
    for key, ok in checks:
        if not ok:
            raise UserError(f"{where}: invalid value {key} (crop: a multiple of 64; counts >= 1; λ, step, lr positive)")
    if r.requantize_every and r.parts == "decoder":
        raise UserError(
            f"{where}: requantize_every needs parts decoder+hyperdecoder (with the "
            "decoder alone the indices never change); set it to 0"
        )
    if not r.train_splits:
        raise UserError(f"{where}: data.train must name at least one split")


def load_finetune_recipe(path: str | Path) -> FinetuneRecipe:
    """Read and validate a finetuning recipe; every problem is a one-line
    :class:`UserError`."""
    path = Path(path)
    where = f"recipe {path}"
    raw = read_yaml(path, where)
    top = check_section(raw, "the recipe", _TOP, where)
    quant = dict(top["quantizer"]) if isinstance(top["quantizer"], dict) else top["quantizer"]
    target = quant.pop("target", 0.0) if isinstance(quant, dict) else 0.0
    try:
        target = target_value(target)
    except ValueError:
        raise UserError(f"{where}: quantizer.target must be auto, rd or a number >= 0, not {target!r}") from None
    quant = check_section(quant, "quantizer", _QUANTIZER, where)
    opt = check_section(top["optimizer"], "optimizer", _OPTIMIZER, where)
    data = check_section(top["data"], "data", _DATA, where)

    train = data["train"]
    train = [train] if isinstance(train, str) else train

    def opt_float(v: Any) -> float | None:
        return None if v is None else float(v)

    try:
        recipe = FinetuneRecipe(
            path=str(path),
            checkpoint=recipe_path(path, top["checkpoint"], checkpoint=True),
            arch=None if top["arch"] is None else str(top["arch"]),
            lmbda=opt_float(top["lambda"]),
            parts=str(top["parts"]),
            requantize_every=int(top["requantize_every"]),
            method=str(quant["method"]),
            step=opt_float(quant["step"]),
            lambda_t=opt_float(quant["lambda_t"]),
            lambda_mult=opt_float(quant["lambda_mult"]),
            reset=str(quant["reset"]),
            weights=str(quant["weights"]),
            target=target,
            seed=int(top["seed"]),
            threads=int(top["threads"]),
            device=str(top["device"]),
            batch_size=int(top["batch_size"]),
            crop=int(top["crop"]),
            steps=int(top["steps"]),
            lr=float(opt["lr"]),
            clip_max_norm=float(opt["clip_max_norm"]),
            data_root=recipe_path(path, data["root"]),
            train_splits=tuple(str(s) for s in train),
            checkpoint_every=int(top["checkpoint_every"]),
            log_every=int(top["log_every"]),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: wrong value type ({exc})") from None
    _validate(recipe)
    return recipe


def default_recipe() -> Path:
    """``recipes/finetune/cpu.yaml`` of the source tree qft runs from (the recipe of
    ``qft finetune`` without one)."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "finetune" / "cpu.yaml"
    if not path.is_file():
        raise UserError(f"no default recipe ({path} is missing); give a recipe file (see recipes/finetune/ in qft)")
    return path


def override_recipe(recipe: FinetuneRecipe, data: str | Path | None = None, **fields: Any) -> FinetuneRecipe:
    """``recipe`` with the user's overrides (``qft finetune``'s options, the Python API's
    arguments); ``None`` values are ignored.

    Args:
        data: a folder whose images (directly in it) replace the recipe's training data.
        fields: :class:`FinetuneRecipe` fields (``checkpoint``, ``lmbda``, ``steps``,
            ``parts``, ``method``, ``step``, …). A ``method`` other than the recipe's drops
            the recipe's ``step`` and ``lambda_t`` (they belong to the old method) unless
            given too.

    Raises:
        UserError: ``data`` is not a folder; an invalid value.
    """
    changes = {k: v for k, v in fields.items() if v is not None}
    if data is not None:
        if not Path(data).is_dir():
            raise UserError(f"--data {data}: not a folder of images")
        changes |= {"data_root": str(Path(data).resolve()), "train_splits": (".",)}
    if changes.get("method", recipe.method) != recipe.method:
        changes.setdefault("step", None)
        changes.setdefault("lambda_t", None)
    unknown = set(changes) - {f.name for f in dataclasses.fields(FinetuneRecipe)}
    if unknown:
        raise TypeError(f"unknown recipe field(s) {sorted(unknown)}")
    return recipe.replace(**changes) if changes else recipe
