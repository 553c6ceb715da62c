"""Decoder + hyper-decoder finetuning: fixed indices vs re-quantizing every K steps (issue 6).

With fixed indices (``qft finetune --parts decoder+hyperdecoder``) the trained ``h_s``
moves ``μ`` and ``σ`` but the indices, hence the latents the decoder sees, stay those the
*base* ``h_s`` produced; ``μ`` acts as a learned offset (docs/design.md, "Losses"). The
alternative re-quantizes the training set with the current ``h_s`` every K steps. This
experiment runs it as ``--stages`` consecutive runs of ``steps / stages`` steps, each
starting from the previous stage's model with a latent cache rebuilt from it (so TCQ
sees the new ``μ``, ``σ``); Adam's moments restart at every stage. The fixed-index arm
is ``benchmarks/finetune_runs.py --parts decoder+hyperdecoder`` (same steps, lr, data,
quantizer). Both are compared on held-out BSDS500 validation images (a design decision,
so never on Kodak or Tecnick) with ``qft report``: each finetuned model against the base
under the same TCQ-8 (swept), real bitstreams.

    python benchmarks/finetune_runs.py --parts decoder decoder+hyperdecoder --lambdas 0.013 0.025
    python benchmarks/requantize.py --lambdas 0.013 0.025 --json benchmarks/results/requantize.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from pathlib import Path

from finetune_runs import QUANTIZERS, experiment_report  # the fixed-index arm's TCQ-8 (a sibling script)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.013, 0.025])
    p.add_argument("--steps", type=int, default=600, help="total steps (as the fixed-index arm)")
    p.add_argument("--stages", type=int, default=3, help="re-quantizations: one per stage")
    p.add_argument("--matrix", type=Path, default=ROOT / "runs" / "finetune-matrix",
                   help="finetune_runs.py output (the fixed-index arm and the base TCQ-8 cache)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "requantize")
    p.add_argument("--data", default="../shared/data/bsds500/val")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--json", type=Path, help="copy the report's bdrate.json here")
    args = p.parse_args()

    finals = []
    for lmbda in args.lambdas:
        model = f"mbt2018-mean-{lmbda}"
        for stage in range(1, args.stages + 1):
            out = args.out / str(lmbda) / f"stage{stage}"
            if not (out / "model.pth").exists():
                cmd = [sys.executable, "-m", "qft", "finetune", "recipes/finetune/cpu.yaml", "-m", model,
                       "--lambda", str(lmbda), "--steps", str(args.steps // args.stages),
                       "--parts", "decoder+hyperdecoder", *QUANTIZERS["tcq8"], "--threads", "1", "--out", str(out),
                       "--no-progress"]
                if stage == 1:  # the base model's latents: the fixed-index arm's cache
                    cmd += ["--cache", str(args.matrix / str(lmbda) / "tcq8" / "cache")]
                if (out / "checkpoint.pth").exists():
                    cmd.append("--resume")
                print(" ".join(cmd), flush=True)
                subprocess.run(cmd, cwd=ROOT, check=True)
            model = str(out / "model.pth")
        finals.append(model)

    bases = [f"mbt2018-mean-{lmbda}" for lmbda in args.lambdas]
    fixed = [str(args.matrix / str(lmbda) / "tcq8-dh" / "model.pth") for lmbda in args.lambdas]
    experiment_report("requantize", [
        {"label": "base", "checkpoints": bases, "quantizers": ["usq"]},
        {"label": "ft-tcq8-fixed-indices", "checkpoints": fixed, "quantizers": ["tcq8"]},
        {"label": f"ft-tcq8-requantized-{args.stages}x", "checkpoints": finals, "quantizers": ["tcq8"]},
    ], args, {"lambdas": args.lambdas, "steps": args.steps, "stages": args.stages})


if __name__ == "__main__":
    main()
