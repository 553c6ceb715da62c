"""The finetuning loop (``qft finetune``), on one process or under ``torchrun`` (DDP).

The analysis side (``g_a``, ``h_a``, the ``EntropyBottleneck``) is frozen. Hyperprior
models: the trained parts see the latents of :class:`~qft.finetune.cache.LatentCache`,
quantized once with exactly the inference quantizer. Models coded step by step with an
LRP (channel-slice models TCM, DCAE, CCA; MLIC++): no cache; each step quantizes its image
crops anew with the current weights (:class:`~qft.finetune.slices.SliceObjective`), since
the trained LRP changes every later step's context. Conventions and scaffolding are those of
:mod:`qft.train.scaffold`: the crops of step ``s`` depend only on ``(seed, s)`` (and noise
on ``(seed, s, element)``), so a training checkpoint — model, Adam state, step — resumes
to the same weights as an uninterrupted run; JSON-lines log; tqdm; atomic checkpoints.
With ``requantize_every`` K (decoder+hyperdecoder) the training set is quantized again
every K steps with the current ``h_s`` (its ``μ``, ``σ``), Adam's state kept; a training
checkpoint records which cache it trains on, so a resumed run reads the same latents.

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

import dataclasses
import os
import shutil
import time

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trellis import Quantizer

from qft.codec import HYPERPRIOR_ENTROPY, RDTarget, target_record
from qft.errors import UserError
from qft.finetune.cache import LatentCache, cache_identity, images_digest, trim_images
from qft.finetune.objective import (
    G_S_REACH,
    FinetuneObjective,
    assemble_batch,
    batch_to_device,
    sample_crops,
)
from qft.finetune.parts import check_parts, trainable_parameters
from qft.finetune.recipe import FinetuneRecipe, default_recipe, load_finetune_recipe, override_recipe
from qft.finetune.slices import STEP_FAMILIES, SliceObjective, image_batch, training_steps
from qft.models import ARCHITECTURES, LoadedCheckpoint, load_checkpoint, save_checkpoint
from qft.settings import read_settings, resolve_quantizer, weights_digest
from qft.threads import set_threads
from qft.train.checkpoint import CHECKPOINT_FORMAT
from qft.train.data import load_images
from qft.train.scaffold import (
    RunLog,
    TrainMonitor,
    machine_description,
    resolve_device,
    resume_state,
    save_state,
    write_summary,
)

__all__ = ["finetune", "finetune_checkpoint"]


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
        raise UserError("no checkpoint: give --checkpoint or set 'checkpoint' in the recipe")
    world, rank, local_rank = _distributed()
    if recipe.batch_size % world:
        raise UserError(f"batch_size {recipe.batch_size} is not a multiple of the {world} processes")
    set_threads(recipe.threads, numba=False)
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


def finetune_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    recipe: str | os.PathLike | None = None,
    control: bool = False,
    resume: bool = False,
    progress: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """``qft finetune [RECIPE] -m CHECKPOINT --out OUT [--data DATA] …`` as a function (the
    top-level ``qft.finetune(...)``): finetune on latents quantized as at inference; returns
    the run's summary (``summary["model"]``: the finetuned checkpoint).

    ``recipe`` defaults to ``recipes/finetune/cpu.yaml``; ``fields`` override it
    (:func:`qft.finetune.override_recipe`): ``lmbda``, ``steps``, ``parts``, ``method``,
    ``step``, ``lambda_t``, ``lambda_mult``, ``weights``, ``target``, ``lr``, ``threads``,
    ``device``, …
    """
    r = override_recipe(
        load_finetune_recipe(recipe or default_recipe()), data=data, checkpoint=str(checkpoint), **fields
    )
    return finetune(r, Path(out), control=control, resume=resume, progress=progress)


@dataclass
class _Setup:
    """What a finetuning run trains, fixed before its first step."""

    base: LoadedCheckpoint
    entropy: str
    lmbda: float
    quantizer: Quantizer
    weights: Any  # np.ndarray | None: the encoder's distortion weights
    target: float | RDTarget
    images: list  # trimmed training images (uint8 HxWx3)
    config: dict[str, Any]  # what a resumed run must match


def _setup(recipe: FinetuneRecipe, control: bool, unsafe_load: bool) -> _Setup:
    """The base model, its λ, the inference quantizer and the training images; checks them."""
    base = load_checkpoint(recipe.checkpoint, recipe.arch, unsafe_load=unsafe_load)
    entropy = ARCHITECTURES[base.arch].entropy
    slices = training_steps(base.model) is not None
    if entropy not in HYPERPRIOR_ENTROPY and not slices:
        raise UserError(
            f"{base.arch} cannot be finetuned: qft finetune supports hyperprior models "
            f"({', '.join(HYPERPRIOR_ENTROPY)}) and {', '.join(STEP_FAMILIES)}"
        )
    check_parts(base.model, base.arch, recipe.parts)
    # the checkpoint's λ, or the one its settings file records (qft calibrate --lambda)
    lmbda = recipe.lmbda if recipe.lmbda is not None else read_settings(base).get("model_lambda")
    if not isinstance(lmbda, (int, float)) or lmbda <= 0:
        raise UserError(
            f"{recipe.checkpoint} records no λ: give --lambda (the base model's rate point), "
            "or record it once with qft calibrate -m CKPT --lambda L"
        )
    choice = resolve_quantizer(
        recipe.method,
        read_settings(base) | {"model_lambda": float(lmbda)},  # --target rd weighs by this run's λ
        step=recipe.step,
        lambda_t=recipe.lambda_t,
        lambda_mult=recipe.lambda_mult,
        reset=recipe.reset,
        weights=recipe.weights,
        target=recipe.target,
    )
    quantizer, weights, target = choice.quantizer, choice.weights, choice.target
    if slices and recipe.requantize_every:
        raise UserError(
            f"requantize_every does not apply to {base.arch}: it is quantized anew at every step; set it to 0"
        )
    if slices and target:
        raise UserError(
            f"finetuning {base.arch} trains on plain latents: the decoder target is not supported here; "
            "set quantizer.target to 0 (--target 0)"
        )
    images = trim_images(load_images(recipe.data_root, recipe.train_splits))
    # hyperprior crops carry the decoding context of their cached latents; slice models
    # analyse the crop itself, as in training
    context = recipe.crop + (0 if slices else 32 * G_S_REACH)
    small = [img.shape for img in images if min(img.shape[:2]) < context]
    if small:
        raise UserError(
            f"a training image of {small[0][1]}x{small[0][0]} pixels (after cropping to "
            f"multiples of 16) is smaller than the {recipe.crop}-pixel crop with its "
            f"decoding context ({context} pixels)"
        )
    if recipe.requantize_every and control:
        raise UserError(
            "requantize_every re-quantizes the latents a quantized run trains on; the "
            "control arm trains on the noise proxy: set it to 0"
        )
    config = {
        "finetuned_from": base.sha256,
        "finetuned_from_path": str(base.path),
        "arch": base.arch,
        "params": base.params,
        "quantizer": dataclasses.asdict(quantizer)
        | ({} if weights is None else {"weights": weights_digest(weights)})
        | ({"target": target_record(target)} if target else {}),
        "parts": recipe.parts,
        "requantize_every": recipe.requantize_every,
        "control": control,
        "lambda": float(lmbda),
        "seed": recipe.seed,
        "batch_size": recipe.batch_size,
        "crop": recipe.crop,
        "lr": recipe.lr,
        "clip_max_norm": recipe.clip_max_norm,
        "data": images_digest(images),
    }
    return _Setup(base, entropy, float(lmbda), quantizer, weights, target, images, config)


@dataclass
class _Run:
    """A finetuning run in its process group: setup, device, model and optimizer state."""

    recipe: FinetuneRecipe
    setup: _Setup
    out: Path
    device: torch.device
    world: int
    rank: int
    progress: bool
    cache: LatentCache | None = None
    cache_step: int = 0  # the step the latents were quantized at (0: the base model's cache)
    params: list | None = None
    objective: FinetuneObjective | None = None
    net: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    start: int = 0
    wall: float = 0.0  # time of the earlier sessions of a resumed run
    t0: float = 0.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def model(self) -> torch.nn.Module:
        return self.setup.base.model

    @property
    def slices(self) -> bool:
        """A model coded step by step with an LRP: every step quantizes its image batch
        anew (no cache)."""
        return training_steps(self.model) is not None

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pth"

    def wall_time(self) -> float:
        return self.wall + time.perf_counter() - self.t0

    def open_cache(self, folder: Path, images) -> LatentCache:
        """The cache in ``folder`` for the current weights, built by rank 0 from the
        trimmed ``images`` if missing (the others wait)."""
        su = self.setup
        identity = cache_identity(
            self.model, su.base.arch, su.entropy, su.quantizer, su.config["data"], su.weights, su.target
        )
        if self.main and not (folder / "meta.json").exists():
            LatentCache.build(
                folder,
                identity,
                self.model.to(self.device),
                su.entropy,
                su.quantizer,
                images,
                self.device,
                self.progress,
                weights=su.weights,
                target=su.target,
            )
        if self.world > 1:
            dist.barrier()
        return LatentCache.open(folder, identity)

    def save(self, done: int) -> None:
        save_state(
            {
                "format": CHECKPOINT_FORMAT,
                "kind": "finetune",
                "config": self.setup.config,
                "step": done,
                "steps": self.recipe.steps,
                "cache_step": self.cache_step,
                "cache_identity": None if self.cache is None else self.cache.meta["identity"],
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "recipe": self.recipe.to_dict(),
                "wall_time_s": self.wall_time(),
                "machine": machine_description(self.device, self.recipe.threads),
                "world_size": self.world,
                "torch": str(torch.__version__),
            },
            self.ckpt_path,
        )


def _resume(run: _Run, cache_dir: str | Path | None, resume: bool, control: bool) -> RunLog | None:
    """Open the latent cache (hyperprior models: the base model's, or the re-quantized one
    a resumed run trained on), build the model, objective and optimizer, and load a resumed
    state; returns the log (rank 0; ``None`` on the others)."""
    if run.slices and cache_dir is not None:
        raise UserError(
            f"--cache does not apply to {run.setup.base.arch}: it is quantized anew at every step, no cache"
        )
    recipe, out = run.recipe, run.out
    state = resume_state(run.ckpt_path, resume)
    if state is not None and (state.get("kind") != "finetune" or state["config"] != run.setup.config):
        raise UserError(
            f"{run.ckpt_path} was started with another checkpoint, quantizer, parts, λ or "
            "recipe than this run; choose another --out"
        )
    if state is None and run.main:
        out.mkdir(parents=True, exist_ok=True)
    # the base model's cache is built from the base weights, so before a resumed state is loaded
    run.cache_step = state["cache_step"] if state else 0
    if not run.slices:  # slice models train on the images themselves, quantized anew at every step
        if run.cache_step:
            run.cache = LatentCache.open(out / f"cache-step{run.cache_step}", state["cache_identity"])
        else:
            folder = Path(cache_dir) if cache_dir is not None else out / "cache"
            run.cache = run.open_cache(folder, run.setup.images)
        run.setup.images = []

    model, device = run.model, run.device
    amp = device.type == "cuda" and not run.slices  # slice models train in fp32, as qft train runs them
    model.to(device)
    if amp:
        model.to(memory_format=torch.channels_last)
    run.params = trainable_parameters(model, recipe.parts)
    su = run.setup
    if run.slices:
        run.objective = SliceObjective(model, recipe.parts, control, su.lmbda, su.quantizer, su.weights)
    else:
        run.objective = FinetuneObjective(model, su.entropy, recipe.parts, control, su.lmbda, amp)
    run.objective.train()
    run.opt = torch.optim.Adam(run.params, lr=recipe.lr)
    if state:
        model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        run.start, run.wall = state["step"], state["wall_time_s"]
    run.net = run.objective
    if run.world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(
            run.objective, device_ids=[device.index] if device.type == "cuda" else None
        )
    if not run.main:
        return None
    return RunLog(out / "log.jsonl", keep_until_step=run.start if state is not None else None)


def _requantize(run: _Run, step: int, log: RunLog | None) -> None:
    """Quantize the training set again with the current ``h_s``'s ``μ``, ``σ`` (TCQ or
    USQ over all of it, from the images the old cache holds); drop the previous
    re-quantized cache."""
    tq = time.perf_counter()
    old = run.cache
    run.cache = run.open_cache(run.out / f"cache-step{step}", [old.image(i) for i in range(old.num_images)])
    run.cache_step = step
    if run.main:
        if old.folder.parent == run.out and old.folder.name.startswith("cache-step"):
            shutil.rmtree(old.folder)
        log.write(kind="requantize", step=step, seconds=time.perf_counter() - tq)


def _step(run: _Run, step: int, size: int, align: int) -> dict[str, float]:
    """One optimisation step on this process's share of the global batch; returns its
    statistics (read on rank 0 only)."""
    recipe, ts = run.recipe, time.perf_counter()
    mine = range(run.rank, recipe.batch_size, run.world)
    if run.slices:
        batch = image_batch(
            run.setup.images, recipe.seed, step, recipe.batch_size, recipe.crop, mine, run.objective.noise_channels
        )
    else:
        picks = sample_crops(run.cache, recipe.seed, step, recipe.batch_size, size, align)
        batch = assemble_batch(
            run.cache,
            [picks[b] for b in mine],
            mine,
            size,
            run.objective.fields,
            run.setup.quantizer,
            recipe.seed,
            step,
        )
    batch = batch_to_device(batch, run.device, run.device.type == "cuda" and not run.slices)
    run.opt.zero_grad(set_to_none=True)
    out = run.net(batch)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(run.params, recipe.clip_max_norm)
    run.opt.step()
    if not run.main:
        return {}
    stats = {k: out[k].item() for k in ("loss", "mse", "bpp")}
    stats["step_time_s"] = time.perf_counter() - ts
    return stats


def _finalize(run: _Run, log: RunLog | None, end: int) -> dict[str, Any]:
    """The run's summary; when its last step is done, rank 0 also writes ``model.pth`` (a
    qft checkpoint), ``summary.json`` and the log's ``end`` record."""
    recipe, ran = run.recipe, run.start < end
    done = max(run.start, end)
    config = run.setup.config
    summary = {
        **config,
        "step": done,
        "steps": recipe.steps,
        "finished": done >= recipe.steps,
        "wall_time_s": run.wall + (time.perf_counter() - run.t0 if ran else 0.0),
        "machine": machine_description(run.device, recipe.threads),
        "world_size": run.world,
        "checkpoint": str(run.ckpt_path),
        "model": str(run.out / "model.pth") if done >= recipe.steps else None,
    }
    if not (run.main and summary["finished"]):
        return summary
    model, base = run.model, run.setup.base
    model.to("cpu", memory_format=torch.contiguous_format)
    extra = {k: config[k] for k in ("finetuned_from", "quantizer", "parts", "control", "lambda")}
    extra.update(steps=recipe.steps, finetune_recipe=recipe.to_dict())
    summary["sha256"] = save_checkpoint(run.out / "model.pth", model, base.arch, base.params, extra=extra, force=True)
    write_summary(run.out / "summary.json", summary)
    if ran:
        log.write(kind="end", step=done, wall_time_s=summary["wall_time_s"], sha256=summary["sha256"])
    return summary


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
    run = _Run(recipe, _setup(recipe, control, unsafe_load), out, device, world, rank, progress)
    log = _resume(run, cache_dir, resume, control)
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    if run.main and run.start < end:
        log.write(
            kind="start", step=run.start, steps=recipe.steps, device=str(device), world_size=world, **run.setup.config
        )
    run.t0 = time.perf_counter()
    size = recipe.crop // 16 + 2 * G_S_REACH  # loss on the centre crop // 16
    align = 4 if recipe.parts == "decoder+hyperdecoder" else 1
    requantize = recipe.requantize_every
    monitor = TrainMonitor(
        log,
        total=recipe.steps,
        initial=run.start,
        desc="finetune",
        log_every=recipe.log_every,
        postfix={"loss": ".4f", "psnr": ".2f"},
        enabled=progress,
    )
    for step in range(run.start, end):
        if requantize and step % requantize == 0 and step > run.cache_step:
            _requantize(run, step, log)
        stats = _step(run, step, size, align)
        done = step + 1
        if not run.main:
            continue
        monitor.step(done, end, stats, {}, {"lr": recipe.lr, "wall_time_s": run.wall_time()})
        if done % recipe.checkpoint_every == 0 or done == end:
            run.save(done)
    monitor.close()
    return _finalize(run, log, end)
