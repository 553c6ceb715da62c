"""``qft calibrate``: choose Δ and the λ_T multiplier per checkpoint on held-out images.

For one checkpoint, on images of the training distribution's held-out split (BSDS500
validation by default; never a test set), every configuration of a grid is evaluated with
real bitstreams (:func:`qft.eval.evaluate_configs`: one analysis per image, re-quantized
per configuration):

* USQ swept over its step (``USQ_SCALES``): the checkpoint's local reference curve;
* RDOQ × λ multiplier ``m``; TCQ-4/TCQ-8 × union step Δ × ``m``; each with and without
  the decoder-sensitivity weights when they are estimated (``--weights``).

With ``--targets``, a second pass tries the decoder target (:mod:`qft.codec.latent`) on
every pick: ``η`` chosen per image (``rd``, the default) and any fixed ``η`` named; a pick
keeps the target (0 if none helps) of lowest RD cost ``λ·255²·MSE + bpp`` at the model's
training λ (the saving where λ is unknown).

A configuration's *saving* is its rate change at equal PSNR against the USQ curve
(:func:`qft.eval.bdrate.local_rate_change`, over the image-mean RD point). Per method the
choice is, among the configurations within ``TIE_PP`` percentage points of the best
saving, the one whose rate stays closest to USQ's at step 1 (the saving is nearly flat in
Δ, the model's operating point is not). This pick is made separately without and with
weights; the one of better saving (after the target pass) is the method's default, both
are kept (``by_weights``, so ``--weights none`` still gets calibrated Δ and λ), and with
the whole grid they go to the checkpoint's settings file (:mod:`qft.settings`),
which every command then uses by default.
"""

from __future__ import annotations

import itertools
import math

from pathlib import Path
from typing import Any

import numpy as np

from qft.eval.bdrate import local_rate_change
from qft.settings import resolve_quantizer

__all__ = ["USQ_SCALES", "STEPS", "MULTS", "TARGETS", "TIE_PP", "calibrate_checkpoint", "default_pick"]

USQ_SCALES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
STEPS = (0.63, 0.7, 0.8, 0.9, 1.0)
MULTS = (0.025, 0.05, 0.1, 0.25)
TIE_PP = 0.5
#: Decoder targets of ``qft calibrate --targets`` without values: ``η`` chosen per image.
TARGETS = ("rd",)


def _grid(methods, steps, mults, weight_modes) -> list[dict[str, Any]]:
    grid = [{"method": "usq", "step": s, "lambda_mult": 0.0, "weights": "none", "target": 0.0} for s in USQ_SCALES]
    for method, w in itertools.product(methods, weight_modes):
        method_steps = (1.0,) if method == "rdoq" else steps
        grid += [
            {"method": method, "step": d, "lambda_mult": m, "weights": w, "target": 0.0}
            for d, m in itertools.product(method_steps, mults)
        ]
    return grid


def _evaluate_grid(ck, grid: list[dict[str, Any]], images: list[Path], settings: dict[str, Any], desc: str) -> None:
    """Mean bpp and PSNR of every grid entry (added in place), real bitstreams."""
    from qft.codec import Codec
    from qft.eval.evaluate import evaluate_configs

    configs = {}
    for i, g in enumerate(grid):
        c = resolve_quantizer(
            g["method"],
            settings,
            step=g["step"],
            lambda_mult=g["lambda_mult"] or None,
            weights=g["weights"],
            target=g["target"],
        )
        configs[str(i)] = (c.quantizer, c.weights, c.target)
    codec = Codec.from_checkpoint(ck)
    rows = evaluate_configs(codec, configs, images, desc=desc, ms_ssim=False)
    for i, g in enumerate(grid):
        g["bpp"] = float(np.mean([r["bpp"] for r in rows[str(i)]]))
        g["psnr"] = float(np.mean([r["psnr-rgb"] for r in rows[str(i)]]))


