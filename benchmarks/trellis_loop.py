"""The trellis in the loop: gradient refinement of ``y`` through the real quantizer (issue 24).

A probe of the issue's direction "a cost on the image-domain error of the chosen path":
per image, Adam steps on ``y`` (``z`` fixed, ``μ, σ`` from its ``ẑ``) minimise the
model's RD loss of the latent the *actual* quantizer makes of ``y``::

    ŷ = Q(y)                                  the trellis (or USQ), re-run every step
    loss = λ·255²·MSE(x, g_s(y + sg(ŷ − y))) + bits(y) / pixels

``sg`` stops the gradient (straight-through: the image error of the chosen path, its
gradient taken as if ``ŷ`` moved with ``y``); ``bits(y)`` is the model's noise-proxy rate
of ``y`` (the ``N(μ, σ²)`` mass of ``[y − ½, y + ½]``), whose gradient pulls ``y`` towards
``μ`` while the quantizer's own rate term decides the indices. Starting points: ``g_a``'s
``y``, the decoder-target latent ``y + η·s``, or an SGA-refined ``y`` (then ``z`` is
SGA's too). The result is coded by the codec as any refined latent: real streams, decoded
and checked.

Compared per image, on the model's RD cost ``J = λ·255²·MSE + bpp`` (real bytes) against
plain USQ: USQ / TCQ-8 with the decoder target ``rd`` (the cheap help), the loop with
TCQ-8 and with USQ (the same help for both), SGA with USQ. BSDS500 *validation* images
(the loop was probed there; nothing is tuned on Kodak), the shipped
``mbt2018-mean-0.013``, one thread. Writes ``benchmarks/results/trellis_loop.json``
with the machine's load (seconds taken on a shared machine are upper bounds).

    python benchmarks/trellis_loop.py --images 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from pathlib import Path

import numpy as np
import torch

from _rdcost import means, score, versus_usq  # sibling helper (the script's folder is on sys.path)

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, RDTarget, SGARefine, list_images, read_image
from qft.codec.image import pad
from qft.codec.latent import target_direction
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

OUT = Path(__file__).parent / "results" / "trellis_loop.json"
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "bsds500" / "val"


def loop_refine(codec: Codec, x, padding, lat, quantizer: Quantizer, steps: int, lr: float, lmbda: float, y0):
    """``y`` after ``steps`` Adam steps of the loop (module docstring), from ``y0``
    ``(C, h, w)`` (numpy), for the analysed latent ``lat`` (its ``ẑ`` gives ``μ, σ``)."""
    model, coder = codec.model, codec.latent_coder
    mu, sigma = coder.first_parameters(lat)
    mu_t, sigma_t = torch.from_numpy(mu)[None], torch.from_numpy(sigma)[None]
    left, right, top, bottom = padding
    rows, cols = slice(top, x.shape[-2] - bottom), slice(left, x.shape[-1] - right)
    pixels = (x.shape[-2] - top - bottom) * (x.shape[-1] - left - right)
    y = torch.from_numpy(np.array(y0, np.float32))[None].requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    gc = model.gaussian_conditional
    for _ in range(steps):
        y_hat = quantizer.quantize(y.detach()[0].numpy(), mu, sigma).y_hat
        set_threads(1, numba=False)  # Numba's first parallel kernel resets torch's count
        with torch.enable_grad():
            x_t = model.g_s(y + (torch.from_numpy(np.asarray(y_hat, np.float32))[None] - y).detach())
            mse = (x_t[..., rows, cols] - x[..., rows, cols]).pow(2).mean()
            bits = -torch.log2(gc._likelihood(y - mu_t, sigma_t).clamp_min(1e-9)).sum()
            loss = lmbda * 255**2 * mse + bits / pixels
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return y.detach()[0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mbt2018-mean-0.013")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(args.model)
    settings = read_settings(ck)
    lmbda = settings["model_lambda"]
    codec = Codec.from_checkpoint(ck)
    model = codec.model.eval().requires_grad_(False)
    usq = resolve_quantizer("usq", settings, target=0.0).quantizer
    tcq = resolve_quantizer("tcq8", settings, target=0.0).quantizer
    # name: (quantizer, target, SGA steps, loop quantizer, loop steps, start η)
    configs = {
        "usq": (usq, 0.0, 0, None, 0, 0.0),
        "usq+target_rd": (usq, RDTarget(lmbda), 0, None, 0, 0.0),
        "tcq8+target_rd": (tcq, RDTarget(lmbda), 0, None, 0, 0.0),
        "usq-loop50": (usq, 0.0, 0, usq, 50, 0.0),
        "usq-loop150": (usq, 0.0, 0, usq, 150, 0.0),
        "tcq8-loop50": (tcq, 0.0, 0, tcq, 50, 0.0),
        "tcq8-loop150": (tcq, 0.0, 0, tcq, 150, 0.0),
        "tcq8-loop300": (tcq, 0.0, 0, tcq, 300, 0.0),
        "target0.25+tcq8-loop150": (tcq, 0.0, 0, tcq, 150, 0.25),
        "sga100+usq": (usq, 0.0, 100, None, 0, 0.0),
        "sga200+usq": (usq, 0.0, 200, None, 0, 0.0),
        "sga200+tcq8": (tcq, 0.0, 200, None, 0, 0.0),
        "sga100+tcq8-loop100": (tcq, 0.0, 100, tcq, 100, 0.0),
    }
    images = list_images(args.data)[: args.images]
    record = {
        "model": args.model,
        "model_lambda": lmbda,
        "data": str(args.data),
        "images": [p.name for p in images],
        "lr": args.lr,
        "threads": 1,
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "per_image": {},
    }
    for path in images:
        x = read_image(path)
        xp, padding = pad(x)
        h, w = x.shape[-2:]
        rows = {}
        for name, (q, target, sga, loop_q, loop_steps, eta) in configs.items():
            t0 = time.process_time()
            if loop_q is None:
                enc = codec.compress(x, q, None, target, SGARefine(lmbda, sga) if sga else None)
            else:
                refine = SGARefine(lmbda, sga) if sga else None
                (lat,) = codec.latent_coder.latents(xp, False, padding, refine)
                y0 = lat.y
                if eta:
                    y0 = y0 + eta * target_direction(model.g_s, xp, torch.from_numpy(lat.y)[None], padding)[0]
                y = loop_refine(codec, xp, padding, lat, loop_q, loop_steps, args.lr, lmbda, y0)
                enc = codec.encode_latent(codec.latent_coder.requantize(dataclasses.replace(lat, y=y), q), q, h, w)
            seconds = time.process_time() - t0
            rows[name] = score(codec, x, enc["bitstream"], lmbda, seconds)
            print(path.name, name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
        versus_usq(rows)
        record["per_image"][path.name] = rows
    record |= means(record["per_image"], configs)
    record["load_after"] = os.getloadavg()
    atomic_write(args.output, json.dumps(record, indent=1).encode())
    print(
        json.dumps({"mean_dJ_vs_usq_pct": record["mean_dJ_vs_usq_pct"], "mean_cpu_s": record["mean_cpu_s"]}, indent=1)
    )


if __name__ == "__main__":
    main()
