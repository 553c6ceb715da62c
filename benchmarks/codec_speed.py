"""Codec benchmark: per-image compress/decompress time and real vs estimated bpp.

For one checkpoint, every image of a folder is coded with USQ, TCQ-4 and TCQ-8 (default
parameters of the CLI) through :class:`qft.codec.Codec` — real bitstreams, decoded and
checked. Reported per method: mean compress and decompress time (and their ratio to USQ),
mean real bpp (whole ``.qft`` file), mean estimated bpp (table rate of the y indices plus
the likelihood of ``ẑ``) and their relative gap. ``--target`` gives every method the decoder
target (``η``, or ``rd``: chosen per image at the checkpoint's training λ).

    python benchmarks/codec_speed.py --checkpoint CKPT [--data qft/assets/kodak] [--images 24]
                                     [--target 0|ETA|rd] [--json benchmarks/results/codec_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from pathlib import Path

import numpy as np
import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, RDTarget, list_images, read_image, target_record
from qft.models import load_checkpoint
from qft.settings import default_lambda, default_step

METHODS = ("usq", "tcq4", "tcq8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="qft/assets/kodak")
    parser.add_argument("--images", type=int, default=0, help="first N images only (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--target", default="0", help="decoder target of every method: ETA or rd (default: 0, none)")
    parser.add_argument("--json", default="benchmarks/results/codec_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    codec = Codec.from_checkpoint(ckpt)
    images = list_images(args.data)[: args.images or None]
    quantizers = {m: Quantizer(m, step=default_step(m), lam=default_lambda(m, default_step(m))) for m in METHODS}
    target = RDTarget(float(ckpt.extra["lambda"])) if args.target == "rd" else float(args.target)
    codec.compress(read_image(images[0]), quantizers["tcq8"], target=target)  # JIT warm-up / cache load
    rows = {m: [] for m in METHODS}
    for path in images:
        x = read_image(path)
        pixels = x.shape[-2] * x.shape[-1]
        for m, q in quantizers.items():
            t0 = time.perf_counter()
            enc = codec.compress(x, q, target=target)
            t1 = time.perf_counter()
            dec = codec.decompress(enc["bitstream"])
            t2 = time.perf_counter()
            assert np.array_equal(dec["y_hat"], enc["y_hat"])
            rows[m].append(
                {
                    "compress_s": t1 - t0,
                    "decompress_s": t2 - t1,
                    "bpp": len(enc["bitstream"]) * 8 / pixels,
                    "bpp_estimated": enc["bits_estimated"] / pixels,
                }
            )
    summary = {}
    for m in METHODS:
        mean = {k: statistics.fmean(r[k] for r in rows[m]) for k in rows[m][0]}
        mean["real_vs_estimated"] = mean["bpp"] / mean["bpp_estimated"] - 1
        summary[m] = mean
    for m in METHODS:
        summary[m]["compress_vs_usq"] = summary[m]["compress_s"] / summary["usq"]["compress_s"]
        summary[m]["decompress_vs_usq"] = summary[m]["decompress_s"] / summary["usq"]["decompress_s"]
    result = {
        "machine": machine_info() | {"torch_threads": args.threads},
        "checkpoint": {"path": args.checkpoint, "sha256": ckpt.sha256, "arch": ckpt.arch, "params": ckpt.params},
        "data": args.data,
        "images": len(images),
        "quantizers": {m: {"step": q.step, "lambda": q.lam} for m, q in quantizers.items()},
        "target": target_record(target),
        "summary": summary,
        "per_image": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    for m, s in summary.items():
        print(
            f"{m:5s} compress {s['compress_s']:.3f} s ({s['compress_vs_usq']:.2f}x USQ)  "
            f"decompress {s['decompress_s']:.3f} s "
            f"({s['decompress_vs_usq']:.2f}x)  bpp {s['bpp']:.4f} real / {s['bpp_estimated']:.4f} est "
            f"({100 * s['real_vs_estimated']:+.2f} %)"
        )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
