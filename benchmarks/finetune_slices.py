"""Finetuning a channel-slice model (TCM, DCAE, CCA; issue 21): three arms against the base,
with real bitstreams (docs/design.md, "Finetuning the channel-slice models").

Given a base checkpoint and its λ, runs ``qft finetune`` (:func:`qft.finetune.finetune`,
the recipe ``recipes/finetune/slices-cpu.yaml`` unless ``--recipe``) three ways, same
data, steps and lr:

- ``decoder-tcq8``: parts ``decoder`` (g_s + LRP) on TCQ-8 latents;
- ``entropy-tcq8``: parts ``decoder+entropy`` (+ hyper-synthesis and slice transforms);
- ``control``: the model's own training proxy, parts ``--control-parts`` (default
  ``decoder+entropy``);

then codes the first ``--images`` Kodak images with each (compress → ``.qft`` stream →
decompress, :func:`qft.eval.evaluate.evaluate_images`): the base with USQ and with the
arms' TCQ-8, each arm with TCQ-8, the control also with USQ. Per row: mean bpp (stream
length), PSNR-RGB, MS-SSIM and the model's RD cost ``J = λ·255²·MSE + bpp`` (mean over
images), and each row's change of ``J`` against the base under the same quantizer. One
rate point gives no BD-rate; ``J`` at the model's own λ is the measure its training
minimises. Runs already finished in ``--runs`` are reused (a stopped one resumes).

    python benchmarks/finetune_slices.py -m /work/main/runs/reference/tcm-small-cpu/lambda-0.013/model.pth \\
        --lambda 0.013 --steps 400 --images 4 --out benchmarks/results/finetune_slices_tcm-small.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from pathlib import Path

import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, list_images
from qft.eval.evaluate import evaluate_images
from qft.files import atomic_write
from qft.finetune import finetune, load_finetune_recipe, override_recipe
from qft.models import load_checkpoint
from qft.threads import set_threads

ROOT = Path(__file__).resolve().parents[1]
#: arm -> (parts, control); the control's parts come from --control-parts
ARMS = {"decoder-tcq8": ("decoder", False), "entropy-tcq8": ("decoder+entropy", False), "control": (None, True)}


def _rd_cost(rows: list[dict], lmbda: float) -> float:
    """Mean over images of ``λ·255²·MSE + bpp`` (MSE of 8-bit RGB in [0, 1], from PSNR)."""
    return statistics.fmean(lmbda * 255**2 * 10 ** (-r["psnr-rgb"] / 10) + r["bpp"] for r in rows)


def _summary(rows: list[dict], lmbda: float) -> dict:
    return {
        "bpp": statistics.fmean(r["bpp"] for r in rows),
        "psnr-rgb": statistics.fmean(r["psnr-rgb"] for r in rows),
        "ms-ssim-rgb": statistics.fmean(r["ms-ssim-rgb"] for r in rows),
        "rd_cost": _rd_cost(rows, lmbda),
        "per_image": rows,
    }


def run_arms(args) -> dict[str, dict]:
    """Train (or reuse) the three arms; returns arm -> the run's summary."""
    recipe = load_finetune_recipe(args.recipe)
    summaries = {}
    for arm, (parts, control) in ARMS.items():
        r = override_recipe(
            recipe,
            data=args.data,
            checkpoint=str(args.checkpoint),
            lmbda=args.lmbda,
            steps=args.steps,
            parts=parts or args.control_parts,
            method="tcq8",
            weights="none",
            threads=args.threads,
        )
        out = args.runs / arm
        t0 = time.perf_counter()
        summaries[arm] = finetune(
            r, out, control=control, resume=(out / "checkpoint.pth").exists(), progress=args.progress
        )
        print(f"{arm}: {summaries[arm]['step']} steps, {time.perf_counter() - t0:.0f} s this session", flush=True)
    return summaries


