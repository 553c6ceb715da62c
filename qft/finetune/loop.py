"""The finetuning loop (``qft finetune``), on one process or under ``torchrun`` (DDP).

The analysis side (``g_a``, ``h_a``, the ``EntropyBottleneck``) is frozen; the trained
parts see the latents of :class:`~qft.finetune.cache.LatentCache`, quantized once with
exactly the inference quantizer. Conventions follow :mod:`qft.train.loop`: the crops of
step ``s`` depend only on ``(seed, s)`` (and noise on ``(seed, s, element)``), so a
training checkpoint — model, Adam state, step — resumes to the same weights as an
uninterrupted run; JSON-lines log; tqdm; atomic checkpoints. With ``requantize_every``
K (decoder+hyperdecoder) the training set is quantized again every K steps with the
current ``h_s`` (its ``μ``, ``σ``), Adam's state kept; a training checkpoint records
which cache it trains on, so a resumed run reads the same latents.

Distributed: with ``WORLD_SIZE > 1`` (``torchrun --nproc_per_node=K -m qft finetune …``)
each process joins a process group (NCCL on CUDA, gloo on CPU), rank 0 builds the cache
while the others wait, every process draws the same global batch and keeps the elements
``rank, rank + K, …``; DDP averages the gradients, so K processes train as one with the
whole batch. Only rank 0 writes the log and the checkpoints.

Output layout under ``out_dir``::

    cache/          latent cache (unless another folder is given)
    cache-stepK/    the latents re-quantized at step K (``requantize_every``; the
                    latest only)
    checkpoint.pth  training state (every checkpoint_every steps, atomic)
    log.jsonl       start, train, end records
    model.pth       the finetuned model, a qft checkpoint (save_checkpoint), when done
    summary.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tqdm import tqdm

from qft.codec import HYPERPRIOR_ENTROPY, target_record
from qft.commands._options import quantizer_from_args
from qft.eval.settings import read_settings, weights_digest
from qft.errors import UserError
from qft.finetune.cache import LatentCache, cache_identity, images_digest, trim_images
from qft.finetune.objective import (
    G_S_REACH,
    FinetuneObjective,
    assemble_batch,
    batch_to_device,
    sample_crops,
)
from qft.files import remove_stale_temporaries
from qft.finetune.recipe import FinetuneRecipe
from qft.models import ARCHITECTURES, load_checkpoint, save_checkpoint
from qft.train.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint as load_training_state,
    save_atomic,
)
from qft.train.data import load_images
from qft.train.loop import _Log, _psnr, _Window, machine_description, resolve_device

__all__ = ["finetune", "trainable_parameters"]


def trainable_parameters(
    model: torch.nn.Module, parts: str
) -> list[torch.nn.Parameter]:
    """Freeze the model, then unfreeze ``g_s`` (and ``h_s`` for
    ``decoder+hyperdecoder``); returns the unfrozen parameters."""
    model.requires_grad_(False)
    modules = [model.g_s] + ([model.h_s] if parts == "decoder+hyperdecoder" else [])
    params = []
    for m in modules:
        m.requires_grad_(True)
        params += list(m.parameters())
    return params


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (
        world,
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def finetune(
    recipe: FinetuneRecipe,
    out_dir: str | Path,
    *,
    control: bool = False,
    cache_dir: str | Path | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    unsafe_load: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Finetune ``recipe.checkpoint``; returns the summary (rank 0 also writes it).

    Args:
        recipe: the validated recipe with CLI overrides applied.
        out_dir: output folder (see the module docstring).
        control: the control arm (noise proxy instead of quantized latents).
        cache_dir: latent cache folder (default ``out_dir/cache``); reused when its
            identity matches, a :class:`UserError` when it does not.
        resume: continue ``out_dir/checkpoint.pth`` instead of refusing to overwrite it.
        stop_after: stop (with a checkpoint) once this many steps are done.
        unsafe_load: allow pickled checkpoints (trusted files only).
        progress: tqdm bars on rank 0.
    """
    if recipe.checkpoint is None:
        raise UserError(
            "no checkpoint: give --checkpoint or set 'checkpoint' in the recipe"
        )
    world, rank, local_rank = _distributed()
    if recipe.batch_size % world:
        raise UserError(
            f"batch_size {recipe.batch_size} is not a multiple of the {world} processes"
        )
    torch.set_num_threads(recipe.threads)
    device = resolve_device(recipe.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _finetune(
            recipe,
            Path(out_dir),
            control=control,
            cache_dir=cache_dir,
            resume=resume,
            stop_after=stop_after,
            unsafe_load=unsafe_load,
            progress=progress and rank == 0,
            device=device,
            world=world,
            rank=rank,
        )
    finally:
        if world > 1:
            dist.destroy_process_group()


def _finetune(
    recipe: FinetuneRecipe,
    out: Path,
    *,
    control: bool,
    cache_dir: str | Path | None,
    resume: bool,
    stop_after: int | None,
    unsafe_load: bool,
    progress: bool,
    device: torch.device,
    world: int,
    rank: int,
) -> dict[str, Any]:
    """:func:`finetune` inside its process group (``world`` processes, this one ``rank``)."""
    main = rank == 0
    base = load_checkpoint(recipe.checkpoint, recipe.arch, unsafe_load=unsafe_load)
    entropy = ARCHITECTURES[base.arch].entropy
    if entropy not in HYPERPRIOR_ENTROPY:
        raise UserError(
            f"finetuning needs a hyperprior model ({', '.join(HYPERPRIOR_ENTROPY)}); "
            f"{base.arch} has a {entropy} entropy model"
        )
    lmbda = recipe.lmbda if recipe.lmbda is not None else base.extra.get("lambda")
    if not isinstance(lmbda, (int, float)) or lmbda <= 0:
        raise UserError(
            f"{recipe.checkpoint} records no λ: give --lambda (the base model's rate point)"
        )
    choice = quantizer_from_args(
        argparse.Namespace(
            quantizer=recipe.method,
            step=recipe.step,
            lambda_t=recipe.lambda_t,
            lambda_mult=recipe.lambda_mult,
            reset=recipe.reset,
            weights=recipe.weights,
            target=recipe.target,
        ),
        read_settings(base) | {"model_lambda": float(lmbda)},  # --target rd weighs by this run's λ
    )
    quantizer, weights, target = choice.quantizer, choice.weights, choice.target
    model = base.model
    amp = device.type == "cuda"

    # -- latent cache (rank 0 builds, the others wait) -------------------------------
    images = trim_images(load_images(recipe.data_root, recipe.train_splits))
    context = recipe.crop + 32 * G_S_REACH  # the crop and its context
    small = [img.shape for img in images if min(img.shape[:2]) < context]
    if small:
        raise UserError(
            f"a training image of {small[0][1]}x{small[0][0]} pixels (after cropping to "
            f"multiples of 16) is smaller than the {recipe.crop}-pixel crop with its "
            f"decoding context ({context} pixels)"
        )
    data = images_digest(images)
    requantize = recipe.requantize_every
    if requantize and control:
        raise UserError(
            "requantize_every re-quantizes the latents a quantized run trains on; the "
            "control arm trains on the noise proxy: set it to 0"
        )

    def open_cache(folder: Path, images) -> LatentCache:
        """The cache in ``folder`` for the current weights, built by rank 0 from the
        trimmed ``images`` if missing (the others wait)."""
        identity = cache_identity(model, base.arch, entropy, quantizer, data, weights, target)
        if main and not (folder / "meta.json").exists():
            LatentCache.build(
                folder,
                identity,
                model.to(device),
                entropy,
                quantizer,
                images,
                device,
                progress,
                weights=weights,
                target=target,
            )
        if world > 1:
            dist.barrier()
        return LatentCache.open(folder, identity)

    config = {
        "finetuned_from": base.sha256,
        "finetuned_from_path": str(base.path),
        "arch": base.arch,
        "params": base.params,
        "quantizer": dataclasses.asdict(quantizer)
        | ({} if weights is None else {"weights": weights_digest(weights)})
        | ({"target": target_record(target)} if target else {}),
        "parts": recipe.parts,
        "requantize_every": requantize,
        "control": control,
        "lambda": float(lmbda),
        "seed": recipe.seed,
        "batch_size": recipe.batch_size,
        "crop": recipe.crop,
        "lr": recipe.lr,
        "clip_max_norm": recipe.clip_max_norm,
        "data": data,
    }
    ckpt_path, log_path = out / "checkpoint.pth", out / "log.jsonl"
    for saved in (ckpt_path, out / "model.pth"):  # left by a run killed while saving
        if main:
            remove_stale_temporaries(saved)
    state = None
    if ckpt_path.exists():
        if not resume:
            raise UserError(
                f"{ckpt_path} exists; pass --resume to continue it or choose another --out"
            )
        state = load_training_state(ckpt_path)
        if state.get("kind") != "finetune" or state["config"] != config:
            raise UserError(
                f"{ckpt_path} was started with another checkpoint, quantizer, parts, λ or "
                "recipe than this run; choose another --out"
            )
    elif main:
        out.mkdir(parents=True, exist_ok=True)
    # cache_step: the step the latents were quantized at (0: the base model's cache,
    # built from the base weights, so before a resumed state is loaded)
    cache_step = state["cache_step"] if state else 0
    if cache_step:
        cache = LatentCache.open(out / f"cache-step{cache_step}", state["cache_identity"])
    else:
        cache = open_cache(Path(cache_dir) if cache_dir is not None else out / "cache", images)
    del images

    # -- model, optimizer, resumed state --------------------------------------------
    model.to(device)
    if amp:
        model.to(memory_format=torch.channels_last)
    params = trainable_parameters(model, recipe.parts)
    objective = FinetuneObjective(
        model, entropy, recipe.parts, control, float(lmbda), amp
    )
    objective.train()
    opt = torch.optim.Adam(params, lr=recipe.lr)
    start, wall = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, wall = state["step"], state["wall_time_s"]
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    log = (
        _Log(log_path, keep_until_step=start if ckpt_path.exists() else None)
        if main
        else None
    )
    net = objective
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if main and start < end:
        log.write(
            kind="start",
            step=start,
            steps=recipe.steps,
            device=str(device),
            world_size=world,
            **config,
        )

    t0 = time.perf_counter()

    def save(done: int) -> None:
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "kind": "finetune",
                "config": config,
                "step": done,
                "steps": recipe.steps,
                "cache_step": cache_step,
                "cache_identity": cache.meta["identity"],
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "recipe": recipe.to_dict(),
                "wall_time_s": wall + time.perf_counter() - t0,
                "machine": machine_description(device, recipe.threads),
                "world_size": world,
                "torch": str(torch.__version__),
            },
            ckpt_path,
        )

    size = recipe.crop // 16 + 2 * G_S_REACH  # loss on the centre crop // 16
    align = 4 if recipe.parts == "decoder+hyperdecoder" else 1
    window = _Window()
    bar = tqdm(
        total=recipe.steps,
        initial=start,
        desc="finetune",
        disable=not progress,
        mininterval=5,
    )
    for step in range(start, end):
        if requantize and step % requantize == 0 and step > cache_step:
            # the latents the current h_s's μ, σ give: TCQ (or USQ) over the whole
            # training set again, from the images the old cache holds
            tq = time.perf_counter()
            old = cache
            cache = open_cache(
                out / f"cache-step{step}",
                [old.image(i) for i in range(old.num_images)],
            )
            cache_step = step
            if main:
                if old.folder.parent == out and old.folder.name.startswith("cache-step"):
                    shutil.rmtree(old.folder)
                log.write(kind="requantize", step=step, seconds=time.perf_counter() - tq)
        ts = time.perf_counter()
        picks = sample_crops(cache, recipe.seed, step, recipe.batch_size, size, align)
        mine = range(rank, recipe.batch_size, world)
        batch = assemble_batch(
            cache,
            [picks[b] for b in mine],
            mine,
            size,
            objective.fields,
            quantizer,
            recipe.seed,
            step,
        )
        batch = batch_to_device(batch, device, amp)
        opt.zero_grad(set_to_none=True)
        out_ = net(batch)
        out_["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_max_norm)
        opt.step()
        done = step + 1
        if not main:
            continue
        stats = {k: out_[k].item() for k in ("loss", "mse", "bpp")}
        stats["step_time_s"] = time.perf_counter() - ts
        window.add(stats)
        bar.update(1)
        if done % recipe.log_every == 0 or done == end:
            mean = window.take()
            log.write(
                kind="train",
                step=done,
                **mean,
                psnr=_psnr(mean["mse"]),
                lr=recipe.lr,
                wall_time_s=wall + time.perf_counter() - t0,
            )
            bar.set_postfix(
                loss=f"{mean['loss']:.4f}", psnr=f"{_psnr(mean['mse']):.2f}"
            )
        if done % recipe.checkpoint_every == 0 or done == end:
            save(done)
    bar.close()

    done = max(start, end)
    summary = {
        **config,
        "step": done,
        "steps": recipe.steps,
        "finished": done >= recipe.steps,
        "wall_time_s": wall + (time.perf_counter() - t0 if start < end else 0.0),
        "machine": machine_description(device, recipe.threads),
        "world_size": world,
        "checkpoint": str(ckpt_path),
        "model": str(out / "model.pth") if done >= recipe.steps else None,
    }
    if main and summary["finished"]:
        model.to("cpu", memory_format=torch.contiguous_format)
        extra = {
            k: config[k]
            for k in ("finetuned_from", "quantizer", "parts", "control", "lambda")
        }
        extra.update(steps=recipe.steps, finetune_recipe=recipe.to_dict())
        summary["sha256"] = save_checkpoint(
            out / "model.pth", model, base.arch, base.params, extra=extra, force=True
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if start < end:
            log.write(
                kind="end",
                step=done,
                wall_time_s=summary["wall_time_s"],
                sha256=summary["sha256"],
            )
    return summary
