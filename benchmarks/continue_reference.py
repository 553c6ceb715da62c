"""Continue the shipped reference models on a GPU for a fixed wall-clock budget.

The shipped models trained 1,500–3,600 CPU steps (batch 8, 128² crops); issue 4/9's
question is how TCQ's gain grows as the base converges. All shipped rate points train side
by side, one ``qft train recipes/reference/mbt2018-mean-continue-gpu.yaml --init <shipped>``
process each: a 60-step probe measures the step time with all of them running, then each
resumes with the step count that fills the budget (so its learning-rate decay at 85 % is
reached), and a point that has not finished at the deadline stops at its last checkpoint.
The weights are exported as fp16 state_dicts ``<out>/mbt2018-mean-<λ>-continued.pth``
beside ``continue.json`` (steps, step time, wall time, validation history per point).
With ``--init-dir`` a further round starts from an earlier round's exported weights.

::

    python benchmarks/continue_reference.py --seconds 420 --out runs/reference/continue
    python benchmarks/continue_reference.py --seconds 420 --init-dir runs/reference/continue \
        --out runs/reference/continue-2   # a further round from the last one's weights
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from pathlib import Path

import torch
import yaml

from qft.files import atomic_write
from qft.models import create_model, load_weights
from qft.models.zoo import base_entries
from qft.train.checkpoint import export_state_dict
from qft.train.recipe import lambda_tag, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "reference" / "mbt2018-mean-continue-gpu.yaml"
PROBE = 60


def _exported(folder: Path, lmbda: float) -> Path:
    """The fp16 weights a run exports for ``lmbda`` (and ``--init-dir`` reads back)."""
    return folder / f"mbt2018-mean-{lmbda:g}-continued.pth"


def _log(out: Path, lmbda: float) -> list[dict]:
    path = out / lambda_tag(lmbda) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, required=True, help="wall-clock budget")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reference" / "continue")
    p.add_argument("--recipe", type=Path, default=RECIPE, help="training recipe (N and M of the shipped models)")
    p.add_argument("--data", help="BSDS500 root (default: the recipe's)")
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument(
        "--init-dir",
        type=Path,
        help="start from an earlier run's <dir>/mbt2018-mean-<λ>-continued.pth instead of the shipped models",
    )
    args = p.parse_args()
    deadline = time.monotonic() + args.seconds
    args.out.mkdir(parents=True, exist_ok=True)

    raw = yaml.safe_load(args.recipe.read_text())
    root = Path(args.data) if args.data else ROOT / raw["data"]["root"]
    raw["data"]["root"] = str(root.resolve())
    recipe_path = args.out / args.recipe.name
    recipe_path.write_text(yaml.safe_dump(raw))
    bases = {e["lambda"]: Path(e["file"]).stem for e in base_entries()}
    if args.init_dir:
        bases = {lam: str(_exported(args.init_dir, lam).resolve()) for lam in bases}
        missing = [n for n in bases.values() if not Path(n).is_file()]
        if missing:
            sys.exit(f"--init-dir lacks {', '.join(missing)}: give the --out folder of an earlier run")

    def launch(lmbda: float, name: str, *extra: str) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "qft",
            "train",
            str(recipe_path),
            "--lambda",
            f"{lmbda:g}",
            "--init",
            name,
            "--out",
            str(args.out),
            "--device",
            args.device,
            "--no-progress",
            *extra,
        ]
        with open(args.out / f"{lambda_tag(lmbda)}.out", "a") as log:  # the child keeps its copy
            return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    probe = [launch(lam, n, "--warm-steps", "1000000", "--stop-after", str(PROBE)) for lam, n in bases.items()]
    for proc in probe:
        proc.wait()
    step_s = {}
    for lmbda in bases:
        rows = [e for e in _log(args.out, lmbda) if e["kind"] == "train"]
        if len(rows) < 2:
            sys.exit(f"probe of {lmbda:g} failed: see {args.out / (lambda_tag(lmbda) + '.out')}")
        a, b = rows[-2], rows[-1]  # steady state: past the first log window
        step_s[lmbda] = (b["wall_time_s"] - a["wall_time_s"]) / (b["step"] - a["step"])
    left = deadline - time.monotonic() - 30  # 30 s: process start-up and export
    steps = PROBE + max(0, int(0.9 * left / max(step_s.values())))
    procs = {}
    if steps > PROBE:  # else the budget ended with the probe: export the probe's weights
        procs = {lam: launch(lam, n, "--resume", "--warm-steps", str(steps)) for lam, n in bases.items()}
    while time.monotonic() < deadline - 15 and any(p.poll() is None for p in procs.values()):
        time.sleep(2)
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
            proc.wait()

    recipe = load_recipe(recipe_path)
    points = {}
    for lmbda in bases:
        ckpt = torch.load(args.out / lambda_tag(lmbda) / "checkpoint.pth", map_location="cpu", weights_only=True)
        model = create_model("mbt2018-mean", N=recipe.N, M=recipe.M)  # the weights come from the checkpoint
        load_weights(model, ckpt["model"], name=f"λ={lmbda:g} training checkpoint")  # CDF tables rebuilt
        state = export_state_dict(model)
        atomic_write(_exported(args.out, lmbda), lambda f, state=state: torch.save(state, f))
        val = [e for e in _log(args.out, lmbda) if e["kind"] == "val"]
        points[f"{lmbda:g}"] = {
            "init": ckpt["init"],
            "step": ckpt["step"],
            "steps": ckpt["steps"],
            "probe_step_s": step_s[lmbda],
            "wall_time_s": ckpt["wall_time_s"],
            "machine": ckpt["machine"],
            "last_val": val[-1] if val else None,
            "val_history": [{k: e[k] for k in ("step", "loss", "bpp", "psnr")} for e in val],
        }
    summary = {
        "benchmark": "continue_reference",
        "seconds": args.seconds,
        "recipe": str(args.recipe),
        "concurrent_points": len(bases),
        "points": points,
    }
    atomic_write(args.out / "continue.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: (v["step"], v["steps"]) for k, v in points.items()}))


if __name__ == "__main__":
    main()