def evaluate(args, summaries: dict[str, dict]) -> dict[str, dict]:
    """Rows: base-usq, base-tcq8, each arm with TCQ-8, control-usq."""
    images = list_images(args.kodak, recursive=False)[: args.images]
    q = summaries["entropy-tcq8"]["quantizer"]
    tcq8 = Quantizer(**{k: q[k] for k in ("method", "step", "lam", "theta", "reset")})
    usq = Quantizer("usq")
    models = {"base": args.checkpoint, **{arm: Path(s["model"]) for arm, s in summaries.items()}}
    rows = {}
    for name, path in models.items():
        codec = Codec.from_checkpoint(load_checkpoint(path))
        quantizers = {"tcq8": tcq8} | ({"usq": usq} if name in ("base", "control") else {})
        for qname, quantizer in quantizers.items():
            label = f"{name}-{qname}" if name in ("base", "control") else name
            per_image = evaluate_images(codec, quantizer, images, desc=label, progress=args.progress)
            rows[label] = _summary(per_image, args.lmbda)
            print(f"{label}: bpp {rows[label]['bpp']:.4f} psnr {rows[label]['psnr-rgb']:.3f}", flush=True)
    for label, row in rows.items():
        ref = rows["base-usq" if label.endswith("-usq") else "base-tcq8"]
        row["rd_cost_change_vs_base_same_quantizer_pct"] = 100 * (row["rd_cost"] / ref["rd_cost"] - 1)
        row["rd_cost_change_vs_base_usq_pct"] = 100 * (row["rd_cost"] / rows["base-usq"]["rd_cost"] - 1)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # the rest: the module docstring
    p.add_argument("-m", "--checkpoint", type=Path, required=True, help="base checkpoint (TCM, DCAE or CCA)")
    p.add_argument("--lambda", dest="lmbda", type=float, required=True, help="the base model's λ")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--images", type=int, default=4, help="the first N Kodak images")
    p.add_argument("--kodak", type=Path, default=ROOT.parent / "shared" / "data" / "kodak")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "finetune" / "slices-cpu.yaml")
    p.add_argument("--data", type=Path, help="train on the images directly in this folder (default: the recipe's)")
    p.add_argument("--control-parts", default="decoder+entropy", choices=("decoder", "decoder+entropy"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, help="run folders (default: runs/finetune-slices/<checkpoint's folder>)")
    p.add_argument("--out", type=Path, help="JSON (default: benchmarks/results/finetune_slices_<name>.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    name = f"{args.checkpoint.parent.parent.name}-{args.checkpoint.parent.name}"
    args.runs = args.runs or ROOT / "runs" / "finetune-slices" / name
    args.out = args.out or ROOT / "benchmarks" / "results" / f"finetune_slices_{name}.json"
    set_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    summaries = run_arms(args)
    train_s = time.perf_counter() - t0
    rows = evaluate(args, summaries)
    base = load_checkpoint(args.checkpoint)
    record = {
        "benchmark": "finetune_slices",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "checkpoint": str(args.checkpoint),
        "checkpoint_sha256": base.sha256,
        "arch": base.arch,
        "params": base.params,
        "lambda": args.lmbda,
        "steps": args.steps,
        "control_parts": args.control_parts,
        "images": [r["image"] for r in rows["base-usq"]["per_image"]],
        "arms": {
            arm: {k: s[k] for k in ("parts", "control", "quantizer", "step", "wall_time_s", "model")}
            for arm, s in summaries.items()
        },
        "train_wall_s_this_session": train_s,
        "rows": rows,
        "threads": args.threads,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "machine": machine_info(),
        "torch": torch.__version__,
    }
    atomic_write(args.out, json.dumps(record, indent=1, allow_nan=True) + "\n")
    print(args.out)
    for label, row in rows.items():
        change = row["rd_cost_change_vs_base_same_quantizer_pct"]
        print(f"{label:16s} bpp {row['bpp']:.4f}  PSNR {row['psnr-rgb']:.3f}  J {row['rd_cost']:.4f} ({change:+.2f} %)")
    return 0 if all(math.isfinite(r["rd_cost"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
