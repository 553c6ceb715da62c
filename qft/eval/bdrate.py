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

__all__ = ["BD_METHODS", "bd_rate", "curve", "front_bd_rate", "local_rate_change", "pareto_front"]

BD_METHODS = ("pchip", "cubic", "akima")


def curve(obj: dict, metric: str = "psnr-rgb") -> tuple[list[float], list[float]]:
    """``(rates, qualities)`` sorted by rate, from a CompressAI results JSON or a plain dict.

    Raises:
        ValueError: not a JSON object; no ``bpp`` or ``metric`` list; lists of other
            lengths, of non-numbers or non-finite numbers, or of fewer than 2 points;
            rates not positive; quality not strictly increasing with rate (no BD-rate is
            defined for such a curve).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"a curve is a JSON object with 'bpp' and '{metric}' lists, not a {type(obj).__name__}")
    res = obj.get("results", obj)
    if not isinstance(res, dict) or "bpp" not in res or metric not in res:
        raise ValueError(f"curve has no 'bpp' and '{metric}' lists")
    rates, qualities = res["bpp"], res[metric]
    for key, values in (("bpp", rates), (metric, qualities)):
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise ValueError(f"curve's '{key}' is not a list of finite numbers")
    if len(rates) != len(qualities):
        raise ValueError(f"curve has {len(rates)} 'bpp' but {len(qualities)} '{metric}' values")
    if len(rates) < 2:
        raise ValueError(f"curve has {len(rates)} point(s); a BD-rate needs at least 2")
    if min(rates) <= 0:
        raise ValueError("curve has a 'bpp' value <= 0")
    pts = sorted(zip(rates, qualities))
    if any(r2 <= r1 or q2 <= q1 for (r1, q1), (r2, q2) in zip(pts, pts[1:])):
        raise ValueError(f"curve's '{metric}' does not rise strictly with 'bpp' (not monotonic)")
    return [float(r) for r, _ in pts], [float(q) for _, q in pts]


def bd_rate(anchor: dict, test: dict, metric: str = "psnr-rgb", min_overlap: float = 0.5) -> dict:
    """BD-rate in percent of ``test`` against ``anchor`` for every method.

    Returns:
        ``{"pchip": %, "cubic": %, "akima": %, "warnings": [...]}``; a method that cannot
        be computed for valid curves (e.g. too little overlap) gives NaN and its reason in
        ``warnings``.

    Raises:
        ValueError: ``anchor`` or ``test`` is not a curve with a BD-rate (:func:`curve`);
            the message starts with which.
    """
    import bjontegaard as bd

    (ra, qa), (rt, qt) = (_named_curve(c, metric, name) for c, name in ((anchor, "anchor"), (test, "test")))
    out: dict = {"warnings": []}
    for method in BD_METHODS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out[method] = float(
                    bd.bd_rate(ra, qa, rt, qt, method=method, require_matching_points=False, min_overlap=min_overlap)
                )
            except Exception as exc:  # the package raises ValueError/AssertionError on bad curves
                out[method] = math.nan
                out["warnings"].append(f"{method}: {exc.__class__.__name__} {exc}".rstrip())
        out["warnings"] += [f"{method}: {w.message}" for w in caught]
    return out


def _named_curve(obj: dict, metric: str, name: str) -> tuple[list[float], list[float]]:
    try:
        return curve(obj, metric)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def pareto_front(rates: list[float], qualities: list[float]) -> list[int]:
    """Indices of the points no other point beats in both rate (lower or equal) and
    quality (strictly higher): the points a monotone RD curve can pass through."""
    return [
        i
        for i, (r, q) in enumerate(zip(rates, qualities))
        if not any(r2 <= r and q2 > q for j, (r2, q2) in enumerate(zip(rates, qualities)) if j != i)
    ]


def front_bd_rate(
    anchor: list[tuple[float, float]], test: list[tuple[float, float]], metric: str = "psnr-rgb"
) -> tuple[float, list[int]]:
    """BD-rate (pchip, %) of ``test`` against ``anchor``, two curves of ``(rate, quality)``
    points paired by index (one per rate point, e.g. a family's models), over the indices on
    *both* curves' :func:`pareto_front` (a point another beats is never on a monotone RD
    curve, and pairing keeps the two curves over the same rate points).

    Returns:
        ``(bd, indices)``: NaN for ``bd`` where fewer than two indices remain, a quality is
        not finite, or the fronts tie (not strictly monotonic).
    """
    if len(anchor) != len(test):
        raise ValueError(f"front_bd_rate: {len(anchor)} anchor but {len(test)} test points")
    sel = sorted(
        set(pareto_front([p[0] for p in anchor], [p[1] for p in anchor]))
        & set(pareto_front([p[0] for p in test], [p[1] for p in test]))
    )
    if len(sel) < 2 or not all(math.isfinite(p[1]) for p in anchor + test):
        return math.nan, sel
    try:
        bd = bd_rate(
            {"bpp": [anchor[j][0] for j in sel], metric: [anchor[j][1] for j in sel]},
            {"bpp": [test[j][0] for j in sel], metric: [test[j][1] for j in sel]},
            metric,
        )["pchip"]
    except ValueError:  # tied points on a front: not strictly monotonic, no BD
        return math.nan, sel
    return bd, sel


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
