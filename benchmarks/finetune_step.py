"""Step time of cached decoder-only finetuning against a full forward/backward.

Finetuning the decoder on cached quantized latents (``qft finetune``, parts ``decoder``)
does per step: crops from the memory-mapped latent cache, ``g_s`` forward and backward,
Adam on ``g_s``. The reference is one step of conventional training as
:mod:`qft.train.loop` runs it: all four transforms and both entropy models forward,
``λ·255²·MSE + bpp`` backward, Adam on the main parameters and the aux step. Both use the
same model, batch and crop; the images are synthetic (the timing does not depend on their
content) and the cache is built once with TCQ-8 before timing. With ``--device cuda`` all
loops run as ``qft finetune`` and ``qft train`` run there: bf16 autocast on the
transforms, channels_last, the GPU synchronised around each timed step. Steps alternate between
the loops in blocks so that a change of machine load affects all of them.

Two more loops show where the ratio's floor lies: ``g_s`` alone (forward and backward on
the crops' latents without decoding context, no optimizer) and ``g_a`` alone (forward
and backward on the image crops). The cached step cannot cost less than the first; the
full step holds both.

::

    python benchmarks/finetune_step.py --N 64 --M 96 --batch 8 --crop 128 --json benchmarks/results/finetune_step.json
    python benchmarks/finetune_step.py --device cuda --N 128 --M 192 --batch 16 --crop 256 --steps 50 \\
        --json benchmarks/results/finetune_step_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from compressai.losses import RateDistortionLoss

from trellis import Quantizer

from qft.finetune import (
    FinetuneObjective,
    LatentCache,
    cache_identity,
    trainable_parameters,
)
from qft.finetune.cache import images_digest
from qft.finetune.objective import (
    G_S_REACH,
    assemble_batch,
    batch_to_device,
    sample_crops,
)
from qft.models import create_model
from qft.settings import default_lambda, default_step
from qft.train.data import sample_batch
from qft.train.loop import rd_forward, transforms_autocast
from qft.train.scaffold import machine_description, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--M", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--images", type=int, default=8, help="synthetic images of 2 x 3 crops")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = device.type == "cuda"
    layout = torch.channels_last if amp else torch.contiguous_format
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(2 * args.crop, 3 * args.crop, 3), dtype=np.uint8) for _ in range(args.images)]
    model = create_model("mbt2018-mean", N=args.N, M=args.M, seed=0)
    model.update(force=True)
    entropy, lmbda = "mean-scale-hyperprior", 0.013
    q = Quantizer(
        "tcq8",
        step=default_step("tcq8"),
        lam=default_lambda("tcq8", default_step("tcq8")),
    )

    with tempfile.TemporaryDirectory() as tmp:
        identity = cache_identity(model, "mbt2018-mean", entropy, q, images_digest(images))
        t = time.perf_counter()
        cache = LatentCache.build(
            f"{tmp}/cache",
            identity,
            model.eval(),
            entropy,
            q,
            images,
            torch.device("cpu"),
            False,
        )
        build_s = time.perf_counter() - t
        torch.set_num_threads(args.threads)

        model.to(device, memory_format=layout)
        ft = FinetuneObjective(model, entropy, "decoder", False, lmbda, amp)
        ft_opt = torch.optim.Adam(trainable_parameters(model, "decoder"), lr=5e-5)
        full_model = create_model("mbt2018-mean", N=args.N, M=args.M, seed=0).train().to(device, memory_format=layout)
        main_p = [p for n, p in full_model.named_parameters() if not n.endswith(".quantiles")]
        aux_p = [p for n, p in full_model.named_parameters() if n.endswith(".quantiles")]
        opt, aux_opt = torch.optim.Adam(main_p, lr=1e-4), torch.optim.Adam(aux_p, lr=1e-3)
        criterion = RateDistortionLoss(lmbda=lmbda)

        size = args.crop // 16 + 2 * G_S_REACH  # crop + decoding context

        def finetune_step(step: int) -> None:
            picks = sample_crops(cache, 0, step, args.batch, size, 1)
            batch = batch_to_device(
                assemble_batch(cache, picks, range(args.batch), size, ft.fields, q, 0, step),
                device,
                amp,
            )
            ft_opt.zero_grad(set_to_none=True)
            ft(batch)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(ft_opt.param_groups[0]["params"], 1.0)
            ft_opt.step()

        def image_batch(step: int) -> torch.Tensor:
            x = sample_batch(images, 0, step, args.batch, args.crop)
            return x.to(device, memory_format=layout)

        def full_step(step: int) -> None:
            x = image_batch(step)
            opt.zero_grad(set_to_none=True)
            aux_opt.zero_grad(set_to_none=True)
            criterion(rd_forward(full_model, x, amp), x)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(main_p, 1.0)
            opt.step()
            full_model.aux_loss().backward()
            aux_opt.step()

        def g_s_alone(step: int) -> None:
            picks = sample_crops(cache, 0, step, args.batch, size, 1)
            batch = assemble_batch(cache, picks, range(args.batch), size, ft.fields, q, 0, step)
            y_hat = batch["y_hat"][..., G_S_REACH:-G_S_REACH, G_S_REACH:-G_S_REACH]
            y_hat = y_hat.to(device, memory_format=layout)
            model.g_s.zero_grad(set_to_none=True)
            with transforms_autocast(amp):
                x_hat = model.g_s(y_hat)
            x_hat.float().square().mean().backward()

        def g_a_alone(step: int) -> None:
            x = image_batch(step)
            full_model.g_a.zero_grad(set_to_none=True)
            with transforms_autocast(amp):
                y = full_model.g_a(x)
            y.float().square().mean().backward()

        loops = {
            "finetune": finetune_step,
            "full": full_step,
            "g_s_alone": g_s_alone,
            "g_a_alone": g_a_alone,
        }
        times = {name: [] for name in loops}

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for f in loops.values():  # warm-up
            for s in range(2):
                f(s)
        load_before = os.getloadavg()
        for block in range(0, args.steps, 5):
            for name, f in loops.items():
                for s in range(block, min(block + 5, args.steps)):
                    sync()
                    t = time.perf_counter()
                    f(s)
                    sync()
                    times[name].append(time.perf_counter() - t)
        load_after = os.getloadavg()

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "finetune_step",
        "model": {"arch": "mbt2018-mean", "N": args.N, "M": args.M},
        "batch": args.batch,
        "crop": args.crop,
        "quantizer": "tcq8",
        "threads": args.threads,
        "device": str(device),
        "amp_bf16_channels_last": amp,
        "cache_build_s": build_s,
        "cache_images": args.images,
        "step_s_median": med,
        "step_s_all": times,
        "images_per_s": {k: args.batch / v for k, v in med.items()},
        "ratio_finetune_over_full": med["finetune"] / med["full"],
        "ratio_g_s_alone_over_full": med["g_s_alone"] / med["full"],
        "ratio_g_s_alone_over_g_a_alone": med["g_s_alone"] / med["g_a_alone"],
        "machine": machine_description(device, args.threads, amp),
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "step_s_median",
                    "images_per_s",
                    "ratio_finetune_over_full",
                    "ratio_g_s_alone_over_full",
                    "ratio_g_s_alone_over_g_a_alone",
                    "load_average_1_5_15",
                )
            }
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
