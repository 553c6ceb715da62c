"""``qft calibrate``: choose Δ and the λ_T multiplier per checkpoint on held-out images.

For one checkpoint, on images of the training distribution's held-out split (BSDS500
validation by default; never a test set), every configuration of a grid is evaluated with
real bitstreams (:func:`qft.eval.evaluate_configs`: one analysis per image, re-quantized
per configuration):

* USQ swept over its step (``USQ_SCALES``): the checkpoint's local reference curve;
* RDOQ × λ multiplier ``m``; TCQ-4/TCQ-8 × union step Δ × ``m``; each with and without
  the decoder-sensitivity weights when they are estimated (``--weights``).

A configuration's *saving* is its rate change at equal PSNR against the USQ curve
(:func:`qft.eval.bdrate.local_rate_change`, over the image-mean RD point). Per method the
choice is, among the configurations within ``TIE_PP`` percentage points of the best
saving, the one whose rate stays closest to USQ's at step 1 (the saving is nearly flat in
Δ, the model's operating point is not). This pick is made separately without and with
weights; the better of the two is the method's default, both are kept (``by_weights``, so
``--weights none`` still gets calibrated Δ and λ), and with the whole grid they go to the
checkpoint's settings file
(:mod:`qft.eval.settings`), which every command then uses by default.
"""

from __future__ import annotations

import itertools
import math

from pathlib import Path
from typing import Any

import numpy as np

from qft.eval.bdrate import local_rate_change
from qft.eval.settings import resolve_quantizer

__all__ = ["USQ_SCALES", "STEPS", "MULTS", "TIE_PP", "calibrate_checkpoint"]

USQ_SCALES = (0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
STEPS = (0.63, 0.7, 0.8, 0.9, 1.0)
MULTS = (0.025, 0.05, 0.1, 0.25)
TIE_PP = 0.5


def _grid(methods, steps, mults, weight_modes) -> list[dict[str, Any]]:
    grid = [{"method": "usq", "step": s, "lambda_mult": 0.0, "weights": "none"} for s in USQ_SCALES]
    for method, w in itertools.product(methods, weight_modes):
        method_steps = (1.0,) if method == "rdoq" else steps
        grid += [{"method": method, "step": d, "lambda_mult": m, "weights": w}
                 for d, m in itertools.product(method_steps, mults)]
    return grid


def calibrate_checkpoint(
    ck,
    images: list[Path],
    settings: dict[str, Any],
    *,
    methods=("rdoq", "tcq4", "tcq8"),
    steps=STEPS,
    mults=MULTS,
    weights: bool = False,
    desc: str = "calibrate",
) -> dict[str, Any]:
    """Grid search of one loaded checkpoint; returns the settings update
    ``{"methods": {...}, "calibration": {...}}``.

    ``settings`` are the checkpoint's current settings; with ``weights`` they must hold
    the decoder weights (``settings["weights"]["decoder"]``).
    """
    from qft.codec import Codec
    from qft.eval.evaluate import evaluate_configs
    from qft.models import ARCHITECTURES

    grid = _grid(methods, steps, mults, ("none", "decoder") if weights else ("none",))
    configs = {}
    for i, g in enumerate(grid):
        c = resolve_quantizer(g["method"], settings, step=g["step"], lambda_mult=g["lambda_mult"] or None,
                              weights=g["weights"])
        configs[str(i)] = (c.quantizer, c.weights)
    codec = Codec(ck.model, ck.arch, ARCHITECTURES[ck.arch].entropy)
    rows = evaluate_configs(codec, configs, images, desc=desc, ms_ssim=False)
    for i, g in enumerate(grid):
        g["bpp"] = float(np.mean([r["bpp"] for r in rows[str(i)]]))
        g["psnr"] = float(np.mean([r["psnr-rgb"] for r in rows[str(i)]]))
    usq = [(g["bpp"], g["psnr"]) for g in grid if g["method"] == "usq"]
    usq1 = next(g for g in grid if g["method"] == "usq" and g["step"] == 1.0)
    for g in grid:
        g["saving"] = None if g["method"] == "usq" else _finite(local_rate_change(usq, (g["bpp"], g["psnr"])))
    chosen = {}
    for method in methods:
        picks = {w: _pick([g for g in grid if g["method"] == method and g["weights"] == w], usq1)
                 for w in ("none", "decoder")}
        picks = {w: p for w, p in picks.items() if p is not None}
        if not picks:
            continue
        best = min(picks.values(), key=lambda p: p["saving"])
        chosen[method] = {**best, "by_weights": picks}
    calibration = {"data": str(Path(images[0]).parent) if images else "", "images": [p.name for p in images],
                   "metric": "rate change (%) at equal PSNR vs the USQ step sweep, real bitstreams",
                   "tie_pp": TIE_PP, "grid": grid}
    return {"methods": settings.get("methods", {}) | chosen, "calibration": calibration}


def _pick(cands: list[dict[str, Any]], usq1: dict[str, Any]) -> dict[str, Any] | None:
    """Among the configurations within ``TIE_PP`` of the best saving, the one whose rate
    stays closest to USQ's at step 1; ``None`` when none has a saving."""
    cands = [g for g in cands if g["saving"] is not None]
    if not cands:
        return None
    best = min(g["saving"] for g in cands)
    pick = min((g for g in cands if g["saving"] <= best + TIE_PP), key=lambda g: abs(g["bpp"] / usq1["bpp"] - 1))
    return {"step": pick["step"], "lambda_mult": pick["lambda_mult"], "weights": pick["weights"],
            "saving": pick["saving"], "best_saving": best, "rate_vs_usq_step1": pick["bpp"] / usq1["bpp"]}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
