"""Encode seconds of the USQ fallback (``qft compress -q tcq8 --refine sga --refine-fallback``)
against its two parts, real bitstreams, one thread.

Per image, for one shipped model (or checkpoint): SGA-N + TCQ-8 through the trellis, SGA-N +
USQ, and the fallback, which codes both from one SGA run and keeps the stream with the lower
RD cost (``LatentCoder.quantize_or_usq``); the fallback's stream must be byte for byte one of
the two (else the run stops). Records the measured seconds beside the estimate
``benchmarks/refine_sga.py`` derives from its two rows (their sum less the shared SGA head's
share of SGA-N + USQ's seconds), so that estimate is checked, not assumed.

Writes ``benchmarks/results/refine_fallback_speed.json`` (``-o``) with the machine and its
load (times taken on a shared machine are upper bounds).

    python benchmarks/refine_fallback_speed.py --model mbt2018-mean-0.0035 --images 2 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from _cli import KODAK, ROOT

from trellis.hardware import machine_info

from qft.codec import Codec, list_images, read_image
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

OUT = ROOT / "benchmarks" / "results" / "refine_fallback_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mbt2018-mean-0.0035", help="checkpoint or shipped name")
    ap.add_argument("--data", default=str(KODAK))
    ap.add_argument("--images", type=int, default=2, help="the first N images")
    ap.add_argument("--steps", type=int, default=200, help="SGA steps")
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    set_threads(1)
    ck = load_checkpoint(args.model)
    settings = read_settings(ck)
    codec = Codec.from_checkpoint(ck, "cpu")
    sga = {"refine": "sga", "refine_steps": args.steps}
    # what qft compress codes for each: -q tcq8 / -q usq --refine sga, and with --refine-fallback
    choices = {
        "sga+tcq8": resolve_quantizer("tcq8", settings, **sga),
        "sga+usq": resolve_quantizer("usq", settings, **sga),
        "fallback": resolve_quantizer("tcq8", settings, **sga, refine_fallback=True),
    }
    head, _ = choices["sga+tcq8"].refine.split(choices["sga+tcq8"].quantizer)
    images = list_images(args.data)[: args.images]
    record = {
        "model": args.model,
        "data": os.path.relpath(args.data, ROOT),
        "steps": args.steps,
        "threads": 1,
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "rows": [],
    }
    warm = resolve_quantizer("tcq8", settings, refine="sga", refine_steps=2)
    codec.compress(read_image(images[0]), warm.quantizer, warm.weights, warm.target, warm.refine)  # JIT, untimed
    for path in images:
        x = read_image(path)
        seconds, streams = {}, {}
        for name, c in choices.items():
            t0 = time.perf_counter()
            out = codec.compress(x, c.quantizer, c.weights, c.target, c.refine)
            seconds[name], streams[name] = time.perf_counter() - t0, out["bitstream"]
        kept = "sga+usq" if streams["fallback"] == streams["sga+usq"] else "sga+tcq8"
        if streams["fallback"] != streams[kept]:
            raise SystemExit(f"refine_fallback_speed: {path.name}: the fallback's stream is neither of its two")
        estimate = seconds["sga+tcq8"] + seconds["sga+usq"] * (1 - head / args.steps)
        row = {"image": path.name, **{f"{k}_s": v for k, v in seconds.items()}, "kept": kept}
        row |= {"estimate_s": estimate, "sum_s": seconds["sga+tcq8"] + seconds["sga+usq"]}
        record["rows"].append(row)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    rows = record["rows"]
    record["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.endswith("_s")}
    record["fallback_vs_estimate"] = record["mean"]["fallback_s"] / record["mean"]["estimate_s"]
    record["fallback_vs_sum"] = record["mean"]["fallback_s"] / record["mean"]["sum_s"]
    record["load_after"] = os.getloadavg()
    atomic_write(args.output, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
