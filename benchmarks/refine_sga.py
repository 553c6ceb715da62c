"""SGA latent refinement (qft.codec.refine) against the decoder target, real bitstreams.

On the shipped ``mbt2018-mean-0.013`` (its training λ is the RD weight), a few Kodak
images, one thread: bpp, PSNR, the model's RD cost ``λ·255²·MSE + bpp`` and encode
seconds per image for USQ, USQ + target rd, TCQ-8 + target (calibrated settings), and
SGA-N with USQ or TCQ-8 (no target) as the final quantizer. Writes
``benchmarks/results/refine_sga.json``; the machine's load is recorded (times taken on a
shared machine are upper bounds).

    python benchmarks/refine_sga.py --images 2 --steps 50 200
    python benchmarks/refine_sga.py --model mbt2018-mean-0.0483 --images 4 --steps -o out.json  # no SGA
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from pathlib import Path

import torch

from qft.codec import Codec, SGARefine, list_images, read_image
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer

OUT = Path(__file__).parent / "results" / "refine_sga.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mbt2018-mean-0.013")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, nargs="*", default=[50, 200], help="SGA steps (none: the cheap rows only)")
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(args.model)
    settings = read_settings(ck)
    lmbda = settings["model_lambda"]
    codec = Codec.from_checkpoint(ck)
    configs = {
        "usq": (resolve_quantizer("usq", settings, target=0.0), None),
        "usq+target_rd": (resolve_quantizer("usq", settings, target="rd"), None),
        "tcq8+target": (resolve_quantizer("tcq8", settings), None),
    }
    for n in args.steps:
        configs[f"sga{n}+usq"] = (resolve_quantizer("usq", settings, target=0.0), SGARefine(lmbda, n))
        configs[f"sga{n}+tcq8"] = (resolve_quantizer("tcq8", settings, target=0.0), SGARefine(lmbda, n))
    images = list_images(Path(__file__).parents[1] / "qft" / "assets" / "kodak")[: args.images]
    c, _ = configs["tcq8+target"]
    codec.compress(read_image(images[0]), c.quantizer, c.weights, c.target)  # JIT warm-up / cache load, untimed
    rows = {name: [] for name in configs}
    record = {
        "model": args.model,
        "model_lambda": lmbda,
        "images": [p.name for p in images],
        "threads": 1,
        "load_before": os.getloadavg(),
        "configs": {k: {**c.describe(), "refine": r.record() if r else "none"} for k, (c, r) in configs.items()},
        "rows": rows,
    }
    for path in images:
        x = read_image(path)
        pixels = x.shape[-2] * x.shape[-1]
        for name, (c, refine) in configs.items():
            t0 = time.perf_counter()
            out = codec.compress(x, c.quantizer, c.weights, c.target, refine)
            seconds = time.perf_counter() - t0
            x_hat = codec.decompress(out["bitstream"])["x_hat"]
            mse = (x_hat - x).pow(2).mean().item()
            bpp = len(out["bitstream"]) * 8 / pixels
            rows[name].append(
                {
                    "image": path.name,
                    "bpp": bpp,
                    "psnr": 10 * math.log10(1 / mse),
                    "rd_cost": lmbda * 255**2 * mse + bpp,
                    "encode_s": seconds,
                }
            )
            print(name, path.name, rows[name][-1], flush=True)
            record["load_after"] = os.getloadavg()
            atomic_write(args.output, json.dumps(record, indent=1))  # partial results survive a timeout
    mean = {
        name: {k: sum(r[k] for r in rs) / len(rs) for k in ("bpp", "psnr", "rd_cost", "encode_s")}
        for name, rs in rows.items()
        if rs
    }
    record["mean"] = mean
    atomic_write(args.output, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
