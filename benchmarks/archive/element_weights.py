"""Per-element distortion weights for TCQ-8 (issue 9): do spatially varying weights win?

On held-out images (8 BSDS500 validation images, as ``qft calibrate``) and the given
shipped checkpoints, TCQ-8 at each checkpoint's calibrated Δ and λ multiplier with:

* ``none``: no weights; ``channel``: the calibrated per-channel decoder weights;
* ``element``: per-element weights from the image's own Jacobian, ``w_i ∝ mean_k (Jᵀu_k)_i²``
  over K = 8 Gaussian pixel probes at the USQ latent (an encoder-side cost of 8 backward
  passes of ``g_s`` per image), rate-weighted mean 1 per channel-set as the channel weights;
* ``channel×space``: the per-channel weight times a spatial factor, the per-position
  sensitivity summed over channels (mean 1): where in the image the decoder amplifies errors.

Score: rate change at equal PSNR against the USQ step sweep of the same checkpoint (real
bitstreams, as calibrate). Writes ``benchmarks/results/element_weights.json``.

    python benchmarks/archive/element_weights.py --checkpoints mbt2018-mean-0.013 mbt2018-mean-0.025
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from pathlib import Path

import numpy as np
import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, crop, list_images, pad, read_image
from qft.eval.bdrate import local_rate_change
from qft.eval.calibrate import USQ_SCALES
from qft.eval.metrics import psnr
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

ROOT = Path(__file__).resolve().parents[2]


def element_sensitivity(g_s, y_hat: torch.Tensor, probes: int, seed: int) -> np.ndarray:
    """``mean_k (Jᵀu_k)²`` per latent element ``(M, h, w)`` at ``y_hat`` ``(1, M, h, w)``."""
    gen = torch.Generator().manual_seed(seed)
    y = y_hat.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        x_hat = g_s(y)
        acc = torch.zeros_like(y, dtype=torch.float64)
        for k in range(probes):
            u = torch.randn(x_hat.shape, generator=gen)
            (g,) = torch.autograd.grad(x_hat, y, u, retain_graph=k < probes - 1)
            acc += g.double() ** 2
    return (acc / probes)[0].numpy()


def normalise(w: np.ndarray, rates: np.ndarray) -> np.ndarray:
    w = np.maximum(w, 1e-3 * w.mean())
    return w / (np.sum(w * rates) / rates.sum())


@torch.no_grad()
def run(ckpt: str, images: list[Path], probes: int) -> dict:
    ck = load_checkpoint(ckpt)
    settings = read_settings(ck)
    codec = Codec.from_checkpoint(ck)
    coder = codec.latent_coder
    base = resolve_quantizer("tcq8", settings, weights="none")
    weighted = resolve_quantizer("tcq8", settings, weights="decoder")
    usqs = {s: Quantizer("usq", step=s) for s in USQ_SCALES}
    acc: dict[str, list] = {}
    for n, path in enumerate(images):
        x = read_image(path)
        h, w = x.shape[-2:]
        xp, padding = pad(x)
        (lat0,) = coder.quantize(xp, Quantizer("usq"))
        e = element_sensitivity(ck.model.g_s, torch.from_numpy(lat0.y_hat)[None], probes, seed=n)
        rates = Quantizer("usq").table.index_bits(lat0.result.rows, lat0.result.indices) + 1e-6
        space = e.sum(0, keepdims=True)
        space = space / space.mean()
        wc = weighted.weights[:, None, None]
        configs = {f"usq-{s}": (q, None) for s, q in usqs.items()}
        configs |= {
            "none": (base.quantizer, None),
            "channel": (weighted.quantizer, np.broadcast_to(wc, e.shape)),
            "element": (weighted.quantizer, normalise(e, rates)),
            "channel×space": (weighted.quantizer, normalise(wc * space, rates)),
        }
        for name, (q, wts) in configs.items():
            res = q.quantize(lat0.y, lat0.mu, lat0.sigma, weights=wts)
            lat = dataclasses.replace(lat0, result=res)
            bits = len(codec.encode_latent(lat, q, h, w)["bitstream"]) * 8
            x_hat = crop(ck.model.g_s(torch.from_numpy(lat.y_hat)[None]).clamp(0, 1), padding)
            acc.setdefault(name, []).append((bits / (h * w), psnr(x, x_hat)))
    points = {k: tuple(np.mean(v, axis=0)) for k, v in acc.items()}
    usq = [points[f"usq-{s}"] for s in USQ_SCALES]
    saving = {k: local_rate_change(usq, p) for k, p in points.items() if not k.startswith("usq")}
    return {
        "checkpoint": ckpt,
        "tcq8": {"unweighted": base.describe(), "weighted": weighted.describe()},
        "points": points,
        "saving": saving,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", default=["mbt2018-mean-0.013", "mbt2018-mean-0.025"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/bsds500/val"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/element_weights.json"))
    args = parser.parse_args()
    set_threads(args.threads)
    images = list_images(args.data)[: args.images]
    t0 = time.time()
    results = [run(c, images, args.probes) for c in args.checkpoints]
    out = {
        "machine": machine_info(),
        "data": args.data,
        "images": [p.name for p in images],
        "probes": args.probes,
        "wall_s": time.time() - t0,
        "results": results,
    }
    Path(args.json).write_text(json.dumps(out, indent=1))
    for r in results:
        print(r["checkpoint"], {k: round(v, 2) for k, v in r["saving"].items()})


if __name__ == "__main__":
    main()
