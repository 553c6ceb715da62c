"""Shipping a finished finetuning run: a delta checkpoint of its base and a manifest entry.

``qft finetune`` ends a run with ``OUT/model.pth`` (a full checkpoint whose metadata names
its base by SHA-256, ``finetuned_from``, and records the quantizer, parts, control arm, λ
and steps) and ``OUT/summary.json`` (wall time, machine, the base's path).
:func:`ship_finetune` turns it into what ``qft/assets/checkpoints`` holds for every
finetuned model: the trained parts (:func:`qft.finetune.parts.part_prefixes`: ``g_s``, and
``h_s`` when trained; for channel-slice models also the LRP or the entropy path) in fp16 as a delta
of the base (:func:`qft.models.zoo.write_delta`), written beside the base, and an entry in
the ``manifest.json`` of the base's folder (:func:`qft.models.zoo.add_manifest_entry`)::

    qft ship runs/ft/tcq8                                  # mbt2018-mean-0.013-ft-tcq8.pth
    qft ship runs/stage1 runs/stage2 --name my-model       # a run continued from another

A run started from another run's ``model.pth`` ships as *stages*: the runs are given base
side first, each checked by SHA-256 to start from the one before; the entry then counts
the steps of all stages and lists each. Nothing is ever overwritten: a name the folder
already has (file or manifest entry) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qft.errors import UserError
from qft.finetune.parts import part_prefixes
from qft.models import LoadedCheckpoint, load_checkpoint
from qft.models.zoo import add_manifest_entry, read_manifest, resolve, write_delta

__all__ = ["RUN_KEYS", "default_name", "ship_finetune"]

#: the run metadata a manifest entry carries (for a multi-stage run, each stage too)
RUN_KEYS = ("quantizer", "parts", "control", "lambda", "steps")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_run(folder: Path) -> tuple[LoadedCheckpoint, dict[str, Any]]:
    """The finished run in ``folder``: its model checkpoint and ``summary.json``."""
    model, summary = folder / "model.pth", folder / "summary.json"
    if not model.is_file() or not summary.is_file():
        raise UserError(
            f"{folder} holds no finished qft finetune run (model.pth and summary.json); "
            "finish it first (qft finetune … --resume)"
        )
    ck = load_checkpoint(model)
    missing = [k for k in ("finetuned_from", *RUN_KEYS) if k not in ck.extra]
    if missing:
        raise UserError(f"{model} is not the output of qft finetune (no {missing[0]} in its metadata)")
    return ck, json.loads(summary.read_text())


def _stage(extra: dict[str, Any]) -> dict[str, Any]:
    """One stage of a multi-stage entry: :data:`RUN_KEYS` and ``requantize_every``."""
    return {**{k: extra[k] for k in RUN_KEYS}, "requantize_every": extra["finetune_recipe"].get("requantize_every", 0)}


def default_name(base: str | os.PathLike, run: dict[str, Any]) -> str:
    """``<base>-ft-<method>``, ``-ft-control`` for the control arm, ``-hyperdecoder``
    appended when ``h_s`` was trained, ``-entropy`` when a channel-slice model's entropy
    path was; ``run``: the run's metadata (:data:`RUN_KEYS`)."""
    arm = "control" if run["control"] else run["quantizer"]["method"]
    suffix = {"decoder+hyperdecoder": "-hyperdecoder", "decoder+entropy": "-entropy"}.get(run["parts"], "")
    return f"{Path(base).stem}-ft-{arm}{suffix}"


def ship_finetune(
    runs: Sequence[str | os.PathLike],
    base: str | os.PathLike | None = None,
    name: str | None = None,
    *,
    train_data: str | None = None,
) -> dict[str, Any]:
    """Ship the finished finetuning run ``runs[-1]`` as a delta checkpoint of ``base``
    and add its manifest entry; returns the entry.

    Args:
        runs: ``qft finetune`` output folders (each with ``model.pth`` and
            ``summary.json``), base side first: each after the first was finetuned from
            the previous one's ``model.pth``. The last one is shipped.
        base: the base checkpoint (a path or a shipped name); default: the one the first
            run started from (its summary's ``finetuned_from_path``). The delta is
            written beside it and the entry into that folder's ``manifest.json``.
        name: the file name without ``.pth``; default :func:`default_name`.
        train_data: the entry's description of the training data; default: the data
            folder and splits of the last run's recipe.

    The delta holds the parts any stage trained, in fp16; its metadata and the entry carry
    :data:`RUN_KEYS` of the last run (``steps``: of all stages) and, for several runs,
    ``stages`` (each run's :data:`RUN_KEYS` and ``requantize_every``). The entry also has
    the file's SHA-256 and size, the recipe, the summed wall time and the last machine.

    Raises:
        UserError: a folder without a finished run; a run not finetuned from the
            checkpoint before it; no base found; the name already in the folder (file or
            manifest entry): nothing is written then.
    """
    if not runs:
        raise UserError("give the folder of at least one finished qft finetune run")
    folders = [Path(r) for r in runs]
    loaded = [_read_run(f) for f in folders]
    checkpoints, summaries = [c for c, _ in loaded], [s for _, s in loaded]
    if base is None:
        base = summaries[0].get("finetuned_from_path")
        if base is None:
            raise UserError(f"{folders[0]}/summary.json does not name its base; give it with --base")
    try:
        base_path = resolve(base)
    except UserError:
        raise UserError(f"base {base} not found (a run records it as given to qft finetune); give --base") from None
    if "delta_of" in load_checkpoint(base_path).extra:
        raise UserError(f"{base_path} is itself a delta checkpoint; ship a finetune of a full checkpoint")
    chain = [base_path, *(f / "model.pth" for f in folders)]
    for parent, ck, path in zip(chain[:-1], checkpoints, chain[1:], strict=True):
        if ck.extra["finetuned_from"] != _sha256(parent):
            raise UserError(f"{path} was not finetuned from {parent}")
    last = checkpoints[-1]
    run = {k: last.extra[k] for k in RUN_KEYS}
    name = name or default_name(base_path, run)
    folder = base_path.parent
    delta = folder / f"{name}.pth"
    if delta.exists() or any(e["file"] == delta.name for e in read_manifest(folder)):
        raise UserError(f"{name} is already in {folder} (file or manifest entry); choose another name")

    # the parts any stage trained (qft.finetune.parts), in the model's order
    prefixes = tuple(dict.fromkeys(p for ck in checkpoints for p in part_prefixes(ck.model, ck.extra["parts"])))
    if len(checkpoints) > 1:
        run["steps"] = sum(ck.extra["steps"] for ck in checkpoints)
        run["stages"] = [_stage(ck.extra) for ck in checkpoints]
    recipe = last.extra["finetune_recipe"]
    if train_data is None:
        train_data = f"{recipe['data_root']}: {'+'.join(recipe['train_splits'])}"
    sha = write_delta(delta, last.model, base_path, prefixes, {"finetuned_from": base_path.name, **run})
    entry = {
        "file": delta.name,
        "arch": last.arch,
        "lambda": run["lambda"],
        **last.params,
        "finetuned_from": base_path.name,
        **run,
        "sha256": sha,
        "bytes": delta.stat().st_size,
        "dtype": "float16 delta of the base (" + ", ".join(prefixes) + ")",
        "recipe": recipe["path"],
        "wall_time_s": sum(s["wall_time_s"] for s in summaries),
        "machine": summaries[-1]["machine"],
        "train_data": train_data,
    }
    try:
        add_manifest_entry(entry, folder)
    except BaseException:
        delta.unlink(missing_ok=True)  # no delta without its entry
        raise
    return entry
