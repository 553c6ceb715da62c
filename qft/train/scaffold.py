"""The scaffolding every training loop of qft shares (``qft train`` and ``qft finetune``).

A loop in a run folder: :func:`resume_state` (refuse to overwrite, or reload a training
checkpoint), :class:`RunLog` (JSON lines, cut back to the checkpoint's step on resume),
:class:`TrainMonitor` (the log window of per-step statistics, the tqdm bar and the
``train`` records), :func:`save_state` (atomic training checkpoints) and
:func:`write_summary`. Device choice and the one-line machine description recorded in
checkpoints, summaries and the manifest live here too.

Conventions (both loops): step ``s`` draws its data from ``(seed, s)`` only, so a training
checkpoint — model, optimizer state, step count — resumes to the same weights as an
uninterrupted run; a log line's ``step`` is the number of steps done.
"""

from __future__ import annotations

import json
import math

from pathlib import Path
from typing import Any

import torch

from tqdm import tqdm

from trellis.hardware import cpu_name

from qft.errors import UserError
from qft.files import atomic_write, remove_stale_temporaries
from qft.train.checkpoint import load_training_state, save_atomic

__all__ = [
    "RunLog",
    "StatsWindow",
    "TrainMonitor",
    "machine_description",
    "psnr_from_mse",
    "resolve_device",
    "resume_state",
    "save_state",
    "write_summary",
]


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB of a mean squared error of ``[0, 1]`` images (``inf`` for 0)."""
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, not '{name}'")
    return torch.device(name)


def machine_description(device: torch.device, threads: int, amp: bool = True) -> str:
    """One line naming the hardware a run used, for checkpoints and the manifest
    (``amp``: whether the transforms ran under bf16 autocast on CUDA)."""
    if device.type == "cuda":
        precision = "bf16 autocast" if amp else "fp32"
        return f"{torch.cuda.get_device_name(device)} (CUDA, {precision})"
    return f"CPU {cpu_name()}, {threads} thread(s)"


def resume_state(path: Path, resume: bool) -> dict[str, Any] | None:
    """The training checkpoint at ``path`` to continue, or ``None`` when there is none.
    Temporary files that a run killed while saving left beside it (or beside the exported
    ``model.pth``) are removed first (:func:`qft.files.remove_stale_temporaries`).

    Raises:
        UserError: ``path`` exists and ``resume`` is false (nothing is overwritten), or it
            is not a readable training checkpoint.
    """
    for saved in (path, path.with_name("model.pth")):
        remove_stale_temporaries(saved)
    if not path.exists():
        return None
    if not resume:
        raise UserError(f"{path} exists; pass --resume to continue it or choose another --out")
    return load_training_state(path)


def save_state(state: dict[str, Any], path: Path) -> None:
    """Write a training checkpoint atomically (a crash never leaves half a file)."""
    save_atomic(state, path)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write a run's ``summary.json`` (indented, atomically)."""
    atomic_write(path, json.dumps(summary, indent=2) + "\n")


class RunLog:
    """Append-only JSON-lines log; on resume, lines past the checkpoint's step are cut.

    Args:
        path: the log file.
        keep_until_step: ``None`` starts an empty log; a step keeps the lines up to it.
    """

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            atomic_write(path, "")
        elif path.exists():
            kept = [
                ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= keep_until_step
            ]
            atomic_write(path, "".join(ln + "\n" for ln in kept))

    def write(self, **entry: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class StatsWindow:
    """Running sums of per-step statistics between two log lines."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._n = 0

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def take(self) -> dict[str, float]:
        """The means since the last call, and a fresh window."""
        mean = {k: v / self._n for k, v in self._sums.items()}
        self._sums, self._n = {}, 0
        return mean


class TrainMonitor:
    """The tqdm bar, the statistics window and the ``train`` records of a loop.

    Every ``log_every`` steps (and at the run's last step) the window's means go to the
    log as ``{"kind": "train", "step", **head, **means, "psnr", **tail}`` and to the bar's
    postfix, formatted as ``postfix`` says (statistic -> format spec; ``psnr`` is the
    PSNR of the mean MSE).

    Args:
        log: the run's log (``None`` on a process that does not write one).
        total, initial: the run's step count and the step it starts at.
        desc: the bar's label; ``enabled``: show the bar.
    """

    def __init__(
        self,
        log: RunLog | None,
        *,
        total: int,
        initial: int,
        desc: str,
        log_every: int,
        postfix: dict[str, str],
        enabled: bool = True,
    ):
        self.log = log
        self.log_every = log_every
        self.postfix = postfix
        self.window = StatsWindow()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, mininterval=5)

    def step(self, done: int, end: int, stats: dict[str, float], head: dict[str, Any], tail: dict[str, Any]) -> None:
        """Record the statistics of the step that made ``done`` steps (of ``end`` this run)."""
        self.window.add(stats)
        self.bar.update(1)
        if done % self.log_every == 0 or done == end:
            mean = self.window.take()
            psnr = psnr_from_mse(mean["mse"])
            self.log.write(kind="train", step=done, **head, **mean, psnr=psnr, **tail)
            values = mean | {"psnr": psnr}
            self.bar.set_postfix({k: f"{values[k]:{fmt}}" for k, fmt in self.postfix.items()})

    def close(self) -> None:
        self.bar.close()
