"""Compress/decompress time of the checkerboard models (MLIC++, ELIC) with USQ vs TCQ-8,
through :class:`qft.codec.Codec` (step-wise coding, :mod:`qft.codec.checkerboard`).

Random weights (no trained MLIC++/ELIC is at hand), with a gain on ``g_a``'s output (a
forward hook) so the latent needs many symbols, as a trained model's does. Each image is
cropped to ``--size``; both methods are coded, decoded and checked (decoded ``ŷ`` equal to
the encoder's), ``--repeats`` times, the methods interleaved. Reported per image: the
least time of the repeats (the one least disturbed by other processes) of compress,
of its analysis (``g_a``, ``h_a``, z coding) and of decompress; their means over the
images and the TCQ-8/USQ ratios; the machine's load (a shared machine: ratios are more
telling than times).

    python benchmarks/checkerboard_speed.py [--arch mlicpp] [--size 256 384] [--images 1]
                                            [--json benchmarks/results/checkerboard_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from pathlib import Path

import numpy as np
import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, list_images, read_image
from qft.models import create_model
from qft.settings import default_lambda, default_step

METHODS = ("usq", "tcq8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="mlicpp", help="mlicpp, elic2022-official or elic2022-chandelier")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 384), help="crop height width")
    parser.add_argument("--data", default="qft/assets/kodak")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--gain", type=float, default=3.0, help="factor on g_a's output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="benchmarks/results/checkerboard_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = create_model(args.arch, seed=0)
    model.g_a.register_forward_hook(lambda module, inputs, out: out * args.gain)
    codec = Codec(model, args.arch)
    h, w = args.size
    images = [read_image(p)[..., :h, :w] for p in list_images(args.data)[: args.images]]
    quantizers = {m: Quantizer(m, step=default_step(m), lam=default_lambda(m, default_step(m))) for m in METHODS}
    codec.compress(images[0][..., :64, :64], quantizers["tcq8"])  # JIT warm-up
    load_before = os.getloadavg()
    rows = {m: [] for m in METHODS}
    for x in images:
        runs = {m: [] for m in METHODS}
        for _ in range(args.repeats):
            for m, q in quantizers.items():
                with torch.no_grad():
                    t0 = time.perf_counter()
                    codec.latent_coder.latents(x)
                    t1 = time.perf_counter()
                enc = codec.compress(x, q)
                t2 = time.perf_counter()
                dec = codec.decompress(enc["bitstream"])
                t3 = time.perf_counter()
                assert np.array_equal(dec["y_hat"], enc["y_hat"]), "decoded latent differs"
                bpp = 8 * len(enc["bitstream"]) / (x.shape[-2] * x.shape[-1])
                runs[m].append({"compress_s": t2 - t1, "analysis_s": t1 - t0, "decompress_s": t3 - t2, "bpp": bpp})
                print(m, json.dumps(runs[m][-1]), flush=True)
        for m in METHODS:
            rows[m].append({k: min(r[k] for r in runs[m]) for k in runs[m][0]})
    summary = {}
    for m in METHODS:
        summary[m] = {k: statistics.mean(r[k] for r in rows[m]) for k in rows[m][0]}
    for k in ("compress_s", "decompress_s"):
        summary[f"tcq8_over_usq_{k[:-2]}"] = summary["tcq8"][k] / summary["usq"][k]
    payload = {
        "machine": machine_info(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
        "settings": {**vars(args), "size": list(args.size), "quantizers": {m: q.method for m, q in quantizers.items()}},
        "note": "random weights (gain on g_a's output); a shared, loaded machine: compare ratios, not times",
        "summary": summary,
        "per_image": rows,
    }
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
