"""Time of ``qft quickstart`` as a user runs it: a fresh process, an empty output folder.

Writes ``benchmarks/results/quickstart_time.json``: wall time, the CPU time of the
process (user + sys, children included), the load average before and after (the machine
may be shared: then the wall time is not the figure, the CPU time bounds it), whether the
Numba cache was warm, and the printed table.

    python benchmarks/quickstart_time.py [--images N] [-- extra quickstart options]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTE = (
    "cpu_s (all processes, user + sys) bounds the wall time on an idle machine from above (the run barely waits "
    "on disk), cpu_s / cores from below; on a shared machine (see the load) the wall time is inflated by the "
    "other jobs and CPU time somewhat too"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int)
    parser.add_argument("--result", default=str(ROOT / "benchmarks/results/quickstart_time.json"))
    args, extra = parser.parse_known_args()

    from trellis.hardware import machine_info

    numba_warm = any((ROOT / "trellis" / "__pycache__").glob("*.nbi"))
    with tempfile.TemporaryDirectory(prefix="qft-quickstart-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "qft",
            "quickstart",
            "--out",
            str(Path(tmp) / "out"),
            "--no-progress",
            *([f"--images={args.images}"] if args.images else []),
            *[e for e in extra if e != "--"],
        ]
        load_before = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
    if proc.returncode:
        sys.exit(proc.stderr)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = {
        "command": " ".join(["qft", *cmd[3:]]),
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_s_per_core_of_2": cpu / 2,
        "load_before": load_before,
        "load_after": load_after,
        "numba_cache_warm": numba_warm,
        "machine": machine_info(),
        "note": NOTE,
        "stdout": proc.stdout,
    }
    Path(args.result).write_text(json.dumps(record, indent=1))
    print(proc.stdout)
    print(f"wall {wall:.1f} s, CPU {cpu:.1f} s, load {load_before} -> {load_after}")


if __name__ == "__main__":
    main()
