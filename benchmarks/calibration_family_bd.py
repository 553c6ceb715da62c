"""The family BD of calibrated picks on their own calibration images (issue 24).

``qft calibrate`` scores each configuration against the checkpoint's *own* step sweep (a
local measure); the reports judge a quantizer by the Bjøntegaard delta over the family of
rate points (one checkpoint each, step 1). This reads the shipped base models' settings
files — at the working tree, or at git revisions (``--revs``) — and gives, from the
measurements their calibration recorded (bpp and PSNR per configuration, real bitstreams,
the held-out images named in the file), the BD (pchip, rate points on both curves' Pareto
fronts, :func:`qft.eval.bdrate.front_bd_rate`) of each method's pick against plain USQ and
against USQ with the pick's decoder target, both at step 1. No image is coded: it is the
dev-set counterpart of ``qft report``'s BD, in seconds.

    python benchmarks/calibration_family_bd.py --revs HEAD~1 HEAD --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time

from pathlib import Path

from qft.eval.bdrate import front_bd_rate
from qft.files import atomic_write
from qft.models.zoo import base_entries
from qft.settings import settings_path

ROOT = Path(__file__).resolve().parents[1]


def _settings(name: str, rev: str | None) -> dict:
    path = settings_path(name)
    if rev is None:
        return json.loads(path.read_text())
    blob = subprocess.check_output(["git", "show", f"{rev}:{path.relative_to(ROOT).as_posix()}"], cwd=ROOT)
    return json.loads(blob)


def _point(grid: list[dict], method: str, pick: dict) -> tuple[float, float]:
    """``(bpp, PSNR)`` of the grid entry of ``method`` with ``pick``'s step, λ multiplier,
    weights, target and plain rows."""
    keys = ("step", "lambda_mult", "weights", "target")
    key = (method, *(str(pick[k]) for k in keys), pick.get("plain_rows", 0))
    g = next(g for g in grid if (g["method"], *(str(g[k]) for k in keys), g.get("plain_rows", 0)) == key)
    return g["bpp"], g["psnr"]


def family_bd(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """BD-rate (pchip, %) of ``test`` vs ``anchor`` over the rate points on both fronts."""
    return front_bd_rate(anchor, test)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revs", nargs="+", default=[None], help="git revisions (default: the working tree)")
    p.add_argument("--method", default="tcq8")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    names = [Path(e["file"]).stem for e in base_entries()]
    out = {"benchmark": "calibration_family_bd", "models": names, "method": args.method, "by_rev": {}}
    for rev in args.revs:
        usq, usq_t, pick, picks = [], [], [], []
        for name in names:
            s = _settings(name, rev)
            grid, m = s["calibration"]["grid"], s["methods"][args.method]
            usq_pick = {"step": 1.0, "lambda_mult": 0.0, "weights": "none"}
            usq.append(_point(grid, "usq", usq_pick | {"target": 0.0}))
            usq_t.append(_point(grid, "usq", usq_pick | {"target": m["target"]}))
            pick.append(_point(grid, args.method, m))
            picks.append({k: m.get(k, 0) for k in ("step", "lambda_mult", "weights", "target", "plain_rows")})
        row = {
            "picks": picks,
            "images": s["calibration"]["images"],
            "usq_target_vs_usq": family_bd(usq, usq_t),
            "pick_vs_usq": family_bd(usq, pick),
            "pick_vs_usq_target": family_bd(usq_t, pick),
        }
        out["by_rev"][rev or "working tree"] = row
        print(rev or "working tree", {k: round(v, 2) for k, v in row.items() if isinstance(v, float)}, flush=True)
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if args.json:
        atomic_write(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
