"""Run issue 6's finetuning matrix on the shipped reference checkpoints.

For every shipped base model (``qft/assets/checkpoints/manifest.json``, entries without
``finetuned_from``) four ``qft finetune`` runs with ``recipes/finetune/cpu.yaml``
(``--arms`` picks some):

* ``usq``: decoder trained on USQ latents (builds the USQ latent cache),
* ``tcq4``, ``tcq8``: decoder trained on TCQ-4 / TCQ-8 latents, Δ 0.7 and λ multiplier
  0.025, unweighted (the global rule, the same at every rate point; the finetuned model
  records it and is evaluated with it),
* ``control``: the noise-proxy control arm, reading ``y`` from the USQ cache.

Runs go to ``runs/finetune-matrix/<lambda>/<arm>/`` (ignored by git) and are skipped
when their ``model.pth`` exists, resumed when a ``checkpoint.pth`` exists. ``--workers``
processes run side by side (one torch thread each); a control run waits for its USQ run's
cache. ``--parts decoder decoder+hyperdecoder`` adds the runs that train ``h_s`` too, in
``<arm>-dh/``, reading the decoder-only runs' caches (the cache does not depend on the part
set); with ``--requantize-every K`` the quantized ones re-quantize the training set with
their current ``h_s`` every K steps, in ``<arm>-dh-rqK/``. Evaluation is ``qft report`` (recipes/report/).

``--package`` writes the finished runs (USQ, TCQ-4, TCQ-8 and the control arm) into the shipped checkpoints as
fp16 delta checkpoints of their base (``qft.models.zoo.write_delta``: only ``g_s``, or
``g_s`` and ``h_s``) named ``<base>-ft-<method>.pth``, with manifest entries carrying
``finetuned_from``, ``quantizer`` and ``parts``.

    python benchmarks/finetune_runs.py --steps 600 --workers 2
    python benchmarks/finetune_runs.py --package
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
ARMS = ("usq", "tcq4", "tcq8", "control")
# TCQ with the global rule, unweighted, at every rate point: the setting every shipped
# ft-tcq4/ft-tcq8 model was trained with (docs/design.md, "Finetuning")
QUANTIZERS = {
    "usq": ["-q", "usq"],
    "tcq4": ["-q", "tcq4", "--step", "0.7", "--lambda-mult", "0.025", "--weights", "none"],
    "tcq8": ["-q", "tcq8", "--step", "0.7", "--lambda-mult", "0.025", "--weights", "none"],
    "control": ["-q", "usq"],
}


def _jobs(
    out: Path, steps: int, lambdas: list[float] | None, part_sets: list[str], arms: list[str], requantize: int
) -> list[dict]:
    jobs = []
    for parts in part_sets:
        for entry in base_entries():
            if lambdas and entry["lambda"] not in lambdas:
                continue
            base = out / str(entry["lambda"])
            for arm in arms:
                # the control arm has no indices to re-quantize
                rq = requantize if parts != "decoder" and arm != "control" else 0
                folder = base / (arm + ("" if parts == "decoder" else "-dh") + (f"-rq{rq}" if rq else ""))
                cmd = [
                    sys.executable, "-m", "qft", "finetune", "recipes/finetune/cpu.yaml",
                    "-m", str(ASSETS / entry["file"]), "--lambda", str(entry["lambda"]),
                    "--steps", str(steps), "--threads", "1", "--out", str(folder),
                    "--parts", parts, "--no-progress",
                    *QUANTIZERS[arm],
                ]
                if rq:
                    cmd += ["--requantize-every", str(rq)]
                # the cache does not depend on the part set: the control arm and the
                # decoder+hyperdecoder arms read the decoder-only runs' caches
                source = "usq" if arm == "control" else arm
                shared = arm == "control" or parts != "decoder"
                if arm == "control":
                    cmd.append("--control")
                if shared:
                    cmd += ["--cache", str(base / source / "cache")]
                if (folder / "checkpoint.pth").exists():
                    cmd.append("--resume")
                jobs.append({
                    "name": f"{entry['lambda']}/{folder.name}",
                    "cmd": cmd,
                    "done": folder / "model.pth",
                    "needs": base / source / "cache" / "meta.json" if shared else None,
                    "log": folder.parent / f"{folder.name}.out",
                })
    return jobs


def experiment_report(name: str, models: list[dict], args: argparse.Namespace, settings: dict) -> None:
    """Evaluate a design experiment beside this script: ``qft report`` of the model rows
    ``models`` on ``args.images`` images of ``args.data`` (held-out validation images),
    USQ and TCQ-8 (each checkpoint's own settings), PSNR only, into ``args.out/report``
    (recipe in ``args.out/report.yaml``); with ``args.json``, copy its ``bdrate.json``
    there with the experiment's ``settings``, the recipe and the command."""
    recipe = {"name": name, "data": args.data, "images": args.images, "out": str(args.out / "report"),
              "models": models, "quantizers": ["usq", "tcq8"], "ms_ssim": False}
    path = args.out / "report.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    subprocess.run([sys.executable, "-m", "qft", "report", str(path), "--no-progress"], cwd=ROOT, check=True)
    if args.json:
        summary = json.loads((args.out / "report" / "bdrate.json").read_text())
        summary["experiment"] = {**settings, "recipe": recipe, "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.json}")


def package_run(model_path: Path, entry: dict, name: str, stages: list[Path] = ()) -> None:
    """Ship the finished run ``model_path`` as the fp16 delta checkpoint ``name`` of the
    shipped base ``entry`` (only ``g_s``, or ``g_s`` and ``h_s``) and add its manifest entry
    (``finetuned_from``, ``quantizer``, ``parts``, …). ``stages``: the earlier runs it was
    finetuned from, base side first (each checked by SHA-256 to start from the one before);
    the entry then lists every stage and counts all their steps. Skipped if already shipped."""
    import hashlib

    from qft.models import load_checkpoint
    from qft.models.zoo import write_delta

    manifest_path = ASSETS / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if not model_path.is_file() or name in {e["file"] for e in manifest}:
        return
    base = ASSETS / entry["file"]
    chain = [base, *stages, model_path]
    runs = [load_checkpoint(p) for p in chain[1:]]
    for parent, run, path in zip(chain, runs, chain[1:]):
        if run.extra["finetuned_from"] != hashlib.sha256(parent.read_bytes()).hexdigest():
            raise SystemExit(f"{path} was not finetuned from {parent}")
    ck = runs[-1]
    parts = ck.extra["parts"]
    prefixes = ("g_s.",) if parts == "decoder" else ("g_s.", "h_s.")
    summaries = [json.loads((p.parent / "summary.json").read_text()) for p in chain[1:]]
    keys = ("quantizer", "parts", "control", "lambda", "steps")
    extra = {k: ck.extra[k] for k in keys}
    if stages:
        extra["steps"] = sum(r.extra["steps"] for r in runs)
        extra["stages"] = [
            {**{k: r.extra[k] for k in keys}, "requantize_every": r.extra["finetune_recipe"].get("requantize_every", 0)}
            for r in runs
        ]
    sha = write_delta(ASSETS / name, ck.model, base, prefixes, {"finetuned_from": entry["file"], **extra})
    manifest.append({
        "file": name, "arch": entry["arch"], "lambda": entry["lambda"], "N": entry["N"], "M": entry["M"],
        "finetuned_from": entry["file"], **extra,
        "sha256": sha, "bytes": (ASSETS / name).stat().st_size,
        "dtype": "float16 delta of the base (" + ", ".join(prefixes) + ")",
        "recipe": "recipes/finetune/cpu.yaml",
        "wall_time_s": sum(x["wall_time_s"] for x in summaries), "machine": summaries[-1]["machine"],
        "train_data": "BSDS500 train+test (400 images), latents cached with the inference quantizer",
    })
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"packaged {name}: {(ASSETS / name).stat().st_size / 1e6:.2f} MB")


