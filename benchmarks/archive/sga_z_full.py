"""SGA-N + TCQ-8 with ``ẑ`` from the whole SGA-N schedule: does the trellis lose at 1,000
steps because its ``z`` stops at the hand-off?

SGA through the trellis (``qft.codec.refine``) hands ``y`` and ``z`` over after the first
``N/2`` steps of one SGA schedule over ``N``; from there ``z`` (hence ``μ, σ``) is fixed,
taken from a run that has not hardened, while SGA-N + USQ goes on refining and annealing it
for ``N`` steps. Here, per image, three encodes from the same SGA schedule: SGA-N + USQ,
SGA-N + TCQ-8 as the codec runs it (``shipped``), and the same with ``ẑ`` (the coded
hyper-latent, so ``μ, σ`` of the trellis steps) from the whole SGA-N run and ``y`` from the
hand-off (``z_full``; it needs the whole run, as ``--refine-fallback`` already does).
Real streams; RD cost ``λ·255²·MSE + bpp`` at the model's λ against SGA-N + USQ. BSDS500
validation images, one thread. Writes ``benchmarks/results/sga_z_full.json`` (``-o``).

    python benchmarks/archive/sga_z_full.py --models mbt2018-mean-0.0035 --images 3 --steps 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from pathlib import Path

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, SGARefine, list_images, pad, read_image
from qft.codec.refine import refine_through_trellis
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

OUT = Path(__file__).parents[1] / "results" / "sga_z_full.json"
DATA = Path(__file__).parents[2].parent / "shared" / "data" / "bsds500" / "val"


def code_image(codec: Codec, x, lmbda: float, steps: int, settings: dict) -> dict:
    """The three encodes of one image ``(1, 3, H, W)`` (module docstring): name → RD cost
    and bytes; ``codec_s`` the codec's SGA-N + TCQ-8 and SGA-N + USQ from one run,
    ``z_full_s`` the hand-off's SGA steps again and the trellis steps of ``z_full``."""
    lc, h, w = codec.latent_coder, *x.shape[-2:]
    c = resolve_quantizer("tcq8", settings, refine="sga", refine_steps=steps)
    refine = SGARefine(lmbda, steps)
    sga, soft = refine.split(c.quantizer)
    xp, padding = pad(x)
    t0 = time.perf_counter()
    # the codec's own SGA-N + TCQ-8 and SGA-N + USQ from one SGA run (what --refine-fallback codes)
    (shipped,), (usq,) = lc.quantize_or_usq(xp, c.quantizer, c.weights, padding, refine)
    seconds = {"codec_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    (head,) = lc.latents(xp, False, padding, refine, stop=sga)  # the hand-off's y, again
    lat = dataclasses.replace(usq, y=head.y)  # ẑ (so μ, σ) of the whole run
    mu, sigma = lc.first_parameters(lat)
    y = refine_through_trellis(codec.model, xp, lat.y, mu, sigma, c.quantizer, c.weights, refine, soft, padding)
    z_full = lc.requantize(dataclasses.replace(lat, y=y), c.quantizer, c.weights)
    seconds["z_full_s"] = time.perf_counter() - t0

    def coded(lat, quantizer) -> dict:
        out = codec.encode_latent(lat, quantizer, h, w)
        return {"rd_cost": codec.rd_cost(out, xp, padding, lmbda), "bytes": len(out["bitstream"])}

    row = {"sga+usq": coded(usq, Quantizer("usq"))}
    for name, q in (("shipped", shipped), ("z_full", z_full)):
        row[name] = coded(q, c.quantizer)
        row[name]["vs_sga_usq_pct"] = 100 * (row[name]["rd_cost"] / row["sga+usq"]["rd_cost"] - 1)
    return row | seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mbt2018-mean-0.0035"])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--skip", type=int, default=0, help="start after this many images")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    set_threads(1)
    record = {"steps": args.steps, "data": os.path.basename(args.data), "machine": machine_info(), "per_model": {}}
    for name in args.models:
        ck = load_checkpoint(name)
        settings = read_settings(ck)
        codec = Codec.from_checkpoint(ck, "cpu")
        rows = record["per_model"].setdefault(name, [])
        for path in list_images(args.data)[args.skip :][: args.images]:
            rows.append(
                {
                    "image": path.name,
                    **code_image(codec, read_image(path), settings["model_lambda"], args.steps, settings),
                }
            )
            print(name, json.dumps(rows[-1]), flush=True)
            atomic_write(args.output, json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
