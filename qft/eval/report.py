"""``qft report``: the quantizer × model matrix on a dataset, BD-rate tables and RD plots.

A report recipe (``recipes/report/*.yaml``) names a dataset, the quantizers, and the
*model rows*: each row is one checkpoint per rate point (aligned by position with the
base row), e.g. the shipped base models, the models finetuned for TCQ-8, a control arm.
``models: shipped`` builds the rows from ``qft/assets/checkpoints/manifest.json``: the base
models, one row per finetuned quantizer (and part set) evaluated with that quantizer, and
for each such row the control arm (the same parts trained on with the noise proxy,
``control-<quantizer>``) evaluated with exactly that row's quantizer settings. A row of
``ft-<x>`` is compared with the row ``control-<x>`` when there is one, or with the row its
``control:`` field names.

Every *cell* — one checkpoint, one quantizer configuration, all images — is evaluated
with real bitstreams by :func:`qft.eval.evaluate_configs` and stored as
``cells/<key>.json``; a rerun skips finished cells (it resumes). Outputs in ``out``::

    results/<row>-<quantizer>.json   CompressAI schema (+ qft block), one entry per rate point
    bdrate.json, bdrate.md           BD-rate table (see below)
    per_image.json, per_image.md     per image: equal-PSNR rate change of every row vs base-USQ
    rd-psnr.png, rd-ms-ssim.png      RD plots (with the recipe's published anchor curves)

Two BD measures, because the rate points of an under-trained model family need not form
a monotone curve (a model at a larger λ can be worse in both rate and PSNR):

* ``bd_pchip``: Bjøntegaard delta rate (``bjontegaard``, pchip) over the rate points, both
  curves restricted to the rate points on *both* curves' Pareto fronts (listed in the
  table): a point where either curve turns down (a larger-λ model no better than the one
  below it) leaves both, so the two curves always share their rate points.
* ``local``: per rate point, the rate change at equal PSNR against the anchor checkpoint
  swept over its quantizer step (``sweep`` scales of the step, λ following the rule);
  the table gives the mean over rate points and each value. This is a BD-rate taken
  locally around each operating point, well-defined whatever the family looks like.
  Against the base under a finetuned row's own quantizer (and hence against the control
  arm) it needs that quantizer swept on the base too; ``sweep_rows: false`` skips those
  sweeps, the costliest part of a report, and leaves those columns the BD.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics

from pathlib import Path
from typing import Any

import yaml

from tqdm import tqdm

from trellis import MAX_PLAIN_ROWS

from qft.codec import target_record
from qft.errors import UserError
from qft.eval.bdrate import front_bd_rate, local_rate_change
from qft.files import atomic_write
from qft.settings import (
    WEIGHT_CHOICES,
    quantizer_identity,
    read_settings,
    resolve_quantizer,
    target_value,
    weights_digest,
)
from qft.train.recipe import recipe_path

__all__ = ["QuantizerSpec", "ModelRow", "ReportRecipe", "load_report_recipe", "run_report", "shipped_rows"]

REPORT_FORMAT = "qft-report/1"
METRICS = ("psnr-rgb", "ms-ssim-rgb")


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """One quantizer configuration of the matrix (``None``: calibrated, else default)."""

    label: str
    method: str
    step: float | None = None
    lambda_mult: float | None = None
    lambda_t: float | None = None
    weights: str = "auto"
    target: str | float = "auto"
    plain_rows: int | None = None

    @classmethod
    def parse(cls, item: Any) -> QuantizerSpec:
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, dict) or "method" not in item:
            raise UserError(f"report recipe: a quantizer is a method name or a mapping with 'method', got {item!r}")
        unknown = set(item) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"report recipe: unknown quantizer field(s) {sorted(unknown)}")
        item = {"label": item["method"], **item}
        if item.get("weights", "auto") not in WEIGHT_CHOICES and not Path(str(item["weights"])).is_file():
            raise UserError(
                f"report recipe: weights must be one of {WEIGHT_CHOICES} or a file, got {item['weights']!r}"
            )
        plain = item.get("plain_rows")
        if plain is not None and not (
            isinstance(plain, int) and not isinstance(plain, bool) and 0 <= plain <= MAX_PLAIN_ROWS
        ):
            raise UserError(f"report recipe: plain_rows must be an integer in [0, {MAX_PLAIN_ROWS}], got {plain!r}")
        try:
            target_value(item.get("target", "auto"))
        except ValueError:
            raise UserError(
                f"report recipe: target must be auto, rd or a number >= 0, got {item['target']!r}"
            ) from None
        return cls(**item)


@dataclasses.dataclass(frozen=True)
class ModelRow:
    """Checkpoints (or ``None``) per rate point, evaluated with the listed quantizers."""

    label: str
    checkpoints: tuple[str | None, ...]
    quantizers: tuple[str, ...]  # quantizer labels
    # checkpoints whose settings resolve the quantizers (a control arm evaluated exactly as
    # the finetuned models it controls); empty: each checkpoint's own
    settings_from: tuple[str | None, ...] = ()
    # the label of this row's control arm; None: "control-<label without ft->" if present
    control: str | None = None


@dataclasses.dataclass(frozen=True)
class ReportRecipe:
    name: str
    data: str
    out: str
    quantizers: tuple[QuantizerSpec, ...]
    rows: tuple[ModelRow, ...]
    images: int | None = None
    sweep: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.25, 1.4, 1.6, 1.8)
    sweep_quantizers: tuple[str, ...] = ("usq",)
    # sweep the base under every other row's quantizer too: the local measure of the "same
    # quantizer" and "control" columns, and the costliest part of a report (False: those
    # columns give the BD only, from the base under that quantizer at step scale 1)
    sweep_rows: bool = True
    anchors: tuple[str, ...] = ()
    threads: int = 1
    ms_ssim: bool = True
    # evaluate in this many processes of one thread each (qft.eval.evaluate.evaluate_in_processes)
    workers: int = 1
    # evaluate the base under every other row's quantizer (the "same quantizer" and "control"
    # columns); False: those columns stay empty
    same_quantizer: bool = True
    # (quantizer, anchor quantizer): each row under the first also compared with the same row
    # under the second (``vs_quantizer``: e.g. TCQ-8 against USQ with the same decoder target)
    versus: tuple[tuple[str, str], ...] = ()


def shipped_rows(labels: list[str]) -> list[ModelRow]:
    from qft.models.zoo import base_entries, shipped_finetunes

    bases = base_entries()
    rows = [ModelRow("base", tuple(e["name"] for e in bases), tuple(labels))]
    groups: dict[tuple[str, str, bool], dict[str, str]] = {}
    for e in shipped_finetunes():
        key = (e["quantizer"]["method"], e.get("parts", "decoder"), bool(e.get("control")))
        groups.setdefault(key, {})[e["finetuned_from"]] = e["name"]

    def files(key: tuple[str, str, bool]) -> tuple[str | None, ...]:
        return tuple(groups[key].get(b["file"]) for b in bases)

    for method, parts, control in sorted(groups):
        if control or method not in labels:
            continue
        suffix = "" if parts == "decoder" else "-" + parts.replace("decoder+", "")
        finetuned = files((method, parts, False))
        rows.append(ModelRow(f"ft-{method}{suffix}", finetuned, (method,)))
        # the control arm of the same parts, evaluated with this row's quantizer settings
        controls = [k for k in groups if k[1] == parts and k[2]]
        if controls:
            rows.append(ModelRow(f"control-{method}{suffix}", files(controls[0]), (method,), finetuned))
    return rows


def load_report_recipe(path: str | Path, **overrides: Any) -> ReportRecipe:
    """Read a report recipe; ``overrides`` (non-None) replace its top-level fields.

    Relative paths in the recipe (``data``, ``out``, ``anchors``, checkpoints) follow the
    rule of every recipe (:func:`qft.train.recipe.recipe_path`): against the recipe's
    project root, else its folder; checkpoints may be shipped model names. Paths given as
    ``overrides`` (the command line's) are relative to the current directory.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable YAML recipe ({exc.__class__.__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a report recipe is a mapping")
    if isinstance(raw, dict):
        raw = dict(raw)
        for key in ("data", "out"):
            if raw.get(key) is not None:
                raw[key] = recipe_path(path, raw[key])
        raw["anchors"] = [recipe_path(path, a) for a in raw.get("anchors") or ()]
        if isinstance(raw.get("quantizers"), list):  # a weights file
            raw["quantizers"] = [
                q | {"weights": recipe_path(path, q["weights"])}
                if isinstance(q, dict) and q.get("weights", "auto") not in WEIGHT_CHOICES
                else q
                for q in raw["quantizers"]
            ]
        for key in ("models", "extra_rows"):
            if isinstance(raw.get(key), list):
                raw[key] = [_row_paths(r, path) for r in raw[key]]
    raw |= {k: v for k, v in overrides.items() if v is not None}
    known = {f.name for f in dataclasses.fields(ReportRecipe)} | {"models", "extra_rows"}
    unknown = set(raw) - known
    if unknown:
        raise UserError(f"{path}: unknown field(s) {sorted(unknown)}")
    for key in ("data", "quantizers", "models"):
        if key not in raw:
            raise UserError(f"{path}: missing field {key!r}")
    quantizers = tuple(QuantizerSpec.parse(q) for q in raw["quantizers"])
    labels = [q.label for q in quantizers]
    if len(set(labels)) != len(labels):
        raise UserError(f"{path}: quantizer labels must differ, got {labels}")
    for key in ("models", "extra_rows"):
        if raw.get(key) not in (None, "shipped") and not isinstance(raw[key], list):
            raise UserError(f"{path}: {key} is a list of model rows{' or shipped' if key == 'models' else ''}")
    if raw["models"] == "shipped":
        rows = shipped_rows(labels)
    else:
        rows = [_parse_row(r, labels, path, f"models[{i}]") for i, r in enumerate(raw["models"])]
    rows += [_parse_row(r, labels, path, f"extra_rows[{i}]") for i, r in enumerate(raw.get("extra_rows") or [])]
    versus = raw.get("versus") or {}
    if not isinstance(versus, dict) or any(k not in labels or v not in labels for k, v in versus.items()):
        raise UserError(
            f"{path}: versus maps quantizer labels to anchor quantizer labels of this report, got {versus!r}"
        )
    missing = [r.control for r in rows if r.control is not None and r.control not in {x.label for x in rows}]
    if missing:
        raise UserError(f"{path}: control row {missing[0]!r} is not a row of this report")
    n = len(rows[0].checkpoints)
    if any(len(r.checkpoints) != n for r in rows):
        raise UserError(f"{path}: every model row needs one checkpoint (or null) per rate point ({n})")
    return ReportRecipe(
        name=str(raw.get("name", path.stem)),
        data=str(raw["data"]),
        out=str(raw.get("out", f"runs/report/{path.stem}")),
        quantizers=quantizers,
        rows=tuple(rows),
        images=raw.get("images"),
        sweep=tuple(float(s) for s in raw.get("sweep", ReportRecipe.sweep)),
        sweep_quantizers=tuple(raw.get("sweep_quantizers", ReportRecipe.sweep_quantizers)),
        sweep_rows=bool(raw.get("sweep_rows", True)),
        anchors=tuple(raw.get("anchors", ())),
        threads=int(raw.get("threads", 1)),
        ms_ssim=bool(raw.get("ms_ssim", True)),
        workers=int(raw.get("workers", 1)),
        same_quantizer=bool(raw.get("same_quantizer", True)),
        versus=tuple((str(k), str(v)) for k, v in versus.items()),
    )


def _row_paths(r: Any, path: Path) -> Any:
    """A model row with its checkpoints (and ``settings_from``) resolved by the recipe rule."""
    if not isinstance(r, dict):
        return r
    r = dict(r)
    for key in ("checkpoints", "settings_from"):
        if isinstance(r.get(key), list):
            r[key] = [recipe_path(path, c, checkpoint=True) for c in r[key]]
    return r


def _parse_row(r: Any, labels: list[str], path: Path, where: str) -> ModelRow:
    """One model row of the recipe; ``where``: its place (``models[2]``) for messages,
    which name an unknown or missing field before anything else."""
    if not isinstance(r, dict):
        raise UserError(f"{path}: {where} is a mapping with 'label' and 'checkpoints', got {r!r}")
    where = f"row {r['label']}" if "label" in r else where
    unknown = set(r) - {"label", "checkpoints", "quantizers", "settings_from", "control"}
    if unknown:
        raise UserError(f"{path}: {where}: unknown field(s) {sorted(unknown)}")
    if not {"label", "checkpoints"} <= set(r):
        raise UserError(f"{path}: {where}: missing field(s) {sorted({'label', 'checkpoints'} - set(r))}")
    for key in ("checkpoints", "quantizers", "settings_from"):
        if not isinstance(r.get(key, []), (list, type(None))):
            raise UserError(f"{path}: {where}: {key} is a list, got {r[key]!r}")
    qs = tuple(r.get("quantizers", labels))
    bad = [q for q in qs if q not in labels]
    if bad:
        raise UserError(f"{path}: row {r['label']} names unknown quantizer(s) {bad}")
    settings_from = tuple(None if c is None else str(c) for c in r.get("settings_from") or ())
    if settings_from and len(settings_from) != len(r["checkpoints"]):
        raise UserError(f"{path}: row {r['label']}: settings_from needs one checkpoint (or null) per rate point")
    return ModelRow(
        str(r["label"]),
        tuple(None if c is None else str(c) for c in r["checkpoints"]),
        qs,
        settings_from,
        None if r.get("control") is None else str(r["control"]),
    )


# -- evaluation ---------------------------------------------------------------------------
def _cell_key(sha: str, choice, images: list[str], ms_ssim: bool) -> str:
    """Identity of a cell: checkpoint file, resolved quantizer (:func:`quantizer_identity`),
    weights and decoder target (when used), images."""
    q = quantizer_identity(choice.quantizer)
    target = [target_record(choice.target)] if choice.target else []
    blob = json.dumps([sha, q, weights_digest(choice.weights), images, ms_ssim, REPORT_FORMAT, *target])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _evaluate_cells(recipe: ReportRecipe, images: list[Path], out: Path, progress: bool) -> dict:
    """All cells: (row, rate point, quantizer label, scale) -> cell dict (from disk when done).

    Besides the matrix itself, the base checkpoint of every rate point is evaluated — and,
    with ``recipe.sweep_rows``, swept — with the quantizer each other row resolves to (a
    finetuned model's own, the one it was finetuned on), under the label
    ``"<quantizer>|<row>"``: the anchor of that row's comparison with "the same quantizer
    on the base model". Cells with the same checkpoint
    file, resolved quantizer and images are computed once.
    """
    from qft.codec import Codec
    from qft.eval.evaluate import evaluate_configs, evaluate_in_processes
    from qft.models import load_checkpoint
    from qft.threads import set_threads

    set_threads(recipe.threads)
    specs = {q.label: q for q in recipe.quantizers}
    names = [p.name for p in images]
    base = recipe.rows[0]
    loaded: dict[str, Any] = {}

    def load(name: str):
        if name not in loaded:
            ck = load_checkpoint(name)
            loaded[name] = (ck, read_settings(ck))
        return loaded[name]

    plan: dict[str, dict[tuple, Any]] = {}  # checkpoint -> cell id -> QuantizerChoice
    sweep = (1.0, *recipe.sweep)
    for row in recipe.rows:
        for i, name in enumerate(row.checkpoints):
            if name is None:
                continue
            _, settings = load(row.settings_from[i] if row.settings_from and row.settings_from[i] else name)
            for label in row.quantizers:
                spec = specs[label]
                choose = lambda s, st=settings, sp=spec: resolve_quantizer(  # noqa: E731
                    sp.method,
                    st,
                    step=sp.step,
                    lambda_t=sp.lambda_t,
                    lambda_mult=sp.lambda_mult,
                    weights=sp.weights,
                    step_scale=s,
                    target=sp.target,
                    plain_rows=sp.plain_rows,
                )
                scales = sweep if row is base and label in recipe.sweep_quantizers else (1.0,)
                for s in scales:
                    plan.setdefault(name, {})[(row.label, i, label, s)] = choose(s)
                if row is not base and base.checkpoints[i] is not None and recipe.same_quantizer:
                    for s in sweep if recipe.sweep_rows else (1.0,):
                        plan.setdefault(base.checkpoints[i], {})[(base.label, i, f"{label}|{row.label}", s)] = choose(s)
    cells: dict[tuple, dict] = {}
    work: list[tuple[str, Any, dict, dict]] = []  # (checkpoint, loaded, todo, choices) of the cells to compute
    owners: dict[str, list[tuple]] = {}  # cell key -> cell ids
    for name, ids in plan.items():
        ck, _ = load(name)
        by_key: dict[str, list[tuple]] = {}
        choices = {}
        for cid, choice in ids.items():
            key = _cell_key(ck.sha256, choice, names, recipe.ms_ssim)
            by_key.setdefault(key, []).append(cid)
            choices[key] = choice
        for key, cids in by_key.items():  # a key two checkpoint files share (same weights) keeps both owners
            owners.setdefault(key, []).extend(cids)
        todo = {}
        for key in by_key:
            path = out / "cells" / f"{key}.json"
            if not path.is_file():
                todo[key] = (choices[key].quantizer, choices[key].weights, choices[key].target)
        if todo:
            work.append((name, ck, todo, choices))
    rank, world = _rank()
    if world > 1:  # torchrun: every rank computes every world-th cell; all read them back from disk
        import torch.distributed as dist

        dist.barrier()  # every rank has listed the same missing cells before any is written
        keys = sorted(k for _, _, todo, _ in work for k in todo)
        mine = set(keys[rank::world])
        work = [(n, ck, {k: v for k, v in todo.items() if k in mine}, ch) for n, ck, todo, ch in work]
        work = [w for w in work if w[2]]
    if recipe.workers > 1 and work:
        results = evaluate_in_processes(
            [(name, todo) for name, _, todo, _ in work],
            images,
            recipe.workers,
            ms_ssim=recipe.ms_ssim,
            progress=progress,
        )
    else:
        results = []
        for name, ck, todo, _ in tqdm(work, desc=f"report {recipe.name}", unit="model", disable=not progress):
            codec = Codec.from_checkpoint(ck)
            for q, *_ in todo.values():
                codec.check_quantizer(q)
            results.append(
                evaluate_configs(codec, todo, images, desc=Path(name).name, ms_ssim=recipe.ms_ssim, progress=progress)
            )
    for (name, ck, todo, choices), rows in zip(work, results):
        for key in todo:
            cell = {
                "checkpoint": name,
                "sha256": ck.sha256,
                "arch": ck.arch,
                "params": ck.params,
                "quantizer": choices[key].describe(),
                "images": rows[key],
            }
            atomic_write(out / "cells" / f"{key}.json", json.dumps(cell, allow_nan=True))
    if world > 1:
        dist.barrier()
    for key, cids in owners.items():
        cell = _read_cell(out / "cells" / f"{key}.json")
        for cid in cids:
            cells[cid] = cell
    return cells


def _rank() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch (joining its gloo process group on first
    use), else (0, 1)."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _read_cell(path: Path) -> dict:
    """A finished cell from disk; the λ_T of a cell written before the two λs had distinct
    names (``"lambda"``) is read as ``"lambda_t"``, in its place."""
    cell = json.loads(path.read_text())
    cell["quantizer"] = {("lambda_t" if k == "lambda" else k): v for k, v in cell["quantizer"].items()}
    return cell


def _mean_if_all_finite(values: list[float]) -> float:
    """The mean of ``values``, NaN when one is missing or not finite (or there are none)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    return statistics.fmean(v) if len(v) == len(values) and v else math.nan


def _point(cell: dict, metric: str = "psnr-rgb") -> tuple[float, float]:
    return _mean_if_all_finite([r["bpp"] for r in cell["images"]]), _mean_if_all_finite(
        [r[metric] for r in cell["images"]]
    )


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# -- tables and plots -----------------------------------------------------------------------
def _curves(recipe: ReportRecipe, cells: dict) -> dict[tuple[str, str], list[tuple[int, dict]]]:
    """(row, quantizer) -> [(rate point, cell at scale 1)]."""
    out: dict = {}
    for row in recipe.rows:
        for label in row.quantizers:
            pts = [(i, cells[(row.label, i, label, 1.0)]) for i, ck in enumerate(row.checkpoints) if ck is not None]
            if pts:
                out[(row.label, label)] = pts
    return out


def _compare(recipe: ReportRecipe, cells: dict, curves: dict, test: tuple[str, str], anchor: tuple[str, str]) -> dict:
    """BD-rate (pchip, the rate points on both curves' Pareto fronts) and local savings of
    ``test`` vs ``anchor``."""
    a_pts, t_pts = dict(curves[anchor]), dict(curves[test])
    common = sorted(set(a_pts) & set(t_pts))
    out: dict[str, Any] = {"test": "/".join(test), "anchor": "/".join(anchor), "rate_points": common}
    for metric in METRICS:
        a = [_point(a_pts[i], metric) for i in common]
        t = [_point(t_pts[i], metric) for i in common]
        bd, sel = front_bd_rate(a, t, metric)
        front = [common[j] for j in sel]
        local = []
        for i in common:
            sweep = [cells.get((anchor[0], i, anchor[1], s)) for s in (1.0, *recipe.sweep)]
            if any(c is None for c in sweep) or len(sweep) < 2:
                local.append(math.nan)
                continue
            local.append(local_rate_change([_point(c, metric) for c in sweep], _point(t_pts[i], metric)))
        out[metric] = {
            "bd_pchip": _finite(bd),
            "pareto_points": front,
            "local": [_finite(x) for x in local],
            "local_mean": _finite(_mean_if_all_finite(local)),
        }
    return out


def _versus_control(
    recipe: ReportRecipe, cells: dict, curves: dict, test: tuple[str, str], control: tuple[str, str], entry: dict
) -> dict:
    """A finetuned row against the control arm: BD (pchip, both rows' Pareto points) and, per
    rate point, the two rows' local rate changes against the same base anchor composed,
    ``(1 + a) / (1 + b) − 1`` (the control is not swept itself)."""
    base = recipe.rows[0].label
    out = _compare(recipe, cells, curves, test, control)
    ctrl = _compare(recipe, cells, curves, control, (base, f"{control[1]}|{control[0]}"))
    mine = entry["vs_base_same_quantizer"]
    for metric in METRICS:
        a = dict(zip(mine["rate_points"], mine[metric]["local"]))
        b = dict(zip(ctrl["rate_points"], ctrl[metric]["local"]))
        local = [
            100 * ((1 + a[i] / 100) / (1 + b[i] / 100) - 1)
            if a.get(i) is not None and b.get(i) is not None
            else math.nan
            for i in out["rate_points"]
        ]
        out[metric]["local"] = [_finite(x) for x in local]
        out[metric]["local_mean"] = _finite(_mean_if_all_finite(local))
    return out


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def _tables(recipe: ReportRecipe, cells: dict) -> dict:
    curves = _curves(recipe, cells)
    anchors: dict = {}  # the base model under another row's quantizer ("<quantizer>|<row>")
    for (row, i, label, s), cell in cells.items():
        if "|" in label and s == 1.0:
            anchors.setdefault((row, label), []).append((i, cell))
    every = curves | {k: sorted(v, key=lambda t: t[0]) for k, v in anchors.items()}
    base = recipe.rows[0].label
    named = {r.label: r.control for r in recipe.rows}
    rows = []
    for row, label in curves:
        if (row, label) == (base, "usq"):
            continue
        entry = {
            "row": row,
            "quantizer": label,
            "vs_base_usq": None,
            "vs_base_same_quantizer": None,
            "vs_control": None,
            "vs_quantizer": None,
        }
        if (base, "usq") in curves:
            entry["vs_base_usq"] = _compare(recipe, cells, every, (row, label), (base, "usq"))
        if row != base and (base, f"{label}|{row}") in every:
            entry["vs_base_same_quantizer"] = _compare(recipe, cells, every, (row, label), (base, f"{label}|{row}"))
        control = named[row] or ("control-" + row.removeprefix("ft-") if row.startswith("ft-") else None)
        if (control, label) in curves and entry["vs_base_same_quantizer"]:
            entry["vs_control"] = _versus_control(recipe, cells, every, (row, label), (control, label), entry)
        anchor = dict(recipe.versus).get(label)
        if anchor is not None and (row, anchor) in curves:
            entry["vs_quantizer"] = _compare(recipe, cells, every, (row, label), (row, anchor))
        rows.append(entry)
    return {"rows": rows, "curves": curves}


def _markdown(recipe: ReportRecipe, table: list[dict], meta: dict) -> str:
    lines = [
        f"# qft report: {recipe.name}",
        "",
        f"{meta['images']} images of `{recipe.data}`, real bitstreams; {meta['machine']}; {meta['date']}.",
        "Negative = fewer bits at equal quality. **local**: mean over rate points of the rate change at equal",
        "PSNR against the anchor checkpoint swept over its quantizer step; **BD**: Bjøntegaard (pchip) over the",
        "rate points on both curves' Pareto fronts.",
        "",
        "| model | quantizer | local vs base USQ (%) | BD vs base USQ (%) | local vs base, same quantizer (%) "
        "| BD vs base, same quantizer (%) | local vs control (%) | BD vs control (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        cols = [
            _fmt(c and c["psnr-rgb"][k])
            for c in (r["vs_base_usq"], r["vs_base_same_quantizer"], r["vs_control"])
            for k in ("local_mean", "bd_pchip")
        ]
        lines.append(f"| {r['row']} | {r['quantizer']} | " + " | ".join(cols) + " |")
    versus = [r for r in table if r["vs_quantizer"]]
    if versus:
        lines += [
            "",
            "| model | quantizer | anchor: the same model under | local (%) | BD (%) |",
            "|---|---|---|---|---|",
        ]
        for r in versus:
            c = r["vs_quantizer"]
            lines.append(
                f"| {r['row']} | {r['quantizer']} | {c['anchor'].split('/', 1)[1]} | "
                f"{_fmt(c['psnr-rgb']['local_mean'])} | {_fmt(c['psnr-rgb']['bd_pchip'])} |"
            )
    return "\n".join(lines) + "\n"


def _results_json(recipe: ReportRecipe, key: tuple[str, str], pts: list[tuple[int, dict]]) -> dict:
    res = {m: [] for m in (*METRICS, "bpp")}
    for _, cell in pts:
        for m in METRICS:
            res[m].append(_finite(_mean_if_all_finite([r[m] for r in cell["images"]])))
        res["bpp"].append(_mean_if_all_finite([r["bpp"] for r in cell["images"]]))
    return {
        "name": f"{key[0]}-{key[1]}",
        "description": f"qft report {recipe.name}: {key[0]} models, {key[1]}, real bitstreams",
        "results": res,
        "qft": {
            "checkpoints": [{k: c[k] for k in ("checkpoint", "sha256", "arch", "params", "quantizer")} for _, c in pts],
            "bpp_estimated": [_mean_if_all_finite([r["bpp_estimated"] for r in c["images"]]) for _, c in pts],
            "dataset": recipe.data,
            "images": len(pts[0][1]["images"]),
        },
    }


def _per_image(recipe: ReportRecipe, cells: dict, curves: dict) -> dict:
    """Per image and row/quantizer: mean over rate points of the equal-PSNR rate change
    against the base-USQ sweep of that image."""
    base = recipe.rows[0].label
    out: dict[str, dict[str, float | None]] = {}
    for (row, label), pts in curves.items():
        if (row, label) == (base, "usq"):
            continue
        for i, cell in pts:
            sweep = [cells.get((base, i, "usq", s)) for s in (1.0, *recipe.sweep)]
            if any(c is None for c in sweep):
                continue
            for j, img in enumerate(cell["images"]):
                anchor = [(c["images"][j]["bpp"], c["images"][j]["psnr-rgb"]) for c in sweep]
                change = local_rate_change(anchor, (img["bpp"], img["psnr-rgb"]))
                out.setdefault(img["image"], {}).setdefault(f"{row}/{label}", []).append(change)
    return {img: {k: _finite(_mean_if_all_finite(v)) for k, v in d.items()} for img, d in out.items()}


def _plot(recipe: ReportRecipe, curves: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = {q.label: q.method for q in recipe.quantizers}
    anchors = []
    for a in recipe.anchors:
        try:
            anchors.append(json.loads(Path(a).read_text()))
        except (OSError, ValueError):
            raise UserError(f"report recipe: anchor {a} is not a readable results JSON") from None
    for metric in METRICS:
        # left: the rows with the published anchors; right: the rows alone, zoomed
        fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5.2))
        for (row, label), pts in curves.items():
            if row == recipe.rows[0].label and methods.get(label, label) != label:
                continue  # the base row's variants (weights, VVC rule) are in the tables only
            xy = [_point(c, metric) for _, c in sorted(pts, key=lambda t: t[0])]  # rate points in λ order
            for ax in (full, zoom):
                ax.plot(
                    [p[0] for p in xy],
                    [p[1] for p in xy],
                    "o-" if row == recipe.rows[0].label else "s--",
                    label=f"{row} {label}",
                    ms=4,
                )
        for a in anchors:
            res = a["results"]
            if metric in res:
                full.plot(res["bpp"], res[metric], "k:", marker=".", label=a.get("name", "anchor"), alpha=0.6)
        for ax, title in ((full, "with published anchors"), (zoom, "models only")):
            ax.set_xlabel("bpp")
            ax.set_ylabel(f"{metric.upper()}" + (" (dB)" if metric == "psnr-rgb" else ""))
            ax.set_title(f"{recipe.name}: {metric}, {title}", fontsize=10)
            ax.grid(alpha=0.3)
        full.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        path = out / f"rd-{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))
    return files


def run_report(recipe: ReportRecipe, progress: bool = True) -> dict:
    """Evaluate the matrix (resuming), write tables, JSONs and plots; return the summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the cells to compute are shared out among the
    ranks (a gloo process group; ``out`` must be one folder all ranks see), each rank
    writes its cells, and after a barrier rank 0 writes the tables; the other ranks return
    ``{"rank": r, "markdown": "", "plots": []}``."""
    import datetime

    from trellis.hardware import machine_info

    from qft.codec import list_images

    images = list_images(recipe.data)
    if not images:
        raise UserError(f"{recipe.data}: no images found")
    images = images[: recipe.images] if recipe.images else images
    out = Path(recipe.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = _evaluate_cells(recipe, images, out, progress)
    if _rank()[0] != 0:  # under torchrun rank 0 writes the tables
        return {"rank": _rank()[0], "markdown": "", "plots": []}
    tables = _tables(recipe, cells)
    machine = machine_info()
    meta = {
        "format": REPORT_FORMAT,
        "recipe": recipe.name,
        "data": recipe.data,
        "images": len(images),
        "date": datetime.date.today().isoformat(),
        "machine": f"{machine.get('cpu', 'CPU')}, {machine.get('cores', '?')} cores",
    }
    (out / "results").mkdir(exist_ok=True)
    result_files = []
    for key, pts in tables["curves"].items():
        path = out / "results" / f"{key[0]}-{key[1]}.json"
        atomic_write(path, json.dumps(_results_json(recipe, key, pts), indent=1))
        result_files.append(str(path))
    summary = {
        **meta,
        "machine_info": machine,
        "rows": tables["rows"],
        "results": result_files,
        "quantizers": [dataclasses.asdict(q) for q in recipe.quantizers],
        "models": [dataclasses.asdict(r) for r in recipe.rows],
        "sweep": list(recipe.sweep),
    }
    atomic_write(out / "bdrate.json", json.dumps(summary, indent=1))
    md = _markdown(recipe, tables["rows"], meta)
    atomic_write(out / "bdrate.md", md)
    per_image = _per_image(recipe, cells, tables["curves"])
    atomic_write(out / "per_image.json", json.dumps(per_image, indent=1))
    cols = sorted({k for d in per_image.values() for k in d})
    lines = ["| image | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {img} | " + " | ".join(_fmt(d.get(c)) for c in cols) + " |" for img, d in sorted(per_image.items())]
    atomic_write(
        out / "per_image.md",
        "Rate change (%) at equal PSNR vs the base model's USQ sweep, per image, "
        "mean over rate points.\n\n" + "\n".join(lines) + "\n",
    )
    summary["plots"] = _plot(recipe, tables["curves"], out)
    summary["markdown"] = md
    return summary
