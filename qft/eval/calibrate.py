"""``qft calibrate``: choose Δ and the λ_T multiplier per checkpoint on held-out images.

For one checkpoint, on images of the training distribution's held-out split (BSDS500
validation by default; never a test set), every configuration of a grid is evaluated with
real bitstreams (:func:`qft.eval.evaluate_configs`: one analysis per image, re-quantized
per configuration):

* USQ swept over its step (``USQ_SCALES``): the checkpoint's local reference curve;
* RDOQ × λ multiplier ``m``; TCQ-4/TCQ-8 × union step Δ × ``m``; each with and without
  the decoder-sensitivity weights when they are estimated (``--weights``).

With ``--targets`` the decoder target (:mod:`qft.codec.latent`: ``η`` chosen per image,
``rd``, the default, and any fixed ``η`` named) is searched *jointly* with Δ, ``m`` and
the weights: the grid and USQ's sweep run without a target and with each (issue 24: Δ and
λ_T chosen without the target and the target added after lost to USQ with the same
target; docs/design.md, "TCQ's own gain"). A pick keeps the target (0 if none helps) of
lowest RD cost ``λ·255²·MSE + bpp`` at the model's training λ (the saving where λ is
unknown).

A configuration's *saving* is its rate change at equal PSNR against the USQ curve
(:func:`qft.eval.bdrate.local_rate_change`, over the image-mean RD point), and its
*saving vs USQ with the same target* against USQ's curve with that target. Per method,
weight choice and target the choice is, among the configurations whose rate stays within
``RATE_BAND`` of that USQ's at step 1 and within ``TIE_PP`` percentage points of their
best saving vs USQ with the same target, the one whose rate stays closest to it (the
saving is nearly flat in Δ, the model's operating point is not; away from it the model's
own step sweep is a weak reference). This pick is made separately without and with
weights; the one of better saving is the method's default, both
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

__all__ = ["USQ_SCALES", "STEPS", "MULTS", "TARGETS", "TIE_PP", "RATE_BAND", "calibrate_checkpoint", "default_pick"]

USQ_SCALES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
STEPS = (0.63, 0.7, 0.8, 0.9, 1.0)
MULTS = (0.025, 0.05, 0.1, 0.25)
TIE_PP = 0.5
#: Largest relative distance of a pick's rate from USQ's at step 1 (with the same target):
#: away from its operating point a model's own step sweep is a weak reference (the next
#: model of the family does better there), and picks that moved the rate by 10–30 % scored
#: −4 to −7 % against it but lost 1.7 % BD on Kodak (docs/design.md, "TCQ's own gain").
RATE_BAND = 0.05
#: Decoder targets of ``qft calibrate --targets`` without values: ``η`` chosen per image.
TARGETS = ("rd",)


def _grid(methods, steps, mults, weight_modes, targets, plain_rows=(0,)) -> list[dict[str, Any]]:
    """USQ's step sweep and every method's configurations, each with every decoder target
    (and for TCQ every number of plain rows)."""
    grid = []
    for t in targets:
        grid += [{"method": "usq", "step": s, "lambda_mult": 0.0, "weights": "none", "target": t} for s in USQ_SCALES]
        for method, w in itertools.product(methods, weight_modes):
            method_steps = (1.0,) if method == "rdoq" else steps
            plain = plain_rows if method.startswith("tcq") else (0,)
            grid += [
                {"method": method, "step": d, "lambda_mult": m, "weights": w, "target": t}
                | ({"plain_rows": p} if method.startswith("tcq") else {})
                for d, m, p in itertools.product(method_steps, mults, plain)
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
            plain_rows=g.get("plain_rows", 0),
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
    plain_rows=(0,),
    desc: str = "calibrate",
) -> dict[str, Any]:
    """Grid search of one loaded checkpoint; returns the settings update
    ``{"methods": {...}, "calibration": {...}}``.

    ``settings`` are the checkpoint's current settings; with ``weights`` they must hold
    the decoder weights (``settings["weights"]["decoder"]``). ``targets``: decoder targets
    (``η`` > 0, or ``"rd"``: chosen per image, which needs ``settings["model_lambda"]``)
    searched jointly with Δ, the λ multiplier and the weights: the whole grid, and USQ's
    step sweep, run once without a target and once with each. Per method, weight choice
    and target the pick is made against USQ with the *same* target (:func:`_pick`: what
    the quantizer adds to what the target gives USQ); among the targets a weight choice
    keeps the one (0: none) of lowest RD cost ``λ·255²·MSE + bpp`` at the model's own
    ``lmbda`` (defined even where a point's PSNR lies beyond USQ's curve, as the
    target's often do), or without ``lmbda`` the best saving vs plain USQ; the method's
    default between the weight picks is the better saving (:func:`default_pick`). USQ at
    step 1 with each ``η`` is recorded (``calibration["usq_target"]``: what the target
    alone buys) but USQ stays the plain reference: its default target is 0. ``plain_rows``:
    the numbers of plain rows (:attr:`trellis.Quantizer.plain_rows`) TCQ's grid searches
    with the others (default: 0 only).
    """
    targets = [0.0, *sorted({float(t) for t in targets if t != "rd" and t > 0})] + (["rd"] if "rd" in targets else [])
    grid = _grid(methods, steps, mults, ("none", "decoder") if weights else ("none",), targets, plain_rows)
    _evaluate_grid(ck, grid, images, settings, desc)
    usq = {t: [(g["bpp"], g["psnr"]) for g in grid if g["method"] == "usq" and g["target"] == t] for t in targets}
    usq1 = {t: next(g for g in grid if g["method"] == "usq" and g["step"] == 1.0 and g["target"] == t) for t in targets}
    for g in grid:
        point = (g["bpp"], g["psnr"])
        g["saving"] = _finite(local_rate_change(usq[0.0], point))
        g["saving_vs_usq_target"] = _finite(local_rate_change(usq[g["target"]], point))

    def score(g: dict[str, Any]) -> float:
        """Lower is better: the model's own RD cost with its λ (always defined), else the saving."""
        if lmbda:
            return lmbda * 255**2 * 10 ** (-g["psnr"] / 10) + g["bpp"]
        return math.inf if g["saving"] is None else g["saving"]

    chosen = {}
    for method in methods:
        picks = {}
        for w in ("none", "decoder"):
            by_target = [
                _pick([g for g in grid if (g["method"], g["weights"], g["target"]) == (method, w, t)], usq1[t], score)
                for t in targets
            ]
            by_target = [p for p in by_target if p is not None]
            if by_target:
                picks[w] = min(by_target, key=score)
        chosen[method] = picks
    methods_out = {
        method: {**default_pick(picks, score), "by_weights": picks} for method, picks in chosen.items() if picks
    }
    calibration = {
        "data": str(Path(images[0]).parent) if images else "",
        "images": [p.name for p in images],
        "metric": "rate change (%) at equal PSNR vs the USQ step sweep (saving) and vs USQ with the same "
        "decoder target (saving_vs_usq_target), real bitstreams",
        "tie_pp": TIE_PP,
        "rate_band": RATE_BAND,
        "grid": grid,
        "usq_target": {str(t): usq1[t]["saving"] for t in targets if t != 0.0},
    }
    return {"methods": settings.get("methods", {}) | methods_out, "calibration": calibration}


def default_pick(picks: dict[str, dict[str, Any]], score) -> dict[str, Any]:
    """The method's default among its weight picks (``{"none": …, "decoder": …}``): the
    best saving when every pick has one — the measure the reports use; against USQ with
    the same decoder target when the picks share theirs, else against plain USQ —, else
    the lowest ``score`` (a target's point can lie beyond USQ's curve, where no saving is
    defined)."""
    same_target = len({str(p["target"]) for p in picks.values()}) == 1
    key = "saving_vs_usq_target" if same_target else "saving"
    if all(p[key] is not None for p in picks.values()):
        return min(picks.values(), key=lambda p: p[key])
    return min(picks.values(), key=score)


def _pick(cands: list[dict[str, Any]], usq1: dict[str, Any], score) -> dict[str, Any] | None:
    """Among the configurations whose rate lies within ``RATE_BAND`` of that of USQ at step 1
    with the same decoder target (``usq1``; the closest one when none does) and within
    ``TIE_PP`` of their best saving against USQ with that target (``saving_vs_usq_target``),
    the one whose rate stays closest to ``usq1``'s; where none has that saving (every point
    beyond USQ's PSNR range), the one of least ``score``; ``None`` without candidates."""
    if not cands:
        return None
    distance = {id(g): abs(g["bpp"] / usq1["bpp"] - 1) for g in cands}
    cands = [g for g in cands if distance[id(g)] <= RATE_BAND] or [min(cands, key=lambda g: distance[id(g)])]
    scored = [g for g in cands if g["saving_vs_usq_target"] is not None]
    best = min((g["saving_vs_usq_target"] for g in scored), default=None)
    if best is None:
        pick = min(cands, key=score)
    else:
        near = [g for g in scored if g["saving_vs_usq_target"] <= best + TIE_PP]
        pick = min(near, key=lambda g: abs(g["bpp"] / usq1["bpp"] - 1))
    return {
        "step": pick["step"],
        "lambda_mult": pick["lambda_mult"],
        "weights": pick["weights"],
        "target": pick["target"],
        **({"plain_rows": pick["plain_rows"]} if "plain_rows" in pick else {}),
        "saving": pick["saving"],
        "saving_vs_usq_target": pick["saving_vs_usq_target"],
        "best_saving_vs_usq_target": best,
        "rate_vs_usq_step1": pick["bpp"] / usq1["bpp"],
        "bpp": pick["bpp"],
        "psnr": pick["psnr"],
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None