def calibrate_checkpoint(
    ck,
    images: list[Path],
    settings: dict[str, Any],
    *,
    methods=("rdoq", "tcq4", "tcq8"),
    steps=STEPS,
    mults=MULTS,
    weights: bool = False,
    targets=(),
    lmbda: float | None = None,
    desc: str = "calibrate",
) -> dict[str, Any]:
    """Grid search of one loaded checkpoint; returns the settings update
    ``{"methods": {...}, "calibration": {...}}``.

    ``settings`` are the checkpoint's current settings; with ``weights`` they must hold
    the decoder weights (``settings["weights"]["decoder"]``). ``targets``: decoder targets
    (``η`` > 0, or ``"rd"``: chosen per image, which needs ``settings["model_lambda"]``)
    tried, in a second pass, on every pick of the first; a pick keeps the target (0: none)
    with the lowest RD cost ``λ·255²·MSE + bpp`` of the model's own
    ``lmbda`` (defined even where a point's PSNR lies beyond USQ's curve, as the target's
    often do), or without ``lmbda`` the best saving; the method's default between the
    weight picks is the better saving (:func:`default_pick`). USQ at step 1 with each ``η``
    is measured too (``calibration["usq_target"]``: what the target alone buys) but USQ
    stays the plain reference: its default target is 0.
    """
    grid = _grid(methods, steps, mults, ("none", "decoder") if weights else ("none",))
    _evaluate_grid(ck, grid, images, settings, desc)
    usq = [(g["bpp"], g["psnr"]) for g in grid if g["method"] == "usq"]
    usq1 = next(g for g in grid if g["method"] == "usq" and g["step"] == 1.0)

    def saving(g: dict[str, Any]) -> float | None:
        return _finite(local_rate_change(usq, (g["bpp"], g["psnr"])))

    for g in grid:
        g["saving"] = None if g["method"] == "usq" else saving(g)
    chosen = {}
    for method in methods:
        picks = {
            w: _pick([g for g in grid if g["method"] == method and g["weights"] == w], usq1)
            for w in ("none", "decoder")
        }
        chosen[method] = {w: p | {"target": 0.0} for w, p in picks.items() if p is not None}
    targets = sorted({float(t) for t in targets if t != "rd" and t > 0}) + (["rd"] if "rd" in targets else [])
    second = [{"method": "usq", "step": 1.0, "lambda_mult": 0.0, "weights": "none", "target": t} for t in targets]
    second += [
        {"method": m, "step": p["step"], "lambda_mult": p["lambda_mult"], "weights": w, "target": t}
        for m, picks in chosen.items()
        for w, p in picks.items()
        for t in targets
    ]

    def score(g: dict[str, Any]) -> float:
        """Lower is better: the model's own RD cost with its λ (always defined), else the saving."""
        if lmbda:
            return lmbda * 255**2 * 10 ** (-g["psnr"] / 10) + g["bpp"]
        return math.inf if g["saving"] is None else g["saving"]

    if second:
        _evaluate_grid(ck, second, images, settings, f"{desc} (targets)")
        for g in second:
            g["saving"] = saving(g)
            if g["method"] == "usq":
                continue
            p = chosen[g["method"]][g["weights"]]
            if score(g) < score(p):
                p.update(
                    target=g["target"],
                    saving=g["saving"],
                    bpp=g["bpp"],
                    psnr=g["psnr"],
                    rate_vs_usq_step1=g["bpp"] / usq1["bpp"],
                )
    methods_out = {
        method: {**default_pick(picks, score), "by_weights": picks} for method, picks in chosen.items() if picks
    }
    calibration = {
        "data": str(Path(images[0]).parent) if images else "",
        "images": [p.name for p in images],
        "metric": "rate change (%) at equal PSNR vs the USQ step sweep, real bitstreams",
        "tie_pp": TIE_PP,
        "grid": grid + second,
        "usq_target": {str(g["target"]): g["saving"] for g in second if g["method"] == "usq"},
    }
    return {"methods": settings.get("methods", {}) | methods_out, "calibration": calibration}


def default_pick(picks: dict[str, dict[str, Any]], score) -> dict[str, Any]:
    """The method's default among its weight picks (``{"none": …, "decoder": …}``): the
    best saving when every pick has one — the measure the reports use —, else the lowest
    ``score`` (a target's point can lie beyond USQ's curve, where no saving is defined)."""
    if all(p["saving"] is not None for p in picks.values()):
        return min(picks.values(), key=lambda p: p["saving"])
    return min(picks.values(), key=score)


def _pick(cands: list[dict[str, Any]], usq1: dict[str, Any]) -> dict[str, Any] | None:
    """Among the configurations within ``TIE_PP`` of the best saving, the one whose rate
    stays closest to USQ's at step 1; ``None`` when none has a saving."""
    cands = [g for g in cands if g["saving"] is not None]
    if not cands:
        return None
    best = min(g["saving"] for g in cands)
    pick = min((g for g in cands if g["saving"] <= best + TIE_PP), key=lambda g: abs(g["bpp"] / usq1["bpp"] - 1))
    return {
        "step": pick["step"],
        "lambda_mult": pick["lambda_mult"],
        "weights": pick["weights"],
        "saving": pick["saving"],
        "best_saving": best,
        "rate_vs_usq_step1": pick["bpp"] / usq1["bpp"],
        "bpp": pick["bpp"],
        "psnr": pick["psnr"],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
