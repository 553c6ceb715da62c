"""The decoder target computed at the SGA-refined latent, then USQ or TCQ-8 (issue 24).

``qft`` refuses ``--target`` with ``--refine sga`` (docs/design.md, "SGA refinement"): SGA
already descends the image loss, so a Gauss–Newton step from its result was expected to
add nothing. TCQ-8, though, loses to USQ after SGA because it re-quantizes the refined
latent without looking at the image; the target is what gives the trellis the image's
view without SGA. This measures, per image and model, from one analysis (plain, and
SGA-N refined), the step computed at that latent (:meth:`qft.codec.latent.LatentCoder.latents`
with ``direction``), and each of USQ, USQ + target ``rd``, TCQ-8 and TCQ-8 + target ``rd``
(calibrated settings), real bitstreams: bpp, PSNR, the model's RD cost
``λ·255²·MSE + bpp`` and encode seconds (the analysis with the step, computed for every
row, plus the row's quantization and coding). Kodak by default (the table of issue 24 is on
Kodak; nothing is chosen from it). Writes ``benchmarks/results/target_after_sga.json``.

    python benchmarks/archive/target_after_sga.py --models mbt2018-mean-0.013 --images 1 --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from pathlib import Path

import torch

from trellis.hardware import machine_info

from qft.codec import Codec, SGARefine, list_images, pad, read_image
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mbt2018-mean-0.013"])
    ap.add_argument("--data", default=str(ROOT / "qft" / "assets" / "kodak"))
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200, help="SGA steps")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "target_after_sga.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = list_images(args.data)[: args.images]
    record = {
        "benchmark": "decoder target at the SGA-refined latent (issue 24)",
        "data": os.path.relpath(args.data, ROOT),
        "images": [p.name for p in images],
        "steps": args.steps,
        "threads": 1,
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "per_model": {},
    }
    for name in args.models:
        ck = load_checkpoint(name)
        settings = read_settings(ck)
        lmbda = settings["model_lambda"]
        codec = Codec.from_checkpoint(ck)
        configs = {
            "usq": resolve_quantizer("usq", settings, target=0.0),
            "usq+target": resolve_quantizer("usq", settings, target="rd"),
            "tcq8": resolve_quantizer("tcq8", settings, target=0.0),
            "tcq8+target": resolve_quantizer("tcq8", settings),
        }
        rows = record["per_model"][name] = {}
        for path in images:
            x = read_image(path)
            h, w = x.shape[-2:]
            xp, padding = pad(x)
            for start, refine in (("plain", None), (f"sga{args.steps}", SGARefine(lmbda, args.steps))):
                t0 = time.perf_counter()
                (lat,) = codec.latent_coder.latents(xp, True, padding, refine)
                seconds = time.perf_counter() - t0
                for label, c in configs.items():
                    t1 = time.perf_counter()
                    q = codec.latent_coder.requantize(lat, c.quantizer, c.weights, c.target)
                    enc = codec.encode_latent(q, c.quantizer, h, w)
                    t_q = time.perf_counter() - t1
                    mse = (codec.decompress(enc["bitstream"])["x_hat"] - x).pow(2).mean().item()
                    bpp = len(enc["bitstream"]) * 8 / (h * w)
                    row = {"bpp": bpp, "psnr": 10 * math.log10(1 / mse), "rd_cost": lmbda * 255**2 * mse + bpp}
                    row["encode_s"] = seconds + t_q
                    rows.setdefault(f"{start}+{label}", []).append({"image": path.name, **row})
                    print(name, path.name, f"{start}+{label}", {k: round(v, 4) for k, v in row.items()}, flush=True)
        record["load_after"] = os.getloadavg()
        atomic_write(args.output, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
