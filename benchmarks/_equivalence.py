"""Helpers of the official-equivalence scripts (``official_equivalence.py``,
``official_equivalence_mlicpp.py``): one model of an official repository against qft's
model with the same weights, on the same image.

Imported by sibling scripts (``from _equivalence import …``): a script's folder is on
``sys.path`` when it runs.
"""

from __future__ import annotations

import argparse
import json
import time

from pathlib import Path

import torch

from trellis.hardware import machine_info

#: BSDS500 validation images (the shared data folder beside the repository)
BSDS500_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "val"


def add_arguments(parser: argparse.ArgumentParser, size_help: str) -> None:
    """The options of every equivalence run: ``--image`` (default: a BSDS500 validation
    image), ``--size`` of the centre crop (``size_help``), ``--gain`` on ``g_a``'s last
    layer, ``--threads``, ``--json`` (:func:`write_record`)."""
    parser.add_argument("--image", type=Path, default=BSDS500_VAL / "101085.jpg")
    parser.add_argument("--size", type=int, default=256, help=size_help)
    parser.add_argument("--gain", type=float, default=20.0, help="factor on g_a's last layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)


def write_record(args: argparse.Namespace, crop: int | list[int], results: dict) -> None:
    """With ``--json``, write the run's record there: the machine, torch's version, the
    settings (image, ``crop``, gain, threads) and ``results``."""
    if args.json:
        info = {"image": str(args.image), "crop": crop, "gain": args.gain, "threads": args.threads}
        payload = {"machine": machine_info(), "torch": torch.__version__, "settings": info, "results": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


def centre_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre ``height × width`` crop of an image ``(1, 3, H, W)``, contiguous."""
    h, w = image.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return image[..., top : top + height, left : left + width].contiguous()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Whether two tensors are bitwise equal, and their largest absolute difference."""
    return {"equal": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max())}


@torch.no_grad()
def check(
    official: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor, likelihoods: tuple[str, str] = ("y", "z")
) -> dict:
    """The two models (eval mode) on ``x``: ``forward`` (``x_hat`` and the likelihoods of
    y and z, :func:`compare`), ``compress`` (``strings_equal``: byte for byte; ``bytes``:
    qft's y and z sizes), ``decompress`` (the official decoder on qft's strings, its output
    clamped to [0, 1] as qft's decoder clamps — a no-op for the DCAE and CCA decoders, which
    clamp — against qft's decoder on the official strings) and ``time_s``.
    ``likelihoods``: the official forward pass's keys of y's and z's likelihoods."""
    official.eval()
    ours.eval()
    t = time.perf_counter()
    fo, fq = official(x), ours(x)
    result = {"forward": {"x_hat": compare(fo["x_hat"], fq["x_hat"])}}
    for key, official_key in zip(("y", "z"), likelihoods):
        result["forward"][f"likelihoods_{key}"] = compare(fo["likelihoods"][official_key], fq["likelihoods"][key])
    eo, eq = official.compress(x), ours.compress(x)
    result["strings_equal"] = eo["strings"] == eq["strings"]
    result["bytes"] = {"y": len(eq["strings"][0][0]), "z": len(eq["strings"][1][0])}
    do = official.decompress(eq["strings"], eq["shape"])["x_hat"].clamp(0, 1)  # official decoder, qft's stream
    dq = ours.decompress(eo["strings"], eo["shape"])["x_hat"]  # qft's decoder, official stream
    result["decompress_x_hat"] = compare(do, dq)
    result["time_s"] = time.perf_counter() - t
    return result
