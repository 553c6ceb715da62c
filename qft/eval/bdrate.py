"""Bjøntegaard-delta rate between two RD curves, through the ``bjontegaard`` package.

Curves are CompressAI results (``{"results": {"bpp": [...], "psnr-rgb": [...], ...}}``) or
plain ``{"bpp": [...], METRIC: [...]}`` dicts. Points are sorted by rate; the default
method is ``pchip`` (JVET common test conditions), ``cubic`` (VCEG-M33) and ``akima`` are
computed alongside. A curve pair whose quality ranges overlap by less than
``min_overlap`` gets a warning from the package, which is collected and returned.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["BD_METHODS", "bd_rate", "curve", "local_rate_change", "pareto_front"]

BD_METHODS = ("pchip", "cubic", "akima")


def curve(obj: dict, metric: str = "psnr-rgb") -> tuple[list[float], list[float]]:
    """``(rates, qualities)`` sorted by rate, from a CompressAI results JSON or a plain dict."""
    res = obj.get("results", obj)
    if "bpp" not in res or metric not in res:
        raise KeyError(f"curve has no 'bpp' and '{metric}' lists")
    pts = sorted(zip(res["bpp"], res[metric]))
    return [r for r, _ in pts], [q for _, q in pts]


def bd_rate(anchor: dict, test: dict, metric: str = "psnr-rgb", min_overlap: float = 0.5) -> dict:
    """BD-rate in percent of ``test`` against ``anchor`` for every method.

    Returns:
        ``{"pchip": %, "cubic": %, "akima": %, "warnings": [...]}``; a method that cannot
        be computed (fewer than 2 points, non-monotone quality, no overlap) gives NaN and
        its reason in ``warnings``.
    """
    import bjontegaard as bd

    ra, qa = curve(anchor, metric)
    rt, qt = curve(test, metric)
    out: dict = {"warnings": []}
    for method in BD_METHODS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out[method] = float(bd.bd_rate(ra, qa, rt, qt, method=method, require_matching_points=False,
                                               min_overlap=min_overlap))
            except Exception as exc:  # the package raises ValueError/AssertionError on bad curves
                out[method] = math.nan
                out["warnings"].append(f"{method}: {exc.__class__.__name__} {exc}".rstrip())
        out["warnings"] += [f"{method}: {w.message}" for w in caught]
    return out


def pareto_front(rates: list[float], qualities: list[float]) -> list[int]:
    """Indices of the points no other point beats in both rate (lower or equal) and
    quality (strictly higher): the points a monotone RD curve can pass through."""
    return [
        i
        for i, (r, q) in enumerate(zip(rates, qualities))
        if not any(r2 <= r and q2 > q for j, (r2, q2) in enumerate(zip(rates, qualities)) if j != i)
    ]


def local_rate_change(anchor: list[tuple[float, float]], point: tuple[float, float]) -> float:
    """Rate change in % of one RD point ``(rate, quality)`` against an anchor curve at equal
    quality, the anchor's log-rate interpolated linearly in quality (the anchor: one model
    swept over its quantizer step). The anchor is its :func:`pareto_front` (a step that
    costs more rate for no more quality is never the anchor's best), NaN when the point's
    quality lies outside the front's range or fewer than two points remain."""
    front = pareto_front([p[0] for p in anchor], [p[1] for p in anchor])
    pts = sorted((anchor[i] for i in front), key=lambda p: p[1])
    q = [p[1] for p in pts]
    r = [p[0] for p in pts]
    if len(pts) < 2 or any(b <= a for a, b in zip(q, q[1:])) or any(b <= a for a, b in zip(r, r[1:])):
        return math.nan
    if not q[0] <= point[1] <= q[-1]:
        return math.nan
    ref = math.exp(float(np.interp(point[1], q, np.log(r))))
    return 100 * (point[0] / ref - 1)
