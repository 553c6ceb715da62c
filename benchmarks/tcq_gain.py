"""TCQ-8's own gain: what the trellis adds beyond what the decoder target gives USQ (issue 24).

A dev benchmark on BSDS500 *validation* images (never Kodak or Tecnick; top-left crops
with sides multiples of 64, so nothing is padded). Per checkpoint every image is analysed
once, with the decoder target's step (:func:`qft.codec.latent.target_direction`), and
re-quantized per configuration by :meth:`qft.codec.LatentCoder.requantize`. Rate: exact
table bits of y plus the likelihood bits of ẑ (real streams are within 0.2 %); quality:
PSNR of ``g_s(ŷ)`` rounded to 8 bits, averaged over images. ``η`` is chosen per image
among :data:`~qft.codec.latent.RD_ETAS` by the model's RD cost, as ``--target rd`` does.

Measures (rate change in % at equal PSNR, :func:`qft.eval.bdrate.local_rate_change`):

* ``vs_usq``: against plain USQ swept over its step;
* ``vs_usq_rd``: against USQ *with the same target* swept over its step — what the
  trellis buys beyond what the target gives USQ (the issue's measure);
* for the relinearised target (``rounds``), against USQ's sweep relinearised the same way.

Directions: (a) the TCQ-8 grid Δ × λ multiplier × weights *with* the target on (the joint
calibration; today's picks were made without it); (b) the target relinearised: after each
quantization the step is recomputed around the decoded latent ``ŷ`` (``s(ŷ)``, the
residual and the Jacobian of ``g_s`` at ``ŷ``), the quantizer re-run towards ``y + η·s(ŷ)``
(``--relin y``) or ``y + η·Σ_k s(ŷ_k)`` (``--relin sum``), at the η the first round chose;
per image the round of least RD cost is kept. Encode seconds per image (one thread):
analysis, target step, each configuration's quantizations and ``g_s`` decodes, each
relinearisation round.

    NUMBA_NUM_THREADS=1 python benchmarks/tcq_gain.py --json benchmarks/results/tcq_gain.json
    python benchmarks/tcq_gain.py -m mbt2018-mean-0.013 --images 2 --steps 0.7 --mults 0.025
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

from pathlib import Path

import numpy as np
import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import LatentCoder, list_images, read_image
from qft.codec.latent import RD_ETAS, target_direction
from qft.eval.bdrate import local_rate_change
from qft.files import atomic_write
from qft.models import ARCHITECTURES, load_checkpoint
from qft.models.zoo import base_entries
from qft.settings import default_lambda, read_settings, resolve_quantizer

BSDS500_VAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "bsds500" / "val"
USQ_STEPS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
STEPS = (0.63, 0.7, 0.8, 1.0)
MULTS = (0.0125, 0.05, 0.1, 0.2, 0.4)


def finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


class Bench:
    """One checkpoint's analysed images and the measurements on them."""

    def __init__(self, spec: str, images: list[torch.Tensor]):
        self.ck = load_checkpoint(spec)
        self.settings = read_settings(self.ck)
        self.lmbda = float(self.settings["model_lambda"])
        self.coder = LatentCoder(self.ck.model.eval(), ARCHITECTURES[self.ck.arch].entropy)
        self.g_s = self.ck.model.g_s
        self.images = images
        t0 = time.perf_counter()
        self.lats = [self.coder.latents(x, direction=False)[0] for x in images]
        self.analyse_s = (time.perf_counter() - t0) / len(images)
        t0 = time.perf_counter()
        self.lats = [
            dataclasses.replace(lat, direction=self.direction(x, lat.y), image=x)
            for x, lat in zip(images, self.lats, strict=True)
        ]
        self.target_s = (time.perf_counter() - t0) / len(images)

    def direction(self, x: torch.Tensor, y: np.ndarray) -> np.ndarray:
        return target_direction(self.g_s, x, torch.from_numpy(y)[None])[0]

    @torch.no_grad()
    def measure(self, i: int, q: Quantizer, w, eta: float, direction=None) -> dict:
        """bpp, MSE, RD cost and seconds of image ``i`` quantized towards ``y + η·direction``."""
        lat, x = self.lats[i], self.images[i]
        if direction is not None:
            lat = dataclasses.replace(lat, direction=direction)
        t0 = time.perf_counter()
        r = self.coder.requantize(lat, q, w, eta)
        x_hat = self.g_s(torch.from_numpy(r.y_hat)[None]).clamp(0, 1)
        seconds = time.perf_counter() - t0
        mse = torch.mean((x_hat.mul(255).round().div(255) - x) ** 2).item()
        pixels = x.shape[-2] * x.shape[-1]
        bpp = (r.result.bits + lat.z_bits_estimated) / pixels
        cost = self.lmbda * 255**2 * torch.mean((x_hat - x) ** 2).item() + r.result.bits / pixels
        return {"bpp": bpp, "mse": mse, "cost": cost, "s": seconds, "eta": eta, "y_hat": r.y_hat}

    def rd(self, q: Quantizer, w, rounds: int = 1, relin: str = "y") -> list[list[dict]]:
        """Per image, the RD choice of η (round 0) and ``rounds − 1`` relinearised rounds at
        that η; each entry is the best-so-far (least RD cost) with the cumulative seconds."""
        out = []
        for i, x in enumerate(self.images):
            cands = [self.measure(i, q, w, eta) for eta in RD_ETAS]
            best = min(cands, key=lambda c: c["cost"])
            best = best | {
                "s": sum(c["s"] for c in cands),
                "cands": [{k: c[k] for k in ("eta", "bpp", "mse", "cost", "s")} for c in cands],
            }
            per_round = [best]
            last, total = best, self.lats[i].direction
            for _ in range(1, rounds):
                if best["eta"] == 0:
                    per_round.append(per_round[-1])
                    continue
                t0 = time.perf_counter()
                s = self.direction(x, last["y_hat"])
                step_s = time.perf_counter() - t0
                if relin == "y":
                    total = s
                elif relin == "sum":
                    total = total + s
                else:  # "yhat": a Gauss–Newton step from the decoded latent
                    total = (last["y_hat"] - self.lats[i].y) / best["eta"] + s
                last = self.measure(i, q, w, best["eta"], total)
                seconds = per_round[-1]["s"] + step_s + last["s"]
                keep = min(per_round[-1], last, key=lambda c: c["cost"])
                per_round.append(keep | {"s": seconds, "raw": {k: last[k] for k in ("bpp", "mse", "cost")}})
            out.append(per_round)
        return out

    def plain(self, q: Quantizer) -> list[dict]:
        return [self.measure(i, q, None, 0.0) for i in range(len(self.images))]


