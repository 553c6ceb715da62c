"""Writing files safely: one home for atomic writes and output checks.

Every file qft writes for a user (bitstreams, images, checkpoints, settings, JSON) goes
through :func:`atomic_write`: the bytes land in a temporary file in the target's folder,
are flushed to disk and then renamed over the target, so a reader — or a crash, or
``kill -9`` — never sees a half-written file, and an existing file is replaced only once
the new one is complete. A temporary file left by a killed process is named
``.<name>.<random>.tmp`` beside the target; :func:`remove_stale_temporaries` clears them.
"""

from __future__ import annotations

import os
import tempfile

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from qft.errors import UserError

__all__ = ["atomic_write", "check_output", "remove_stale_temporaries"]


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary file in the same folder, fsync,
    ``os.replace``); creates the folder. Returns the path.

    ``data``: bytes, text (UTF-8) or a function that writes into the open binary file
    (e.g. ``lambda f: torch.save(obj, f)``, or ``lambda f: image.save(f, "PNG")``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Removes the temporary files :func:`atomic_write` leaves beside ``path`` when its
    process is killed mid-write; returns the removed paths."""
    path = Path(path)
    removed = []
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def check_output(path: str | os.PathLike, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Checks, before any work, that ``path`` can be written as an output file.

    Raises:
        UserError: ``path`` exists and ``force`` is not given; is a folder; lies in a
            folder that does not exist; or is one of ``inputs`` (never overwritten, even
            with ``force``).
    """
    path = Path(path)
    for other in inputs:
        if path.exists() and Path(other).exists() and path.resolve() == Path(other).resolve():
            raise UserError(f"{path}: the output is the input file; give another output path")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file path for the output")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent}: no such folder for the output; create it first")
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    return path
