"""The family BD of calibrated picks on their own calibration images (issue 24).

``qft calibrate`` scores each configuration against the checkpoint's *own* step sweep (a
local measure); the reports judge a quantizer by the Bjøntegaard delta over the family of
rate points (one checkpoint each, step 1). This reads the shipped base models' settings
files — at the working tree, or at git revisions (``--revs``) — and gives, from the
measurements their calibration recorded (bpp and PSNR per configuration, real bitstreams,
the held-out images named in the file), the BD (pchip, rate points on both curves' Pareto
fronts, :func:`qft.eval.bdrate.bd_rate`) of each method's pick against plain USQ and
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

from qft.eval.bdrate import bd_rate, pareto_front
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


def _point(grid: list[dict], method: str, step: float, mult: float, weights: str, target) -> tuple[float, float]:
    key = (method, step, mult, weights, str(target))
    g = next(g for g in grid if (g["method"], g["step"], g["lambda_mult"], g["weights"], str(g["target"])) == key)
    return g["bpp"], g["psnr"]


def family_bd(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> float:
    """BD-rate (pchip, %) of ``test`` vs ``anchor`` over the rate points on both fronts."""
    sel = sorted(
        set(pareto_front([p[0] for p in anchor], [p[1] for p in anchor]))
        & set(pareto_front([p[0] for p in test], [p[1] for p in test]))
    )
    a = {"bpp": [anchor[j][0] for j in sel], "psnr-rgb": [anchor[j][1] for j in sel]}
    t = {"bpp": [test[j][0] for j in sel], "psnr-rgb": [test[j][1] for j in sel]}
    return bd_rate(a, t, "psnr-rgb")["pchip"]


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
            usq.append(_point(grid, "usq", 1.0, 0.0, "none", 0.0))
            usq_t.append(_point(grid, "usq", 1.0, 0.0, "none", m["target"]))
            pick.append(_point(grid, args.method, m["step"], m["lambda_mult"], m["weights"], m["target"]))
            picks.append({k: m[k] for k in ("step", "lambda_mult", "weights", "target")})
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