def point(rows: list[dict]) -> tuple[float, float]:
    """The image-mean RD point (bpp, PSNR)."""
    return float(np.mean([r["bpp"] for r in rows])), float(np.mean([-10 * math.log10(r["mse"]) for r in rows]))


def summary(rows: list[dict]) -> dict:
    bpp, psnr = point(rows)
    return {
        "bpp": round(bpp, 5),
        "psnr": round(psnr, 4),
        "seconds": round(float(np.mean([r["s"] for r in rows])), 4),
        "etas": [r["eta"] for r in rows],
    }


def per_image_mult_choice(grid: list[dict], ref: list[tuple[float, float]]) -> list[dict]:
    """Per weight choice and Δ, λ_T chosen per image too: among every multiplier's and η's
    candidates the one of least RD cost (what an encoder could choose per image, as it
    chooses η); its rate change against USQ + target. Drops the grid's per-image data."""
    out = []
    for weights in sorted({g["weights"] for g in grid}):
        for step in sorted({g["step"] for g in grid}):
            row = [g for g in grid if (g["weights"], g["step"]) == (weights, step)]
            n = len(row[0]["per_image"])
            chosen = [min((c for g in row for c in g["per_image"][i]), key=lambda c: c["cost"]) for i in range(n)]
            pt = point(chosen)
            out.append({"weights": weights, "step": step, "bpp": round(pt[0], 5), "psnr": round(pt[1], 4)})
            out[-1]["vs_usq_rd"] = finite(local_rate_change(ref, pt))
    for g in grid:
        del g["per_image"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--checkpoint", nargs="+", help="checkpoints (default: the shipped base models)")
    p.add_argument("--data", default=str(BSDS500_VAL))
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--steps", type=float, nargs="+", default=STEPS, help="TCQ-8 union steps of the joint grid")
    p.add_argument("--mults", type=float, nargs="+", default=MULTS, help="λ multipliers of the joint grid")
    p.add_argument("--rounds", type=int, default=3, help="quantizations of the relinearised target (1: none)")
    p.add_argument("--relin", choices=("y", "sum", "yhat"), default="y")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(1)
    images = []
    for f in list_images(args.data)[: args.images]:
        x = read_image(f)
        images.append(x[..., : x.shape[-2] // 64 * 64, : x.shape[-1] // 64 * 64])
    specs = args.checkpoint or [Path(e["file"]).stem for e in base_entries()]
    result = {
        "benchmark": "tcq_gain",
        "data": str(args.data),
        "images": [f.name for f in list_images(args.data)[: args.images]],
        "crop": "top-left, sides multiples of 64",
        "etas": list(RD_ETAS),
        "rounds": args.rounds,
        "relin": args.relin,
        "threads": 1,
        "load_before": os.getloadavg(),
        "models": {},
    }
    for spec in specs:
        t_model = time.perf_counter()
        b = Bench(spec, images)
        torch.set_num_threads(1)  # Numba's first parallel kernel may reset it
        usq = [point(b.plain(Quantizer("usq", step=s))) for s in USQ_STEPS]
        usq_rd = [b.rd(Quantizer("usq", step=s), None, args.rounds, args.relin) for s in USQ_STEPS]
        ref = {k: [point([img[k] for img in rows]) for rows in usq_rd] for k in range(args.rounds)}

        def score(rows: list[dict], k: int = 0, usq=usq, ref=ref) -> dict:
            pt = point(rows)
            return summary(rows) | {
                "vs_usq": finite(local_rate_change(usq, pt)),
                "vs_usq_rd": finite(local_rate_change(ref[0], pt)),
                "vs_usq_rd_same_rounds": finite(local_rate_change(ref[k], pt)),
            }

        cal = resolve_quantizer("tcq8", b.settings)
        w_dec = resolve_quantizer("tcq8", b.settings, weights="decoder").weights
        grid = []
        for weights in ("none", "decoder"):
            w = None if weights == "none" else w_dec
            for d in args.steps:
                for m in args.mults:
                    q = Quantizer("tcq8", step=d, lam=default_lambda("tcq8", d, m))
                    rows = [r[0] for r in b.rd(q, w)]
                    grid.append(
                        {"step": d, "lambda_mult": m, "weights": weights}
                        | score(rows)
                        | {"per_image": [r["cands"] for r in rows]}
                    )
        scored = [g for g in grid if g["vs_usq_rd"] is not None]
        best = min(scored, key=lambda g: g["vs_usq_rd"]) if scored else None
        relin = {}
        picks = {"calibrated": (cal.quantizer, cal.weights)}
        if best is not None:
            picks["joint_best"] = (
                Quantizer("tcq8", step=best["step"], lam=default_lambda("tcq8", best["step"], best["lambda_mult"])),
                None if best["weights"] == "none" else w_dec,
            )
        for name, (q, w) in picks.items():
            rows = b.rd(q, w, args.rounds, args.relin)
            relin[name] = {f"round{k}": score([img[k] for img in rows], k) for k in range(args.rounds)}
        result["models"][spec] = {
            "model_lambda": b.lmbda,
            "calibrated_tcq8": cal.describe(),
            "seconds_per_image": {"analyse": round(b.analyse_s, 4), "target_step": round(b.target_s, 4)},
            "usq_sweep": usq,
            "usq_rd_sweep": {f"round{k}": ref[k] for k in range(args.rounds)},
            "usq_rd_step1": {
                f"round{k}": score([img[k] for img in usq_rd[USQ_STEPS.index(1.0)]], k) for k in range(args.rounds)
            },
            "per_image_mult_choice": per_image_mult_choice(grid, ref[0]),
            "grid": grid,
            "joint_best": best,
            "relinearised": relin,
            "model_seconds": round(time.perf_counter() - t_model, 1),
        }
        cal_r = relin["calibrated"]
        print(
            f"{spec}: calibrated TCQ-8 {cal_r['round0']['vs_usq_rd']} vs USQ+rd "
            f"(relinearised: {[cal_r[k]['vs_usq_rd_same_rounds'] for k in cal_r]}); joint best "
            f"{best and (best['step'], best['lambda_mult'], best['weights'], best['vs_usq_rd'])}; "
            f"{time.perf_counter() - t_model:.0f} s",
            flush=True,
        )
        result["load_after"] = os.getloadavg()
        result["machine"] = machine_info()
        result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        if args.json:
            atomic_write(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
