"""The checkpoints shipped with qft, by name, and compact finetuned checkpoints.

``qft/assets/checkpoints/manifest.json`` lists the shipped files; this module is the one
reader of it (:func:`shipped`, the base models :func:`base_entries` and the finetuned ones
:func:`shipped_finetunes`). Every command that takes
``-m CKPT`` also takes the name of a shipped model — the file name without ``.pth``::

    qft eval -m mbt2018-mean-0.013 mbt2018-mean-0.013-ft-tcq8 -q tcq8 --data …

A finetuned model changes only the trained parts (``g_s``, optionally ``h_s``), so it is
shipped as a *delta checkpoint*: ``{"state_dict": <only those tensors, fp16>, "delta_of":
<base file name>, "base_sha256": …, …}``. :func:`~qft.models.load_checkpoint` completes a
delta from its base, found beside the delta file (or among the shipped checkpoints), and
refuses a base whose SHA-256 differs.

This module is the one home of the manifest: :func:`read_manifest` and
:func:`base_entries` read it (the shipped one, or the ``manifest.json`` of any checkpoint
folder), :func:`add_manifest_entry` appends to it; ``qft ship``
(:func:`qft.finetune.ship.ship_finetune`) writes a delta and its entry.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

from pathlib import Path
from typing import Any

import torch

from qft.errors import UserError
from qft.files import atomic_write

__all__ = [
    "ASSETS",
    "MANIFEST",
    "read_manifest",
    "named_entries",
    "base_entries",
    "add_manifest_entry",
    "shipped",
    "shipped_finetunes",
    "is_finetuned",
    "shipped_names",
    "shipped_entry",
    "resolve",
    "write_delta",
    "base_of",
]

#: folder of the shipped checkpoints and their manifest
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"
#: file name of the manifest in a checkpoint folder
MANIFEST = "manifest.json"


def read_manifest(folder: str | os.PathLike = ASSETS) -> list[dict[str, Any]]:
    """The entries of ``folder/manifest.json`` as stored (``[]`` when the folder has none)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except FileNotFoundError:
        return []


def named_entries(folder: str | os.PathLike = ASSETS) -> list[dict[str, Any]]:
    """The entries of ``folder``'s manifest, each with its ``name`` (file name without
    ``.pth``), in manifest order."""
    return [{"name": Path(e["file"]).stem, **e} for e in read_manifest(folder)]


def base_entries(folder: str | os.PathLike = ASSETS) -> list[dict[str, Any]]:
    """The entries of the base models of ``folder``'s manifest (no ``finetuned_from``),
    each with its ``name``, by rate point (``lambda`` ascending); by default the shipped
    reference models."""
    return sorted((e for e in named_entries(folder) if not is_finetuned(e)), key=lambda e: e["lambda"])


def add_manifest_entry(entry: dict[str, Any], folder: str | os.PathLike = ASSETS) -> Path:
    """Append ``entry`` to ``folder/manifest.json`` (created if missing), written
    atomically; returns the manifest's path.

    Raises:
        UserError: the manifest already lists ``entry["file"]`` (nothing is replaced).
    """
    path = Path(folder) / MANIFEST
    entries = read_manifest(folder)
    if any(e["file"] == entry["file"] for e in entries):
        raise UserError(f"{path} already lists {entry['file']}; remove its entry and file first, or use another name")
    return atomic_write(path, json.dumps([*entries, entry], indent=2) + "\n")


def shipped() -> list[dict[str, Any]]:
    """The manifest entries, each with its ``name`` (file name without ``.pth``)."""
    return named_entries(ASSETS)


def is_finetuned(entry: dict[str, Any]) -> bool:
    """Whether a manifest entry is a finetuned model (a delta of a base, ``finetuned_from``)."""
    return "finetuned_from" in entry


def shipped_finetunes() -> list[dict[str, Any]]:
    """The manifest entries of the finetuned models, in manifest order."""
    return [e for e in shipped() if is_finetuned(e)]


def shipped_names() -> list[str]:
    return [e["name"] for e in shipped()]


def shipped_entry(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest entry of a shipped checkpoint file (given by any path to it), else None."""
    target = Path(path).resolve()
    if target.parent != ASSETS.resolve():  # not in the assets folder: no manifest to read
        return None
    for entry in shipped():
        if (ASSETS / entry["file"]).resolve() == target:
            return entry
    return None


def resolve(spec: str | os.PathLike) -> Path:
    """The file of a checkpoint given as a path or as the name of a shipped model.

    An existing path wins over a shipped name.

    Raises:
        UserError: neither a file nor a shipped name (the message says where the names are).
    """
    path = Path(spec)
    if path.exists():
        return path
    if str(spec) in shipped_names():
        return ASSETS / f"{spec}.pth"
    names = shipped_names()
    hint = f" ({', '.join(names[:2])}, …: qft models --shipped lists them)" if names else ""
    raise UserError(f"{spec} does not exist and is not the name of a shipped model{hint}")


def write_delta(
    path: str | os.PathLike,
    model: torch.nn.Module,
    base: str | os.PathLike,
    prefixes: tuple[str, ...],
    extra: dict[str, Any] | None = None,
) -> str:
    """Write the tensors of ``model`` under ``prefixes`` (e.g. ``("g_s.",)``) in fp16 as a
    delta checkpoint of the file ``base``; returns the SHA-256 of the written file.

    The base is named by its file name: the delta must be kept beside it (or ``base`` must
    be a shipped checkpoint). An existing ``path`` is not overwritten; the file is written
    atomically (:func:`qft.files.atomic_write`).
    """
    path, base = Path(path), Path(base)
    if path.exists():
        raise UserError(f"{path} exists; remove it first")
    state = {
        k: (v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu())
        for k, v in model.state_dict().items()
        if k.startswith(prefixes)
    }
    if not state:
        raise ValueError(f"no tensors under {prefixes}")
    obj = {
        "state_dict": state,
        "delta_of": base.name,
        "base_sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
        **(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def base_of(delta_path: Path, name: str) -> Path:
    """The base file of a delta checkpoint: beside it, else a shipped checkpoint."""
    for candidate in (delta_path.parent / name, ASSETS / name):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"{delta_path} is a finetuned delta of {name}, which is neither beside it nor "
        "shipped; put the base checkpoint beside it"
    )
