"""Training recipes: a YAML file read into a validated :class:`Recipe`.

A recipe describes one family of reference models (one architecture and width, several
rate points). Layout, with every key required unless a default is shown::

    arch: mbt2018-mean          # a registered architecture (qft.models) with a mean-scale
                                # hyperprior, channel slices (tcm, dcae, cca) or checkerboard (elic, mlicpp)
    N: 64                       # optional: the architecture's width parameters, when it has them
    M: 96
    params: {}                  # optional: further constructor parameters (qft init --set)
    seed: 0
    threads: 1                  # torch.set_num_threads
    device: auto                # auto | cpu | cuda
    amp: true                   # optional (default true): bf16 autocast of the four
                                # transforms on CUDA; false trains in fp32 there
    batch_size: 8
    crop: 128
    optimizer:
      lr: 1.0e-4                # Adam, main parameters
      aux_lr: 1.0e-3            # Adam, EntropyBottleneck quantiles (aux loss)
      clip_max_norm: 1.0
      decay_at: 0.85            # lr x decay_factor from this fraction of a point's steps
      decay_factor: 0.1
    data:
      root: ../shared/data/bsds500   # relative to the project root
      train: [train, test]
      val: val                       # null: no validation
      val_images: 16                 # first images of the val split (sorted names)
      val_crop: 256                  # centre crop
    checkpoint_every: 500
    validate_every: 1000
    log_every: 25
    schedule:
      lambdas: [0.0483, 0.0250, 0.0130]   # strictly decreasing: highest rate first
      first_steps: 4000                   # the first point, trained from scratch
      warm_steps: 2000                    # each later point, warm-started from the previous

Relative data paths are resolved against the project root, the nearest ancestor of the
recipe file that holds a ``pyproject.toml`` (the recipe's own folder if there is none).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

import yaml

from qft.errors import UserError

__all__ = [
    "TRAINABLE_ENTROPY",
    "Recipe",
    "RatePoint",
    "load_recipe",
    "lambda_tag",
    "check_section",
    "project_root",
    "read_yaml",
    "recipe_path",
]

#: entropy-model kinds ``qft train`` trains (:func:`qft.train.rd_forward`); the
#: architectures come from the registry, :data:`qft.models.ARCHITECTURES`
TRAINABLE_ENTROPY = ("mean-scale-hyperprior", "channel-conditional", "channel-checkerboard")

_TOP = {
    "arch",
    "N",
    "M",
    "params",
    "seed",
    "threads",
    "device",
    "batch_size",
    "crop",
    "optimizer",
    "data",
    "checkpoint_every",
    "validate_every",
    "log_every",
    "schedule",
}
_OPTIMIZER = {"lr", "aux_lr", "clip_max_norm", "decay_at", "decay_factor"}
_DATA = {"root", "train", "val", "val_images", "val_crop"}
_SCHEDULE = {"lambdas", "first_steps", "warm_steps"}


def lambda_tag(lmbda: float) -> str:
    """Folder/file tag of a rate point, e.g. ``0.0483`` -> ``"lambda-0.0483"``."""
    return f"lambda-{lmbda:g}"


@dataclasses.dataclass(frozen=True)
class RatePoint:
    """One model of the schedule: its λ, its step count, and the λ it starts from."""

    lmbda: float
    steps: int
    parent: float | None  # None: trained from scratch


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated training recipe (see the module docstring for the YAML layout)."""

    path: str
    arch: str
    N: int | None
    M: int | None
    seed: int
    threads: int
    device: str
    batch_size: int
    crop: int
    lr: float
    aux_lr: float
    clip_max_norm: float
    decay_at: float
    decay_factor: float
    data_root: str
    train_splits: tuple[str, ...]
    val_split: str | None
    val_images: int
    val_crop: int
    checkpoint_every: int
    validate_every: int
    log_every: int
    lambdas: tuple[float, ...]
    first_steps: int
    warm_steps: int
    amp: bool = True
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def model_params(self) -> dict[str, Any]:
        """The architecture's constructor parameters the recipe sets: ``N``, ``M`` (when
        given) and ``params``."""
        out = {k: v for k, v in (("N", self.N), ("M", self.M)) if v is not None}
        return out | {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}

    @property
    def points(self) -> list[RatePoint]:
        """The rate points in training order (highest λ first, each warm-started from
        the previous one)."""
        pts = [RatePoint(self.lambdas[0], self.first_steps, None)]
        for parent, lmbda in zip(self.lambdas, self.lambdas[1:]):
            pts.append(RatePoint(lmbda, self.warm_steps, parent))
        return pts

    def point(self, lmbda: float) -> RatePoint:
        """The rate point of ``lmbda`` (matched to 1e-9), or a :class:`UserError`."""
        for p in self.points:
            if abs(p.lmbda - lmbda) < 1e-9:
                return p
        raise UserError(
            f"lambda {lmbda:g} is not in the recipe's schedule ({', '.join(f'{x:g}' for x in self.lambdas)})"
        )

    def lr_at(self, step: int, steps: int) -> float:
        """Learning rate of 0-based ``step`` in a run of ``steps`` steps: ``lr`` until
        ``decay_at·steps``, then ``lr·decay_factor`` (deterministic, step-based)."""
        return self.lr * (self.decay_factor if step >= int(self.decay_at * steps) else 1.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (str/int/float/list/None only), stored in checkpoints."""
        d = dataclasses.asdict(self)
        d["train_splits"] = list(self.train_splits)
        d["lambdas"] = list(self.lambdas)
        d["params"] = {k: v for k, v in self.model_params.items() if k not in ("N", "M")}
        return d

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (CLI overrides), re-validated."""
        new = dataclasses.replace(self, **changes)
        _validate(new)
        return new


def check_section(raw: Any, name: str, allowed: set[str], where: str) -> dict[str, Any]:
    """``raw`` if it is a mapping with exactly the keys ``allowed``; else a one-line
    :class:`UserError` naming the recipe (``where``), the section and the key."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: '{name}' must be a mapping")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' in {name} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(allowed - set(raw))
    if missing:
        raise UserError(f"{where}: missing key '{missing[0]}' in {name}")
    return raw


def project_root(recipe_path: Path) -> Path:
    """The folder relative recipe paths start from: the nearest ancestor of the recipe
    file holding a ``pyproject.toml``, else the recipe's own folder."""
    for d in recipe_path.resolve().parents:
        if (d / "pyproject.toml").is_file():
            return d
    return recipe_path.resolve().parent


def recipe_path(recipe: str | Path, value: Any, checkpoint: bool = False) -> str | None:
    """A path written in a recipe (of any kind: train, finetune, report), as the one rule
    says: absolute paths as they are; relative ones against the recipe's *project root*,
    the nearest folder above the recipe that holds ``pyproject.toml`` (for qft's own
    recipes, the source tree), else the recipe's own folder — never the current
    directory. With ``checkpoint``, the name of a shipped model (``mbt2018-mean-0.013``)
    that is not a file there stays a name (:func:`qft.models.zoo.resolve` finds it).
    ``None`` stays ``None``."""
    from qft.models.zoo import shipped_names

    if value is None:
        return None
    path = Path(str(value))
    if path.is_absolute():
        return str(path)
    resolved = project_root(Path(recipe)) / path
    if checkpoint and not resolved.exists() and str(value) in shipped_names():
        return str(value)
    return str(resolved)


def _validate(r: Recipe) -> None:
    where = f"recipe {r.path}"
    from qft.models import ARCHITECTURES

    trainable = sorted(a.name for a in ARCHITECTURES.values() if a.entropy in TRAINABLE_ENTROPY)
    if r.arch not in trainable:
        raise UserError(f"{where}: arch '{r.arch}' not supported (use one of {trainable})")
    checks = [
        ("N", r.N is None or r.N >= 1),
        ("M", r.M is None or r.M >= 1),
        ("threads", r.threads >= 1),
        ("batch_size", r.batch_size >= 1),
        ("crop", r.crop >= 64 and r.crop % 64 == 0),
        ("optimizer.lr", r.lr > 0),
        ("optimizer.aux_lr", r.aux_lr > 0),
        ("optimizer.clip_max_norm", r.clip_max_norm > 0),
        ("optimizer.decay_at", 0 < r.decay_at <= 1),
        ("optimizer.decay_factor", 0 < r.decay_factor <= 1),
        ("data.val_images", r.val_images >= 1),
        ("data.val_crop", r.val_crop >= 64 and r.val_crop % 64 == 0),
        ("checkpoint_every", r.checkpoint_every >= 1),
        ("validate_every", r.validate_every >= 1),
        ("log_every", r.log_every >= 1),
        ("schedule.first_steps", r.first_steps >= 1),
        ("schedule.warm_steps", r.warm_steps >= 1),
    ]
    for key, ok in checks:
        if not ok:
            raise UserError(f"{where}: invalid value {key} (crops must be multiples of 64; counts >= 1)")
    if r.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{where}: device must be auto, cpu or cuda, not '{r.device}'")
    if not r.lambdas or any(a <= b for a, b in zip(r.lambdas, r.lambdas[1:])) or r.lambdas[-1] <= 0:
        raise UserError(f"{where}: schedule.lambdas must be positive and strictly decreasing (highest rate first)")
    if not r.train_splits:
        raise UserError(f"{where}: data.train must name at least one split")
    ARCHITECTURES[r.arch].resolve_params(r.model_params)  # unknown or invalid parameters: one line


def read_yaml(path: Path, where: str) -> Any:
    """The parsed YAML of a recipe file; a missing, unreadable or invalid file is a
    one-line :class:`UserError` naming ``where``."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{where}: invalid YAML{line}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    where = f"recipe {path}"
    raw = read_yaml(path, where)
    if isinstance(raw, dict):
        raw = dict(raw)
        amp = raw.pop("amp", True)
        if not isinstance(amp, bool):
            raise UserError(f"{where}: amp must be true or false, not {amp!r}")
        raw.setdefault("N", None)
        raw.setdefault("M", None)
        raw.setdefault("params", {})
    top = check_section(raw, "the recipe", _TOP, where)
    if not isinstance(top["params"], dict):
        raise UserError(f"{where}: params must be a mapping of constructor parameters, not {top['params']!r}")
    opt = check_section(top["optimizer"], "optimizer", _OPTIMIZER, where)
    data = check_section(top["data"], "data", _DATA, where)
    sched = check_section(top["schedule"], "schedule", _SCHEDULE, where)

    root = Path(recipe_path(path, data["root"]))
    train = data["train"]
    train = [train] if isinstance(train, str) else train
    try:
        recipe = Recipe(
            path=str(path),
            arch=str(top["arch"]),
            N=None if top["N"] is None else int(top["N"]),
            M=None if top["M"] is None else int(top["M"]),
            seed=int(top["seed"]),
            threads=int(top["threads"]),
            device=str(top["device"]),
            batch_size=int(top["batch_size"]),
            crop=int(top["crop"]),
            lr=float(opt["lr"]),
            aux_lr=float(opt["aux_lr"]),
            clip_max_norm=float(opt["clip_max_norm"]),
            decay_at=float(opt["decay_at"]),
            decay_factor=float(opt["decay_factor"]),
            data_root=str(root),
            train_splits=tuple(str(s) for s in train),
            val_split=None if data["val"] is None else str(data["val"]),
            val_images=int(data["val_images"]),
            val_crop=int(data["val_crop"]),
            checkpoint_every=int(top["checkpoint_every"]),
            validate_every=int(top["validate_every"]),
            log_every=int(top["log_every"]),
            lambdas=tuple(float(x) for x in sched["lambdas"]),
            first_steps=int(sched["first_steps"]),
            warm_steps=int(sched["warm_steps"]),
            amp=amp,
            params=tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in top["params"].items())),
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: wrong value type ({exc})") from None
    _validate(recipe)
    return recipe
