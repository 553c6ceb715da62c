"""Helpers of the latent-domain benchmarks (``adapted_tables``, ``latent_gain``,
``decoder_target``, ``error_budget``)."""

from __future__ import annotations

import argparse
import json
import math
import time

from collections.abc import Iterator
from pathlib import Path

import torch

from trellis.hardware import machine_info

from qft.codec import LatentCoder, list_images, read_image
from qft.models import ARCHITECTURES, LoadedCheckpoint, load_checkpoint
from qft.models.zoo import base_entries

#: USQ steps of the reference sweep the rate changes are measured against.
USQ_STEPS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
#: The held-out images the benchmarks measure on by default (never Kodak or Tecnick).
BSDS500_VAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "bsds500" / "val"


def arguments(doc: str, images: int | None = None) -> argparse.ArgumentParser:
    """The options every latent-domain benchmark takes: ``-m`` (default: the shipped base
    models), ``--threads``, ``--json``, and with ``images`` the ``--data`` folder (BSDS500
    val) and how many of its images (default ``images``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("-m", "--checkpoint", nargs="+", help="checkpoints (default: the shipped base models)")
    if images is not None:
        p.add_argument("--data", default=str(BSDS500_VAL))
        p.add_argument("--images", type=int, default=images)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    return p


def write_result(path: Path | None, benchmark: str, fields: dict) -> None:
    """Write ``fields`` as the benchmark's JSON at ``path`` (nothing when ``None``), with the
    benchmark's name, the machine and the date."""
    if path is None:
        return
    result = {
        "benchmark": benchmark,
        **fields,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    path.write_text(json.dumps(result, indent=1) + "\n")


def finite(x: float) -> float | None:
    """``None`` for NaN (a point outside the USQ sweep's quality range): JSON has no NaN."""
    return None if math.isnan(x) else x


def top_left(x: torch.Tensor) -> torch.Tensor:
    """The top-left crop of an image batch with sides multiples of 64 (no padding to score)."""
    return x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64]


def read_images(folder: str | Path, n: int) -> list[torch.Tensor]:
    """The first ``n`` images of ``folder``, :func:`top_left` cropped."""
    return [top_left(read_image(f)) for f in list_images(folder)[:n]]


def checkpoints(specs: list[str] | None) -> Iterator[tuple[str, LoadedCheckpoint, LatentCoder]]:
    """``(spec, checkpoint, coder)`` of each checkpoint (default: the shipped base models),
    the model in eval mode."""
    for spec in specs or [Path(e["file"]).stem for e in base_entries()]:
        ck = load_checkpoint(spec)
        yield spec, ck, LatentCoder(ck.model.eval(), ARCHITECTURES[ck.arch].entropy)


def analyse(coder: LatentCoder, images: list[torch.Tensor]) -> list[tuple]:
    """``(x, y, μ, σ, ẑ bits)`` per image (numpy ``(C, h, w)`` latents)."""
    out = []
    for x in images:
        y, (ctx,), _, _, z_bits = coder.analyse(x)
        mu, sigma = coder.steps.parameters(ctx, 0)  # hyperprior models: one step, the whole latent
        out.append((x, y[0], mu, sigma, float(z_bits[0])))
    return out
