"""Throughput benchmark of the quantizers: ``python -m trellis.bench [--quick] --json PATH``.

Output: ``{"machine": str, "machine_info": {...}, "runs": [{"shape": [C, H, W], "methods":
{NAME: {"latents_per_s_1t", "latents_per_s_all"}}}], "jit_warmup_s": {...}}``.

Measures full :meth:`trellis.Quantizer.quantize` calls (validation, scale rows, kernel,
reconstruction) in latents per second, on one thread and on all threads, for USQ, RDOQ,
TCQ-4 and TCQ-8 (Numba), TCQ-8 with per-channel (``tcq8_weighted``) and per-element
(``tcq8_weighted_elementwise``) distortion weights, the soft trellis of TCQ-8 at τ 0.05
(:meth:`trellis.Quantizer.soft_quantize`: expectations ``tcq8_soft``, with the gradient
``tcq8_soft_grad``) and the NumPy reference of TCQ-8 (``tcq8_numpy``), on latents of Kodak size
(192×32×48 and 320×32×48) with σ log-uniform in 0.11…20. JIT compilation (or loading
from Numba's cache) is timed separately and excluded. The JSON records the machine and
its load average before and after, so figures taken on a busy machine can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np

from trellis.hardware import machine_info
from trellis.quantize import Quantizer

__all__ = ["synthetic_latent", "run", "main"]

SHAPES = ((192, 32, 48), (320, 32, 48))
#: method -> quantizer (TCQ at VVC's union step 2^(1/6)/2 and λ = 2^(1/12) ln2/6)
QUANTIZERS = {
    "usq": Quantizer("usq"),
    "rdoq": Quantizer("rdoq", lam=0.1155),
    "tcq4": Quantizer("tcq4", step=0.5612, lam=0.1224),
    "tcq8": Quantizer("tcq8", step=0.5612, lam=0.1224),
}


def synthetic_latent(shape, seed: int = 0):
    """``(y, μ, σ)`` float32 with σ log-uniform in 0.11…20 and Gaussian residuals."""
    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.11), np.log(20.0), shape)).astype(np.float32)
    mu = rng.normal(0.0, 2.0, shape).astype(np.float32)
    y = (mu + sigma * rng.standard_normal(shape)).astype(np.float32)
    return y, mu, sigma


def _calls(y, mu, sigma, weights, elem_weights, g) -> dict:
    """name → the timed call on one latent."""
    tcq8 = QUANTIZERS["tcq8"]
    return {name: (lambda q=q: q.quantize(y, mu, sigma)) for name, q in QUANTIZERS.items()} | {
        "tcq8_weighted": lambda: tcq8.quantize(y, mu, sigma, weights=weights),
        "tcq8_weighted_elementwise": lambda: tcq8.quantize(y, mu, sigma, weights=elem_weights),
        "tcq8_soft": lambda: tcq8.soft_quantize(y, mu, sigma, tau=0.05),
        "tcq8_soft_grad": lambda: tcq8.soft_quantize(y, mu, sigma, tau=0.05, g=g, rho=0.1),
    }


def _best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> dict:
    """Runs the benchmark and returns the JSON-ready result."""
    reps = 3 if quick else 10
    numpy_channels = 1 if quick else 4
    all_threads = numba.config.NUMBA_NUM_THREADS
    info = machine_info()
    result = {"machine": "", "machine_info": info, "quick": quick, "jit_warmup_s": {}, "runs": []}
    for shape in SHAPES:
        y, mu, sigma = synthetic_latent(shape)
        # per-channel distortion weights (decoder-aware TCQ), log-normal around 1
        weights = np.exp(np.random.default_rng(1).normal(0.0, 0.5, (shape[0], 1, 1)))
        elem_weights = np.exp(np.random.default_rng(2).normal(0.0, 0.5, shape))
        calls = _calls(y, mu, sigma, weights, elem_weights, np.random.default_rng(3).standard_normal(shape))
        methods = {name: {} for name in calls}
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()  # compile or load from cache
            result["jit_warmup_s"].setdefault(name, time.perf_counter() - t0)
        # All one-thread figures first, then all-thread ones: switching the thread count
        # back and forth between measurements disturbed the one-thread figures.
        for key, threads in (("latents_per_s_1t", 1), ("latents_per_s_all", all_threads)):
            numba.set_num_threads(threads)
            for name, call in calls.items():
                methods[name][key] = y.size / _best_time(call, reps)
        numba.set_num_threads(all_threads)
        sub = tuple(a[:numpy_channels] for a in (y, mu, sigma))
        t = _best_time(lambda sub=sub: QUANTIZERS["tcq8"].quantize(*sub, backend="numpy"), 1)
        methods["tcq8_numpy"] = {"latents_per_s_1t": sub[0].size / t, "latents_per_s_all": sub[0].size / t}
        methods["tcq8"]["speedup_vs_numpy_1t"] = (
            methods["tcq8"]["latents_per_s_1t"] / methods["tcq8_numpy"]["latents_per_s_1t"]
        )
        methods["tcq8_weighted"]["vs_unweighted_1t"] = (
            methods["tcq8_weighted"]["latents_per_s_1t"] / methods["tcq8"]["latents_per_s_1t"]
        )
        result["runs"].append({"shape": list(shape), "methods": methods})
    info["loadavg_1min_after"] = os.getloadavg()[0]
    result["machine"] = (
        f"{info['cpu']}, {info['cores']} cores, numba {info['numba']} ({info['numba_threads']} threads), "
        f"load {info['loadavg_1min']:.2f} before / {info['loadavg_1min_after']:.2f} after"
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trellis.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller NumPy sample (< 30 s)")
    parser.add_argument("--json", metavar="PATH", help="write the result here")
    args = parser.parse_args(argv)
    result = run(args.quick)
    for r in result["runs"]:
        print(f"latent {'x'.join(map(str, r['shape']))}:")
        for name, m in r["methods"].items():
            print(
                f"  {name:25s} {m['latents_per_s_1t'] / 1e6:9.3f} M/s (1 thread)  "
                f"{m['latents_per_s_all'] / 1e6:9.3f} M/s (all)"
            )
        print(f"  TCQ-8 speed-up over its NumPy reference: {r['methods']['tcq8']['speedup_vs_numpy_1t']:.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
