"""Where SGA hands the latent to the relaxed trellis (issue 24, eighteenth session).

SGA-N through the trellis (``qft.codec.refine``) runs SGA for the first ``(1 − share)·N``
steps and the relaxed trellis for the rest. Measured here per image: the SGA head as a
schedule of its own (``--cold``: annealed to its end temperature within the head, the codec
before 2026-12-02) or as the head of one schedule over all N steps (the codec since: the
latent is handed over before it has hardened onto the step-1 grid), then the codec's
trellis steps (:func:`qft.codec.refine.refine_through_trellis`), at each ``--shares`` and
``--plain-rows``. Scored by the model's RD cost ``λ·255²·MSE + bpp`` at the hard
quantization (USQ rounding or the Viterbi path; table bits plus the hyper-latent's
estimated bits, no bitstream: within a few bytes of one), with the SGA head rounded (USQ)
and coded by the trellis as it is ("then TCQ-8") for reference, and SGA-N + USQ. BSDS500
validation images (full size), one thread. Writes ``benchmarks/results/sga_handoff.json``
after every configuration.

    python benchmarks/archive/sga_handoff.py --model mbt2018-mean-0.0035 --images 1 --steps 1000 \
        --shares 0.25 0.5 0.75 --plain-rows 14 20 26
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from pathlib import Path

import numpy as np
import torch

from trellis.hardware import machine_info

from qft.codec import Codec, SGARefine, crop, list_images, pad, read_image
from qft.codec.refine import refine_through_trellis
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

OUT = Path(__file__).parents[1] / "results" / "sga_handoff.json"
DATA = Path(__file__).parents[2].parent / "shared" / "data" / "bsds500" / "val"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mbt2018-mean-0.0035")
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.5])
    ap.add_argument("--plain-rows", type=int, nargs="+", default=None, help="default: the calibrated")
    ap.add_argument("--cold", action="store_true", help="the SGA head as a schedule of its own")
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    set_threads(1)
    ck = load_checkpoint(args.model)
    settings = read_settings(ck)
    lmbda = settings["model_lambda"]
    coder = Codec.from_checkpoint(ck).latent_coder
    usq = resolve_quantizer("usq", settings, target=0.0).quantizer
    tcqs = {
        p: resolve_quantizer("tcq8", settings, target=0.0, plain_rows=p).quantizer for p in args.plain_rows or [None]
    }
    refine = SGARefine(lmbda, args.steps)
    record = {
        "model": args.model,
        "model_lambda": lmbda,
        "steps": args.steps,
        "handoff": "cold" if args.cold else "warm",
        "score": "lambda*255^2*MSE + (table bits + estimated z bits)/pixels, hard quantization",
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "per_image": {},
    }
    for path in list_images(args.data)[: args.images]:
        x, padding = pad(read_image(path))
        x_ref = crop(x, padding)
        pixels = x_ref.shape[-2] * x_ref.shape[-1]

        def cost(y, q, lat, mu, sigma):
            res = q.quantize(y, mu, sigma)
            with torch.no_grad():
                x_hat = crop(coder.model.g_s(torch.from_numpy(np.asarray(res.y_hat, np.float32))[None]), padding)
            mse = float((x_hat.clamp(0, 1) - x_ref).pow(2).mean())
            bpp = (res.bits + lat.z_bits_estimated) / pixels
            return {"J": lmbda * 255**2 * mse + bpp, "bpp": bpp, "psnr": -10 * np.log10(mse)}

        (full,) = coder.latents(x, False, padding, refine)
        rows = {f"sga{args.steps}+usq": cost(full.y, usq, full, *coder.first_parameters(full))}
        record["per_image"][path.name] = rows
        for share in args.shares:
            head = args.steps - round(args.steps * share)
            if args.cold:
                (lat,) = coder.latents(x, False, padding, dataclasses.replace(refine, steps=head))
            else:
                (lat,) = coder.latents(x, False, padding, refine, stop=head)
            mu, sigma = coder.first_parameters(lat)
            rows[f"share {share:g}: sga head + usq"] = cost(lat.y, usq, lat, mu, sigma)
            for tcq in tcqs.values():
                name = f"share {share:g}, plain {tcq.plain_rows}"
                rows[f"{name}: sga head then tcq8"] = cost(lat.y, tcq, lat, mu, sigma)
                y = refine_through_trellis(
                    coder.model, x, lat.y, mu, sigma, tcq, None, refine, args.steps - head, padding
                )
                rows[f"{name}: through the trellis"] = cost(y, tcq, lat, mu, sigma)
                print(path.name, name, rows[f"{name}: through the trellis"], flush=True)
                for r in rows.values():
                    r["dJ_vs_sga_usq_pct"] = 100 * (r["J"] / rows[f"sga{args.steps}+usq"]["J"] - 1)
                record["load_after"] = os.getloadavg()
                atomic_write(args.output, json.dumps(record, indent=1).encode())


if __name__ == "__main__":
    main()
