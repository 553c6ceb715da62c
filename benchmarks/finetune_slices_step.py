"""Step time of ``qft finetune`` on the models quantized anew at every step (docs/design.md,
"Finetuning the channel-slice models", "Finetuning MLIC++"): the three arms (parts
``decoder`` and ``decoder+entropy`` with the real quantizer, the control arm) and the
model's own full training step, on random models of the tiny test size and of the small
reference size (TCM N=32 M=80, CCA M=80, MLIC++ N=64 M=80).

Each measured step is what :func:`qft.finetune.finetune` runs per step: the batch
(:func:`qft.finetune.slices.image_batch`), the objective's forward (frozen g_a/h_a, step by
step quantization, LRP, g_s) and backward, clipping and Adam. The full training step is
the model's own ``forward`` with the RD loss and both optimisers, as ``qft train`` runs it.
Steps alternate between the loops in rounds; medians after a warm-up (the first TCQ call
compiles Numba kernels). One torch thread; the load average is recorded: on the shared
2-core VM the figures are slower than on an idle machine.

    python benchmarks/finetune_slices_step.py --out benchmarks/results/finetune_slices_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from pathlib import Path

import numpy as np
import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.files import atomic_write
from qft.finetune import SliceObjective, trainable_parameters
from qft.finetune.slices import image_batch
from qft.models import create_model
from qft.settings import default_lambda, default_step
from qft.threads import set_threads

SIZES = {
    "tcm-tiny": ("tcm", {"N": 32, "M": 20, "Z": 8, "attn_dim": 16, "cc_dims": [16, 8]}),
    "tcm-small": ("tcm", {"N": 32, "M": 80}),
    "cca-small": (
        "cca",
        {
            "M": 80,
            "slices": [8, 8, 16, 24, 24],
            "ae_dim": [48, 64, 80],
            "ae_layers": [1, 1, 1],
            "em_dim": 64,
            "em_layers": 1,
            "z_dim": 48,
            "cc_dim": [64, 48],
        },
    ),
    "mlicpp-small": (
        "mlicpp",
        {"N": 64, "M": 80, "ep_hidden": [96, 64, 48], "cc_hidden": [64, 48], "lrp_hidden": [64, 48]},
    ),
}
ARMS = {
    "decoder": ("decoder", False),
    "decoder+entropy": ("decoder+entropy", False),
    "control": ("decoder+entropy", True),
}


def _arm_step(model, arm: str, quantizer: Quantizer, images, batch: int, crop: int):
    parts, control = ARMS[arm]
    params = trainable_parameters(model, parts)
    objective = SliceObjective(model, parts, control, 0.013, quantizer)
    opt = torch.optim.Adam(params, lr=1e-5)

    def step(s: int) -> float:
        t = time.perf_counter()
        b = image_batch(images, 0, s, batch, crop, range(batch), objective.noise_channels)
        opt.zero_grad(set_to_none=True)
        objective(b)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.perf_counter() - t

    return step


def _full_step(model, images, batch: int, crop: int):
    from qft.train.data import sample_batch

    model.requires_grad_(True)
    aux = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    main = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    opt, aux_opt = torch.optim.Adam(main, lr=1e-5), torch.optim.Adam(aux, lr=1e-4)

    def step(s: int) -> float:
        t = time.perf_counter()
        x = sample_batch(images, 0, s, batch, crop)
        opt.zero_grad(set_to_none=True)
        aux_opt.zero_grad(set_to_none=True)
        out = model(x)
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        bpp = sum(-torch.log2(v).sum() for v in out["likelihoods"].values()) / pixels
        (0.013 * 255**2 * torch.mean((out["x_hat"] - x) ** 2) + bpp).backward()
        torch.nn.utils.clip_grad_norm_(main, 1.0)
        opt.step()
        model.aux_loss().backward()
        aux_opt.step()
        return time.perf_counter() - t

    return step


def measure(name: str, batch: int, crop: int, rounds: int, warmup: int) -> dict:
    arch, params = SIZES[name]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)]
    model = create_model(arch, seed=0, **params)
    model.train()
    quantizer = Quantizer("tcq8", step=default_step("tcq8"), lam=default_lambda("tcq8", default_step("tcq8")))
    # each loop gets its own copy: the arms train different parameters
    loops = {
        arm: _arm_step(create_model(arch, seed=0, **params).train(), arm, quantizer, images, batch, crop)
        for arm in ARMS
    }
    loops["full training step"] = _full_step(model, images, batch, crop)
    times = {k: [] for k in loops}
    for r in range(warmup + rounds):
        for k, step in loops.items():
            dt = step(r)
            if r >= warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    full = med["full training step"]
    return {
        "model": name,
        "arch": arch,
        "params": params,
        "weights_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "crop": crop,
        "rounds": rounds,
        "median_step_s": med,
        "ratio_to_full_step": {k: v / full for k, v in med.items()},
        "minutes_per_500_steps": {k: 500 * v / 60 for k, v in med.items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_slices_step.json"))
    args = p.parse_args(argv)
    set_threads(1)
    load_before = os.getloadavg()
    results = [measure(m, args.batch, args.crop, args.rounds, args.warmup) for m in args.models]
    record = {
        "benchmark": "finetune_slices_step",
        "argv": sys.argv[1:],
        "threads": 1,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "note": "shared 2-core VM, other jobs running: the load average says how loaded",
        "machine": machine_info(),
        "torch": torch.__version__,
        "results": results,
    }
    atomic_write(args.out, json.dumps(record, indent=1) + "\n")
    for r in results:
        print(r["model"], {k: round(v, 3) for k, v in r["median_step_s"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
