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

``--package`` ships the finished decoder-only runs (USQ, TCQ-4, TCQ-8 and the control arm)
as ``qft ship`` does (:func:`qft.finetune.ship.ship_finetune`): fp16 delta checkpoints of
their base (only ``g_s``) named ``<base>-ft-<arm>.pth`` in ``qft/assets/checkpoints``, with
manifest entries carrying ``finetuned_from``, ``quantizer`` and ``parts``.

    python benchmarks/finetune_runs.py --steps 600 --workers 2
    python benchmarks/finetune_runs.py --package
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time

from pathlib import Path

from _cli import ROOT, qft_command  # sibling helper

from qft.models.zoo import ASSETS, base_entries, read_manifest

#: the manifest's description of the training data of every shipped finetune
TRAIN_DATA = "BSDS500 train+test (400 images), latents cached with the inference quantizer"
ARMS = ("usq", "tcq4", "tcq8", "control")
# TCQ with the global rule, unweighted, at every rate point: the setting every shipped
# ft-tcq4/ft-tcq8 model was trained with (docs/design.md, "Finetuning")
QUANTIZERS = {
    "usq": ["-q", "usq"],
    "tcq4": ["-q", "tcq4", "--step", "0.7", "--lambda-mult", "0.025", "--weights", "none"],
    "tcq8": ["-q", "tcq8", "--step", "0.7", "--lambda-mult", "0.025", "--weights", "none"],
    "control": ["-q", "usq"],
}


def finetune_command(checkpoint: Path, lmbda: float, steps: int, out: Path, parts: str, *extra: str) -> list[str]:
    """The ``qft finetune`` run of ``recipes/finetune/cpu.yaml`` on one torch thread:
    ``checkpoint`` at ``lmbda``, ``steps`` steps of ``parts`` into ``out``, with the options
    ``extra`` (the quantizer's, ``--control`` …); resumed when ``out`` holds a
    ``checkpoint.pth``."""
    args = ["-m", checkpoint, "--lambda", lmbda, "--steps", steps, "--threads", "1", "--out", out, "--parts", parts]
    cmd = qft_command("finetune", "recipes/finetune/cpu.yaml", *args, "--no-progress", *extra)
    return cmd + ["--resume"] if (out / "checkpoint.pth").exists() else cmd


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
                cmd = finetune_command(ASSETS / entry["file"], entry["lambda"], steps, folder, parts, *QUANTIZERS[arm])
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
                jobs.append(
                    {
                        "name": f"{entry['lambda']}/{folder.name}",
                        "cmd": cmd,
                        "done": folder / "model.pth",
                        "needs": base / source / "cache" / "meta.json" if shared else None,
                        "log": folder.parent / f"{folder.name}.out",
                    }
                )
    return jobs


def package(out: Path) -> None:
    """Ship the finished decoder-only run of every arm as ``<base>-ft-<arm>.pth``
    (:func:`qft.finetune.ship.ship_finetune`); a name already shipped is skipped."""
    from qft.finetune.ship import ship_finetune

    shipped = {e["file"] for e in read_manifest()}
    for entry in base_entries():
        for arm in ARMS:
            run, name = out / str(entry["lambda"]) / arm, f"{Path(entry['file']).stem}-ft-{arm}"
            if (run / "model.pth").is_file() and f"{name}.pth" not in shipped:
                shipped_entry = ship_finetune([run], ASSETS / entry["file"], name, train_data=TRAIN_DATA)
                print(f"packaged {shipped_entry['file']}: {shipped_entry['bytes'] / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-matrix")
    parser.add_argument("--lambdas", type=float, nargs="*")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["decoder"],
        choices=["decoder", "decoder+hyperdecoder"],
        help="part sets to train, in this order (decoder+hyperdecoder runs go to <arm>-dh/)",
    )
    parser.add_argument(
        "--requantize-every",
        type=int,
        default=0,
        metavar="K",
        help="decoder+hyperdecoder runs re-quantize every K steps (in <arm>-dh-rqK/; 0: fixed indices)",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to run (default: all)")
    parser.add_argument("--package", action="store_true", help="package the finished runs into the shipped checkpoints")
    args = parser.parse_args()
    if args.package:
        package(args.out)
        return
    jobs = _jobs(args.out, args.steps, args.lambdas, args.parts, args.arms, args.requantize_every)
    pending = [j for j in jobs if not j["done"].exists()]
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
