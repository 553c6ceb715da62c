"""Speed-up of ``qft eval --workers N`` over one process of N threads (issue 25).

The five shipped base models, the first ``--images`` Kodak images, ``-q usq`` and
``-q tcq8`` (the default decoder target of the shipped settings), each run as a fresh
``qft eval`` process with ``--workers 1`` (torch's default threads: all cores) and
``--workers N``. Writes ``benchmarks/results/eval_workers.json`` with wall and CPU times and
the load before and after (on a shared machine the wall times are inflated, and more
processes take a larger share of a loaded machine: read them with the load).

    python benchmarks/eval_workers.py [--images 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

from pathlib import Path

from _cli import ROOT, eval_checkpoints, kodak_images  # sibling helper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["usq", "tcq8"])
    parser.add_argument("--result", default=str(ROOT / "benchmarks/results/eval_workers.json"))
    args = parser.parse_args()

    from trellis.hardware import machine_info

    from qft.models.zoo import base_entries

    models = [e["name"] for e in base_entries()]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        data = kodak_images(args.images, Path(tmp))
        for method in args.methods:
            for workers in (1, args.workers):
                out = Path(tmp) / f"{method}-{workers}.json"
                load = os.getloadavg()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                res = eval_checkpoints(models, method, data, out, workers=workers, quiet=True)["results"]
                wall = time.perf_counter() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                runs.append(
                    {
                        "method": method,
                        "workers": workers,
                        "wall_s": wall,
                        "cpu_s": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime,
                        "load_before": load,
                        "load_after": os.getloadavg(),
                        "bpp": res["bpp"],
                        "psnr-rgb": res["psnr-rgb"],
                    }
                )
                print(json.dumps(runs[-1]))
    speedup = {
        m: next(r["wall_s"] for r in runs if r["method"] == m and r["workers"] == 1)
        / next(r["wall_s"] for r in runs if r["method"] == m and r["workers"] == args.workers)
        for m in args.methods
    }
    # bitstreams are identical; the decoded images differ by the float rounding of g_s under
    # another torch thread count
    same = all(a["bpp"] == b["bpp"] for a, b in zip(runs[::2], runs[1::2]))
    psnr = max(abs(x - y) for a, b in zip(runs[::2], runs[1::2]) for x, y in zip(a["psnr-rgb"], b["psnr-rgb"]))
    record = {
        "images": args.images,
        "models": models,
        "workers": args.workers,
        "speedup": speedup,
        "identical_bitstreams": same,
        "max_psnr_difference_db": psnr,
        "runs": runs,
        "machine": machine_info(),
        "note": "shared machine: see the load; wall-time speed-ups on a loaded machine are not idle figures",
    }
    Path(args.result).write_text(json.dumps(record, indent=1))
    print(json.dumps(speedup))


if __name__ == "__main__":
    main()
