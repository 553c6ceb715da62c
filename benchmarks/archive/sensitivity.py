"""Decoder sensitivity (issue 9): cost and agreement of the ``exact`` and ``vjp`` estimators
of :func:`qft.sensitivity.decoder_sensitivity`, and ``s_c`` against each channel's rate.

On the shipped reference checkpoints (``qft/assets/checkpoints``, mbt2018-mean N=64 M=96)
and the first BSDS500 *validation* images (sorted names, centre 256×256 crops; never Kodak
or Tecnick), per checkpoint:

* ``exact``: two independent runs of one noise draw each (seeds 0 and 1); their mean is
  the reference ``s``, their rank correlation the reference's own reliability;
  the time reported is that of one run (one draw);
* ``vjp`` with ``K`` = 4, 8, 16 probes: wall time, Spearman rank correlation and relative
  deviation against the reference;
* the mean rate of each channel's USQ indices, in bits per latent element: the exact
  table bits of every index (``trellis.Quantizer("usq").table.index_bits`` of the
  ``QuantizeResult``'s rows and indices; their sum is checked against ``.bits``), averaged
  over positions and images;
* the weights ``normalise_weights(s, rates)``: spread and relation to the rate;
* the trellis λ the model's own training trade-off implies: with the training loss
  ``λ·255²·MSE + bpp`` and ``MSE_pix ≈ Σ_c s_c MSE_c``, one bit is worth
  ``λ_T = 1 / (λ · 255² · 256 · s̄)`` units of latent squared error (``s̄`` the
  rate-weighted mean of ``s``; per image, ``H·W·loss = λ·255²·SSE_pix/3 + bits`` and
  ``SSE_pix ≈ Σ_c 3·16² s_c SSE_c``), to compare with the calibrated ``λ_T`` (design.md,
  "Quantizer calibration").

Also the cost on a randomly initialised N=128/M=192 model (the zoo width): ``vjp`` on all
images, ``exact`` on one image (scaled to all). One torch thread; the NumPy backend of the
quantizer, so no Numba kernel resets torch's thread count (Numba's OpenMP layer does). The
JSON records the load average: on a busy machine timings are inflated.

    python benchmarks/archive/sensitivity.py --json benchmarks/results/sensitivity.json \\
        --plot docs/figures/sensitivity.png
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pathlib import Path

import numpy as np
import torch

from scipy.stats import spearmanr

from trellis.hardware import machine_info

from qft.codec import list_images
from qft.models import create_model, load_checkpoint
from qft.models.zoo import ASSETS, base_entries
from qft.sensitivity import channel_rates, decoder_sensitivity, normalise_weights

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "bsds500" / "val"
PROBES = (4, 8, 16)
CROP = 256


def reference_checkpoints(lambdas=None) -> list[tuple[Path, float]]:
    entries = base_entries()
    if lambdas:
        entries = [e for e in entries if any(abs(e["lambda"] - lam) < 1e-9 for lam in lambdas)]
    return [(ASSETS / e["file"], e["lambda"]) for e in entries]


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


@torch.no_grad()
def agreement(s: np.ndarray, ref: np.ndarray) -> dict:
    ratio = s / ref
    return {
        "spearman": float(spearmanr(s, ref)[0]),
        "median_abs_rel_dev": float(np.median(np.abs(ratio - 1))),
        "p90_abs_rel_dev": float(np.percentile(np.abs(ratio - 1), 90)),
        "median_ratio": float(np.median(ratio)),
    }


def measure_checkpoint(path: Path, lam: float, images) -> dict:
    ck = load_checkpoint(path)
    model = ck.model
    m = ck.params["M"]
    print(f"{path.name}: exact", flush=True)
    halves, t_exact = [], []
    for seed in (0, 1):
        s, dt = timed(
            decoder_sensitivity, model, images, method="exact", probes=1, seed=seed, crop=CROP, progress=False
        )
        halves.append(s)
        t_exact.append(dt)
    ref = (halves[0] + halves[1]) / 2
    out = {
        "file": path.name,
        "lambda": lam,
        "M": m,
        "exact": {
            "probes": 1,
            "time_s": float(np.mean(t_exact)),
            "times_s": t_exact,
            "decoder_passes": m * len(images),
            "s_per_pass_ms": 1e3 * float(np.mean(t_exact)) / (m * len(images)),
            "split_half_spearman": float(spearmanr(*halves)[0]),
            "split_half_median_abs_rel_dev": float(np.median(np.abs(halves[0] / halves[1] - 1))),
        },
        "vjp": {},
    }
    for k in PROBES:
        print(f"{path.name}: vjp K={k}", flush=True)
        s, dt = timed(decoder_sensitivity, model, images, method="vjp", probes=k, seed=0, crop=CROP, progress=False)
        out["vjp"][str(k)] = {"time_s": dt, **agreement(s, ref), "s": s.tolist()}
    print(f"{path.name}: rates", flush=True)
    rates, bpp = channel_rates(model, images, crop=CROP)
    w = normalise_weights(ref, rates)
    s_bar = float(np.dot(ref, rates) / rates.sum())
    live = rates > 0.01  # channels carrying at least 0.01 bit per element
    out.update(
        {
            "y_bpp": bpp,
            "s_exact": ref.tolist(),
            "rate_bits_per_latent": rates.tolist(),
            "weights_rate_normalised": w.tolist(),
            "s_rate_weighted_mean": s_bar,
            "implied_lambda_T": 1.0 / (lam * 255**2 * 256 * s_bar),
            "weights": {
                "max_over_min": float(w.max() / w.min()),
                "p95_over_p5": float(np.percentile(w, 95) / np.percentile(w, 5)),
                "channels_with_rate_gt_0.01": int(live.sum()),
                "max_over_min_rate_gt_0.01": float(w[live].max() / w[live].min()) if live.any() else None,
                "spearman_s_vs_rate": float(spearmanr(ref, rates)[0]),
                "spearman_s_vs_rate_rate_gt_0.01": (
                    float(spearmanr(ref[live], rates[live])[0]) if live.sum() > 2 else None
                ),
                "share_of_rate_in_top_quarter_of_s": float(rates[np.argsort(ref)[-m // 4 :]].sum() / rates.sum()),
            },
        }
    )
    return out


def cost_m192(images) -> dict:
    """Cost on a random N=128/M=192 model (timings do not depend on the weights)."""
    model = create_model("mbt2018-mean", N=128, M=192, seed=0)
    out = {"model": "mbt2018-mean N=128 M=192, random init", "images": len(images), "vjp": {}}
    for k in PROBES:
        print(f"M=192: vjp K={k}", flush=True)
        _, dt = timed(decoder_sensitivity, model, images, method="vjp", probes=k, crop=CROP, progress=False)
        out["vjp"][str(k)] = {"time_s": dt}
    print("M=192: exact (1 image)", flush=True)
    _, dt = timed(decoder_sensitivity, model, images[:1], method="exact", probes=1, crop=CROP, progress=False)
    out["exact"] = {"probes": 1, "time_one_image_s": dt, "time_s_scaled": dt * len(images)}
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(results):
        col = cmap(i / max(1, len(results) - 1))
        label = f"λ={r['lambda']}"
        ax.scatter(r["rate_bits_per_latent"], r["s_exact"], s=10, color=col, label=label)
        rho = r["vjp"]["8"]["spearman"]
        bx.scatter(r["s_exact"], r["vjp"]["8"]["s"], s=8, color=col, label=f"{label}: ρ={rho:.3f}")
    ax.set(
        xscale="symlog",
        xlim=(0, None),
        yscale="log",
        xlabel="channel rate, USQ (bits / latent element)",
        ylabel="sensitivity $s_c$ (exact)",
        title="decoder sensitivity vs channel rate",
    )
    ax.set_xscale("symlog", linthresh=0.01)
    ax.legend(fontsize=8)
    lo = min(min(r["s_exact"]) for r in results)
    hi = max(max(r["s_exact"]) for r in results)
    bx.plot([lo, hi], [lo, hi], "k:", lw=1)
    bx.set(
        xscale="log",
        yscale="log",
        xlabel="$s_c$ exact (2 draws)",
        ylabel="$s_c$ vjp, K = 8",
        title="vjp vs exact (Spearman ρ)",
    )
    bx.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="BSDS500 validation folder")
    parser.add_argument("--images", type=int, default=8, help="first N images (sorted names)")
    parser.add_argument("--lambdas", type=float, nargs="*", help="checkpoints to measure (default: all)")
    parser.add_argument("--no-m192", action="store_true", help="skip the cost on an N=128/M=192 model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "sensitivity.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "figures" / "sensitivity.png")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images = list_images(args.data)[: args.images]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = [measure_checkpoint(p, lam, images) for p, lam in reference_checkpoints(args.lambdas)]
    m192 = None if args.no_m192 else cost_m192(images)
    report = {
        "machine": machine_info() | {"torch_threads": torch.get_num_threads()},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "total_time_s": time.perf_counter() - t0,
        "images": [p.name for p in images],
        "crop": CROP,
        "definition": "s_c = pixel MSE([0,1], unclamped) of g_s(ŷ+e_c) vs g_s(ŷ) / latent MSE of e_c on channel c; "
        "e_c ~ U[-1/2, 1/2) (exact), ŷ = USQ latent",
        "checkpoints": results,
        "cost_m192": m192,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot and results:
        plot(results, args.plot)
    print(f"{args.json} written ({report['total_time_s']:.0f} s)")
    for r in results:
        v = r["vjp"]
        print(
            f"λ={r['lambda']}: exact {r['exact']['time_s']:.1f} s "
            f"(split-half ρ {r['exact']['split_half_spearman']:.3f}); "
            + ", ".join(f"vjp K={k} {v[k]['time_s']:.1f} s ρ={v[k]['spearman']:.3f}" for k in v)
            + f"; w max/min {r['weights']['max_over_min']:.0f}, ρ(s, rate) {r['weights']['spearman_s_vs_rate']:.2f}"
            + f"; implied λ_T {r['implied_lambda_T']:.3f}"
        )
    if m192:
        print("M=192:", json.dumps(m192))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
