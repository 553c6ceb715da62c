"""TCQ-8 vs USQ on checkpoints qft has never seen: the out-of-the-box default (issue 25).

The five shipped base models are re-saved outside the package as training dicts
``{"epoch", "state_dict", "optimizer"}`` — no λ recorded, no settings file, not in the
assets folder — and evaluated with the plain CLI on the 24 bundled Kodak images (real
bitstreams)::

    qft eval -m m1.pth.tar … m5.pth.tar -q usq  --data qft/assets/kodak -o usq.json
    qft eval -m m1.pth.tar … m5.pth.tar -q tcq8 --data qft/assets/kodak -o tcq8.json
    qft bdrate usq.json tcq8.json -o bd.json

(and ``tcq8 --target 0``: the default before issue 25). Writes
``benchmarks/results/user_checkpoint.json`` with the BD-rates, the resolved quantizers, wall
times and the machine's load.

    python benchmarks/user_checkpoint.py [--images N] [--out runs/user_checkpoint]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pathlib import Path

import torch

from _cli import ROOT, eval_checkpoints, kodak_images, run_qft  # sibling helper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, help="first N Kodak images (default: all 24)")
    parser.add_argument("--out", default="runs/user_checkpoint", help="work folder (outside the package)")
    parser.add_argument("--rows", nargs="+", default=["usq", "tcq8", "tcq8-t0"])
    parser.add_argument("--workers", type=int, default=1, help="qft eval --workers")
    parser.add_argument("--result", default=str(ROOT / "benchmarks/results/user_checkpoint.json"))
    args = parser.parse_args()

    from trellis.hardware import machine_info

    from qft.models.zoo import ASSETS, base_entries

    out = Path(args.out).resolve()
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    data = kodak_images(args.images, out)
    files = []
    for e in base_entries():
        path = models / f"mine-{e['lambda']}.pth.tar"
        if not path.exists():
            state = torch.load(ASSETS / e["file"], weights_only=True)
            torch.save({"epoch": 99, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
        files.append(str(path))
    assert not any(Path(f).with_name(Path(f).name.removesuffix(".pth.tar") + ".qft.json").exists() for f in files)

    load_before = os.getloadavg()
    runs = {}
    for row in args.rows:
        method, _, target = row.partition("-t")
        extra = ["--target", target] if target else []
        t0 = time.perf_counter()
        results = eval_checkpoints(files, method, data, out / f"{row}.json", *extra, workers=args.workers)
        runs[row] = {"wall_s": time.perf_counter() - t0, "load_after": os.getloadavg(), "results": results}
    bd = {}
    for row in args.rows[1:]:
        bd_file = out / f"bd-{row}.json"
        run_qft("bdrate", out / "usq.json", out / f"{row}.json", "-o", bd_file)
        bd[row] = json.loads(bd_file.read_text())["bd_rate"]
    record = {
        "what": "qft eval on the shipped base models re-saved as training dicts (no λ, no settings file), "
        "outside the package; BD vs -q usq (qft bdrate, psnr-rgb)",
        "images": args.images or 24,
        "checkpoints": [Path(f).name for f in files],
        "bd_rate_vs_usq": bd,
        "quantizers": {row: r["results"]["qft"]["checkpoints"][0]["quantizer"] for row, r in runs.items()},
        "curves": {row: {k: r["results"]["results"][k] for k in ("bpp", "psnr-rgb")} for row, r in runs.items()},
        "wall_s": {row: r["wall_s"] for row, r in runs.items()},
        "load_before": load_before,
        "load_after": {row: r["load_after"] for row, r in runs.items()},
        "note": "machine shared with other jobs while measured: wall times are not speed figures",
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
    }
    Path(args.result).write_text(json.dumps(record, indent=1))
    print(json.dumps(bd, indent=1))


if __name__ == "__main__":
    main()
