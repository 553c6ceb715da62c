"""The CUDA checks of issue 6 in one short run, for a session that has a GPU.

1. ``pytest -k cuda``: a stream encoded with the transforms on the GPU decodes on the CPU
   (every quantizer), and ``qft finetune`` on CUDA (bf16 autocast, channels_last) for both
   part sets, its output loading on the CPU; MLIC++ (issue 22, a tiny model): USQ and
   TCQ-8 coded with the transforms on the GPU decode exactly on the GPU and on the CPU,
   USQ choosing the CPU encoder's indices, and ``qft finetune`` of MLIC++ on CUDA
   (decoder+entropy, every batch quantized by the real quantizer) coding exactly after.
2. ``finetune_step.py --device cuda``: step time of cached decoder-only finetuning against
   a full training step, at the shipped width (N=64, M=96) and CompressAI's zoo width
   (N=128, M=192), batch 16, 256x256 crops.
3. ``torchrun`` (NCCL, DDP, DistributedSampler, rank 0 writing): ``qft finetune
   recipes/finetune/gpu.yaml`` on a shipped model, TCQ-8, decoder, ``--steps`` steps;
   images/s from its JSON-lines log. Its training set is ``--data`` (a BSDS500 root), or by
   default 32 synthetic 384x512 images (the step time does not depend on the content), so the
   checks need no dataset on the GPU machine.

Each part is a subprocess with its own time limit, so one that fails or hangs costs only
its own minutes; the JSON records each part's command, exit status, time and figures.

::

    python benchmarks/cuda_checks.py --json benchmarks/results/cuda_checks.json
    python benchmarks/cuda_checks.py --data /data/bsds500 --nproc 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import yaml

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], limit: float, log: Path) -> dict:
    """Run ``cmd`` in the project root with a time limit; its output goes to ``log``."""
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"cmd": cmd, "rc": rc, "wall_s": time.perf_counter() - t, "tail": tail}


def _synthetic(root: Path, splits: list[str], n: int = 32) -> Path:
    """``n`` seeded random 384x512 RGB PNGs spread over the recipe's training splits."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / splits[i % len(splits)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root.resolve()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "cuda-checks")
    p.add_argument("--data", help="BSDS500 root for the torchrun part (default: synthetic images)")
    p.add_argument("--model", default="mbt2018-mean-0.013", help="base model of the torchrun part")
    p.add_argument("--steps", type=int, default=400, help="finetuning steps of the torchrun part")
    p.add_argument("--nproc", type=int, default=1, help="torchrun processes (one per GPU)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    parts: dict[str, dict] = {}

    parts["pytest_cuda"] = _run(
        [
            py,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "cuda",
            "tests/test_codec.py",
            "tests/test_finetune.py",
            "tests/test_checkerboard_coding.py",
            "tests/test_finetune_slices.py",
        ],
        240,
        args.out / "pytest.log",
    )
    for name, width in (("step_n64", ["--N", "64", "--M", "96"]), ("step_n128", ["--N", "128", "--M", "192"])):
        result = args.out / f"{name}.json"
        parts[name] = _run(
            [
                py,
                "benchmarks/finetune_step.py",
                "--device",
                "cuda",
                "--threads",
                "4",
                *width,
                "--batch",
                "16",
                "--crop",
                "256",
                "--steps",
                "40",
                "--json",
                str(result),
            ],
            90,
            args.out / f"{name}.log",
        )
        if result.exists():
            bench = json.loads(result.read_text())
            parts[name].update(
                {k: bench[k] for k in ("step_s_median", "images_per_s", "ratio_finetune_over_full", "machine")}
            )

    recipe = yaml.safe_load((ROOT / "recipes" / "finetune" / "gpu.yaml").read_text())
    if args.data:
        recipe["data"]["root"] = str(Path(args.data).resolve())
    else:
        recipe["data"]["root"] = str(_synthetic(args.out / "data", recipe["data"]["train"]))
    recipe_path = args.out / "gpu.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    ft = args.out / "finetune-ddp"
    parts["torchrun"] = _run(
        [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "qft",
            "finetune",
            str(recipe_path),
            "-m",
            args.model,
            "--steps",
            str(args.steps),
            "--out",
            str(ft),
            "--no-progress",
        ],
        150,
        args.out / "torchrun.log",
    )
    log = ft / "log.jsonl"
    if log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        steps = [r["step_time_s"] for r in rows if r["kind"] == "train"][1:]  # first: warm-up
        start = next((r for r in rows if r["kind"] == "start"), {})
        parts["torchrun"].update(
            {
                "data": args.data or "synthetic: 32 random 384x512 images",
                "start": start,
                "batch": recipe["batch_size"],
                "step_s_median": statistics.median(steps) if steps else None,
                "images_per_s": recipe["batch_size"] / statistics.median(steps) if steps else None,
            }
        )

    import torch

    result = {
        "benchmark": "cuda_checks",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "parts": parts,
    }
    keys = ("rc", "wall_s", "images_per_s", "ratio_finetune_over_full")
    print(json.dumps({k: {kk: v.get(kk) for kk in keys} for k, v in parts.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
