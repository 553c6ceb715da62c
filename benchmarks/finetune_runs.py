"""Run issue 6's finetuning matrix on the shipped reference checkpoints.

For every shipped base model (``qft/assets/checkpoints/manifest.json``, entries without
``finetuned_from``) three ``qft finetune`` runs with ``recipes/finetune/cpu.yaml``:

* ``usq``: decoder trained on USQ latents (builds the USQ latent cache),
* ``tcq8``: decoder trained on TCQ-8 latents (default Δ and λ_T, its own cache),
* ``control``: the noise-proxy control arm, reading ``y`` from the USQ cache.

Runs go to ``runs/finetune-matrix/<lambda>/<arm>/`` (ignored by git) and are skipped
when their ``model.pth`` exists, resumed when a ``checkpoint.pth`` exists. ``--workers``
processes run side by side (one torch thread each); a control run waits for its USQ run's
cache. Evaluation is ``qft report`` (recipes/report/), packaging ``qft.zoo.package``.

    python benchmarks/finetune_runs.py --steps 1500 --workers 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "qft" / "assets" / "checkpoints"
ARMS = ("usq", "tcq8", "control")


def _jobs(out: Path, steps: int, lambdas: list[float] | None) -> list[dict]:
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    jobs = []
    for entry in manifest:
        if entry.get("finetuned_from") or (lambdas and entry["lambda"] not in lambdas):
            continue
        base = out / str(entry["lambda"])
        for arm in ARMS:
            folder = base / arm
            cmd = [
                sys.executable, "-m", "qft", "finetune", "recipes/finetune/cpu.yaml",
                "-m", str(ASSETS / entry["file"]), "--lambda", str(entry["lambda"]),
                "--steps", str(steps), "--threads", "1", "--out", str(folder),
                "--no-progress",
            ]
            if arm == "control":
                cmd += ["--control", "-q", "usq", "--cache", str(base / "usq" / "cache")]
            else:
                cmd += ["-q", arm]
            if (folder / "checkpoint.pth").exists():
                cmd.append("--resume")
            jobs.append({
                "name": f"{entry['lambda']}/{arm}",
                "cmd": cmd,
                "done": folder / "model.pth",
                "needs": base / "usq" / "cache" / "meta.json" if arm == "control" else None,
                "log": folder.parent / f"{arm}.out",
            })
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-matrix")
    parser.add_argument("--lambdas", type=float, nargs="*")
    args = parser.parse_args()
    pending = [j for j in _jobs(args.out, args.steps, args.lambdas) if not j["done"].exists()]
    lock = threading.Lock()

    def take() -> dict | None:
        while True:
            with lock:
                if not pending:
                    return None
                for job in pending:
                    if job["needs"] is None or job["needs"].exists():
                        pending.remove(job)
                        return job
            time.sleep(10)

    def worker() -> None:
        while (job := take()) is not None:
            job["log"].parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(job["log"], "a") as log:
                rc = subprocess.run(job["cmd"], cwd=ROOT, stdout=log, stderr=log).returncode
            print(f"{job['name']}: rc={rc} {time.time() - t0:.0f}s", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
