"""Synthetic rate-distortion benchmark of USQ, RDOQ, TCQ-4 and TCQ-8.

i.i.d. Gaussian and Laplacian sources of standard deviation σ are quantized with the
Gaussian table model of scale σ (matched for the Gaussian, mismatched for the Laplacian);
the rate is the exact table rate of the indices (what the coder spends), the distortion
the mean squared error. Each method sweeps its step (and λ for RDOQ/TCQ); its operational
RD curve is the lower convex hull of all points. The gain of a method at a rate is the
SNR difference to USQ's hull there.

    python benchmarks/trellis_rd.py [--json benchmarks/results/trellis_rd.json]
                                    [--plot docs/figures/trellis_rd.png]
"""

from __future__ import annotations

import argparse
import json
import time

from pathlib import Path

import numpy as np

from trellis import SCALE_TABLE, Quantizer
from trellis.hardware import machine_info

SIGMA = float(SCALE_TABLE[40])  # ≈ 2.0, a table scale: the Gaussian model is exact
SHAPE = (16, 64, 64)
STEP_FACTORS = np.geomspace(0.12, 8.0, 44)  # step / σ (USQ, RDOQ) or union step / σ · 2 (TCQ)
LAMBDA_FACTORS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)  # λ / (quantizer step)²
RATES = (1.0, 2.0, 3.0)
METHODS = ("usq", "rdoq", "tcq4", "tcq8")


def source(kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return (SIGMA * rng.standard_normal(SHAPE)).astype(np.float32)
    return (SIGMA / np.sqrt(2) * rng.laplace(size=SHAPE)).astype(np.float32)


def lower_hull(rate: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Indices of the lower convex hull of (rate, distortion) points, by rising rate."""
    order = np.lexsort((dist, rate))
    hull: list[int] = []
    for i in order:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (rate[b] - rate[a]) * (dist[i] - dist[a]) - (dist[b] - dist[a]) * (rate[i] - rate[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    # keep the decreasing part (more rate must buy less distortion)
    out = [hull[0]]
    for i in hull[1:]:
        if dist[i] < dist[out[-1]]:
            out.append(i)
    return np.array(out)


def sweep(kind: str, method: str) -> dict:
    y = source(kind)
    sigma = np.full(SHAPE, SIGMA, np.float32)
    points = []
    for f in STEP_FACTORS:
        if method.startswith("tcq"):
            step, qstep = f * SIGMA / 2, f * SIGMA  # union step, per-quantizer step 2Δ
        else:
            step = qstep = f * SIGMA
        for c in (0.0,) if method == "usq" else LAMBDA_FACTORS:
            out = Quantizer(method, step=step, lam=c * qstep**2).quantize(y, sigma=sigma)
            mse = float(np.mean((out.y_hat.astype(np.float64) - y) ** 2))
            points.append((out.bits / y.size, mse, step, c))
    p = np.array(points)
    hull = lower_hull(p[:, 0], p[:, 1])
    return {
        "rate": p[hull, 0].tolist(),
        "snr_db": (10 * np.log10(SIGMA**2 / p[hull, 1])).tolist(),
        "step": p[hull, 2].tolist(),
        "lambda_factor": p[hull, 3].tolist(),
    }


def snr_at(curve: dict, rate: float) -> float:
    return float(np.interp(rate, curve["rate"], curve["snr_db"], left=np.nan, right=np.nan))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="benchmarks/results/trellis_rd.json")
    parser.add_argument("--plot", default="docs/figures/trellis_rd.png")
    args = parser.parse_args(argv)
    t0 = time.time()
    result = {"machine": machine_info(), "sigma": SIGMA, "shape": list(SHAPE), "sources": {}, "gain_db": {}}
    for kind in ("gaussian", "laplacian"):
        curves = {m: sweep(kind, m) for m in METHODS}
        result["sources"][kind] = curves
        result["gain_db"][kind] = {
            m: {f"{r:g}": snr_at(curves[m], r) - snr_at(curves["usq"], r) for r in RATES} for m in METHODS[1:]
        }
    result["wall_s"] = time.time() - t0
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    for kind, gains in result["gain_db"].items():
        for m, g in gains.items():
            gain = " / ".join(f"{v:+.2f} dB" for v in g.values())
            print(f"{kind:9s} {m:5s} SNR gain over USQ at 1/2/3 bits: {gain}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (kind, curves) in zip(axes, result["sources"].items(), strict=True):
        for m in METHODS:
            ax.plot(curves[m]["rate"], curves[m]["snr_db"], marker=".", label=m.upper())
        ax.set(
            title=f"i.i.d. {kind} source, Gaussian table model", xlabel="table rate [bits/latent]", ylabel="SNR [dB]"
        )
        ax.set_xlim(0, 4.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