def base_entries() -> list[dict]:
    """The shipped base models' manifest entries (no ``finetuned_from``), by rate point."""
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    return sorted((e for e in manifest if not e.get("finetuned_from")), key=lambda e: e["lambda"])


def package(out: Path) -> None:
    """Ship the decoder-only runs of every arm as ``<base>-ft-<arm>.pth``."""
    for entry in base_entries():
        for arm in ARMS:
            package_run(out / str(entry["lambda"]) / arm / "model.pth", entry, f"{Path(entry['file']).stem}-ft-{arm}.pth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-matrix")
    parser.add_argument("--lambdas", type=float, nargs="*")
    parser.add_argument(
        "--parts", nargs="+", default=["decoder"], choices=["decoder", "decoder+hyperdecoder"],
        help="part sets to train, in this order (decoder+hyperdecoder runs go to <arm>-dh/)",
    )
    parser.add_argument(
        "--requantize-every", type=int, default=0, metavar="K",
        help="decoder+hyperdecoder runs re-quantize every K steps (in <arm>-dh-rqK/; 0: fixed indices)",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to run (default: all)")
    parser.add_argument("--package", action="store_true", help="package the finished runs into the shipped checkpoints")
    args = parser.parse_args()
    if args.package:
        package(args.out)
        return
    pending = [j for j in _jobs(args.out, args.steps, args.lambdas, args.parts, args.arms, args.requantize_every) if not j["done"].exists()]
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
