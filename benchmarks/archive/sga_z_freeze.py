"""How much SGA gains from refining ``z`` in its second half (issue 24's "z fixed" reading).

SGA through the trellis (``qft.codec.refine``) keeps ``z`` — hence ``μ, σ`` — fixed during
its trellis steps. Whether that is what costs it at 1,000 steps is measured here on plain
SGA with USQ: SGA-N as the codec runs it (``y`` and ``z`` refined at every step) against
the same N steps with ``z`` frozen from step ``--freeze`` on (Adam restarted on ``y``
alone). Scored by the model's RD cost ``λ·255²·MSE + bpp`` at hard rounding with the
model's own likelihoods (no bitstream: the two differ by the coder's few bytes in both
arms). BSDS500 validation images (full size, centred padding), one thread. Writes
``benchmarks/results/sga_z_freeze.json``.

    python benchmarks/archive/sga_z_freeze.py --models mbt2018-mean-0.0035 --images 1 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pathlib import Path

import torch

from trellis import SCALE_TABLE
from trellis.hardware import machine_info

from qft.codec import Codec, crop, list_images, pad, read_image
from qft.codec.refine import SGA_LR, SGA_TAU_END, SGA_TAU_START, sga_round
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings
from qft.threads import set_threads

OUT = Path(__file__).parents[1] / "results" / "sga_z_freeze.json"
DATA = Path(__file__).parents[2].parent / "shared" / "data" / "bsds500" / "val"


def rd_cost(model, x, padding, y, z, lmbda):
    """``λ·255²·MSE + bpp`` of ``(y, z)`` rounded as the codec does, by the model's likelihoods."""
    eb = model.entropy_bottleneck
    medians = eb.quantiles[:, :, 1:2].reshape(1, -1, 1, 1)
    x_ref = crop(x, padding)
    pixels = x_ref.shape[-2] * x_ref.shape[-1]
    with torch.no_grad():
        z_hat = medians + torch.round(z - medians)
        z_lik = eb._likelihood(z_hat.transpose(0, 1).reshape(z_hat.shape[1], 1, -1))[0]
        sigma, mu = model.h_s(z_hat).chunk(2, 1)
        y_hat = mu + torch.round(y - mu)
        y_lik = model.gaussian_conditional._likelihood(y_hat - mu, sigma.clamp_min(float(SCALE_TABLE[0])))
        bits = -(torch.log2(y_lik.clamp_min(1e-9)).sum() + torch.log2(z_lik.clamp_min(1e-9)).sum()).item()
        mse = (crop(model.g_s(y_hat).clamp(0, 1), padding) - x_ref).pow(2).mean().item()
    return {"rd_cost": lmbda * 255**2 * mse + bits / pixels, "bpp": bits / pixels, "mse": mse}


def sga(model, x, padding, lmbda, steps, freeze, seed=0):
    """SGA-``steps`` (the codec's loop, mean-scale hyperprior) with ``z`` frozen from step ``freeze``."""
    eb = model.entropy_bottleneck
    medians = eb.quantiles[:, :, 1:2].detach().reshape(1, -1, 1, 1)
    x_ref = crop(x, padding)
    pixels = x_ref.shape[-2] * x_ref.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y0 = model.g_a(x)
        z0 = model.h_a(y0)
    y = y0.clone().requires_grad_(True)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([y, z], lr=SGA_LR)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        for t in range(steps):
            if t == freeze:
                z.requires_grad_(False)
                opt = torch.optim.Adam([y], lr=SGA_LR)
            tau = SGA_TAU_START * (SGA_TAU_END / SGA_TAU_START) ** (t / max(steps - 1, 1))
            z_t = medians + sga_round(z - medians, tau, gen)
            z_lik = eb._likelihood(z_t.transpose(0, 1).reshape(z_t.shape[1], 1, -1))[0]
            sigma, mu = model.h_s(z_t).chunk(2, 1)
            r_t = sga_round(y - mu, tau, gen)
            y_lik = model.gaussian_conditional._likelihood(r_t, sigma.clamp_min(float(SCALE_TABLE[0])))
            bits = -(torch.log2(y_lik.clamp_min(1e-9)).sum() + torch.log2(z_lik.clamp_min(1e-9)).sum())
            mse = (crop(model.g_s(mu + r_t), padding) - x_ref).pow(2).mean()
            loss = lmbda * 255**2 * mse + bits / pixels
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return y.detach(), z.detach()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["mbt2018-mean-0.0035"])
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--freeze", type=int, nargs="+", default=None, help="steps z freezes at (default: N/2)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    set_threads(1)
    freezes = [args.steps] + (args.freeze or [args.steps // 2])
    record = {"steps": args.steps, "freeze": freezes, "threads": 1, "machine": machine_info(), "per_model": {}}
    for name in args.models:
        ck = load_checkpoint(name)
        lmbda = read_settings(ck)["model_lambda"]
        model = Codec.from_checkpoint(ck).model
        rows = record["per_model"].setdefault(name, {})
        for path in list_images(args.data)[: args.images]:
            x, padding = pad(read_image(path))
            row = rows.setdefault(path.name, {})
            for f in freezes:
                t0 = time.process_time()
                y, z = sga(model, x, padding, lmbda, args.steps, f)
                row[f"z frozen from {f}"] = rd_cost(model, x, padding, y, z, lmbda) | {
                    "cpu_s": time.process_time() - t0
                }
                print(name, path.name, f, row[f"z frozen from {f}"], flush=True)
            record["load_after"] = os.getloadavg()
            atomic_write(args.output, json.dumps(record, indent=1).encode())


if __name__ == "__main__":
    main()
