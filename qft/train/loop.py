"""The training loop of the reference models (CompressAI's standard recipe).

Loss ``λ·255²·MSE + bpp`` (:class:`compressai.losses.RateDistortionLoss`) with additive
uniform noise as the quantization proxy; Adam on the main parameters with gradient
clipping; a separate Adam on the EntropyBottleneck quantiles driven by ``aux_loss()``;
a step-based learning-rate decay (:meth:`Recipe.lr_at`).

Determinism: the batch of step ``s`` comes from ``(seed, s)`` (:func:`sample_batch`) and
the noise RNG is re-seeded from ``(seed, s)`` before each step, so a checkpoint needs only
the model, both optimizer states and the step count for ``resume`` to reach the same
weights as an uninterrupted run (on the same device and thread count).

Output layout, one folder per rate point under ``out_dir``::

    lambda-0.0483/checkpoint.pth   training state (every checkpoint_every steps, atomic)
    lambda-0.0483/log.jsonl        one JSON object per line: start, train, val, end
    lambda-0.0483/model.pth        fp16 CompressAI state_dict, written when the point ends
    lambda-0.0483/summary.json     λ, steps, init, timings, machine, last validation
"""

from __future__ import annotations

import time

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressai.losses import RateDistortionLoss
from compressai.models import MeanScaleHyperprior

from qft.errors import UserError
from qft.models import get_architecture
from qft.threads import set_threads
from qft.train.checkpoint import CHECKPOINT_FORMAT, export_state_dict, load_training_state, save_atomic
from qft.train.data import center_crops, load_images, sample_batch
from qft.train.recipe import RatePoint, Recipe, lambda_tag
from qft.train.scaffold import (
    RunLog,
    TrainMonitor,
    machine_description,
    psnr_from_mse,
    resolve_device,
    resume_state,
    save_state,
    write_summary,
)

__all__ = [
    "build_model",
    "rd_forward",
    "transforms_autocast",
    "train",
    "train_point",
]


def build_model(recipe: Recipe) -> torch.nn.Module:
    """A freshly initialised model of the recipe's architecture and width, seeded by
    ``recipe.seed``, built by the registry (:meth:`qft.models.Architecture.build`, as
    :func:`qft.models.create_model` does, but without its coding tables: a training model
    has none, so its checkpoints load into one another whatever their tables)."""
    return get_architecture(recipe.arch).build(recipe.model_params, seed=recipe.seed)


def transforms_autocast(amp: bool) -> torch.autocast:
    """The precision of the transforms: bf16 autocast on CUDA with ``amp``, else a no-op
    (entropy models and losses stay in fp32 outside it)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)


def rd_forward(model: torch.nn.Module, x: torch.Tensor, amp: bool = False) -> dict[str, Any]:
    """The model's training forward pass, ``{"x_hat", "likelihoods": {"y", "z"}}``.

    A mean-scale hyperprior (``MeanScaleHyperprior.forward``) runs its four transforms
    optionally under CUDA bf16 autocast while the entropy models (likelihoods down to
    1e-9) stay in fp32; any other model (the channel-slice models) runs its own
    ``forward`` in fp32, ``amp`` aside: their slice transforms feed the entropy model.
    With ``amp=False`` this is exactly ``model(x)``.
    """
    if not isinstance(model, MeanScaleHyperprior):
        return model(x)

    with transforms_autocast(amp):
        y = model.g_a(x)
    y = y.float()
    with transforms_autocast(amp):
        z = model.h_a(y)
    z_hat, z_likelihoods = model.entropy_bottleneck(z.float())
    with transforms_autocast(amp):
        gaussian_params = model.h_s(z_hat)
    scales_hat, means_hat = gaussian_params.float().chunk(2, 1)
    y_hat, y_likelihoods = model.gaussian_conditional(y, scales_hat, means=means_hat)
    with transforms_autocast(amp):
        x_hat = model.g_s(y_hat)
    return {
        "x_hat": x_hat.float(),
        "likelihoods": {"y": y_likelihoods, "z": z_likelihoods},
    }


def _noise_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 1]).generate_state(1, np.uint32)[0])


@torch.no_grad()
def _validate(model, criterion, batch, amp) -> dict[str, float]:
    model.eval()
    try:
        out = criterion(rd_forward(model, batch, amp), batch)
    finally:
        model.train()
    mse = out["mse_loss"].item()
    return {
        "loss": out["loss"].item(),
        "bpp": out["bpp_loss"].item(),
        "mse": mse,
        "psnr": psnr_from_mse(mse),
    }


def _point_done(path: Path) -> dict[str, Any] | None:
    """The training checkpoint at ``path`` if it exists and reached its last step."""
    if not path.exists():
        return None
    ckpt = load_training_state(path)
    return ckpt if ckpt["step"] >= ckpt["steps"] else None


@dataclass
class _PointRun:
    """One rate point being trained: its model, optimizers and clocks."""

    recipe: Recipe
    point: RatePoint
    folder: Path
    device: torch.device
    amp: bool
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    aux_opt: torch.optim.Optimizer
    main_params: list[torch.nn.Parameter]
    criterion: RateDistortionLoss
    init: str
    start: int = 0
    wall: float = 0.0  # time of the earlier sessions of a resumed run
    cpu: float = 0.0
    t0: float = 0.0  # this session's clocks
    c0: float = 0.0

    @property
    def ckpt_path(self) -> Path:
        return self.folder / "checkpoint.pth"

    def wall_time(self) -> float:
        return self.wall + time.perf_counter() - self.t0

    def cpu_time(self) -> float:
        return self.cpu + time.process_time() - self.c0

    def save(self, done: int) -> None:
        r = self.recipe
        save_state(
            {
                "format": CHECKPOINT_FORMAT,
                "arch": r.arch,
                "N": r.N,
                "M": r.M,
                "params": r.model_params,
                "lambda": self.point.lmbda,
                "step": done,
                "steps": self.point.steps,
                "init": self.init,
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "aux_optimizer": self.aux_opt.state_dict(),
                "recipe": r.to_dict(),
                "wall_time_s": self.wall_time(),
                "cpu_time_s": self.cpu_time(),
                "machine": machine_description(self.device, r.threads, self.amp),
                "torch": str(torch.__version__),
            },
            self.ckpt_path,
        )


def _setup_point(recipe: Recipe, point: RatePoint, out_dir: Path, device: torch.device) -> _PointRun:
    """The model, optimizers and loss of a rate point, freshly initialised."""
    model = build_model(recipe).to(device)
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return _PointRun(
        recipe=recipe,
        point=point,
        folder=out_dir / lambda_tag(point.lmbda),
        device=device,
        amp=device.type == "cuda" and recipe.amp,
        model=model,
        opt=torch.optim.Adam(main, lr=recipe.lr),
        aux_opt=torch.optim.Adam(aux, lr=recipe.aux_lr),
        main_params=main,
        criterion=RateDistortionLoss(lmbda=point.lmbda),
        init="scratch" if point.parent is None else lambda_tag(point.parent),
    )


def _resume_point(run: _PointRun, out_dir: Path, resume: bool, init_from: str | Path | None) -> RunLog:
    """Load the point's training checkpoint (``resume``), else its starting weights
    (``init_from``, or the finished parent point); returns the point's log."""
    log_path = run.folder / "log.jsonl"
    ckpt = resume_state(run.ckpt_path, resume)
    if ckpt is not None:
        r = run.recipe
        params = ckpt.get("params", {"N": ckpt["N"], "M": ckpt["M"]})
        if abs(ckpt["lambda"] - run.point.lmbda) > 1e-12 or params != r.model_params:
            raise UserError(f"{run.ckpt_path} was trained with another lambda or width than the recipe asks for")
        run.model.load_state_dict(ckpt["model"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.aux_opt.load_state_dict(ckpt["aux_optimizer"])
        run.start, run.wall, run.cpu, run.init = ckpt["step"], ckpt["wall_time_s"], ckpt["cpu_time_s"], ckpt["init"]
        return RunLog(log_path, keep_until_step=run.start)
    if init_from is not None:
        run.init = _load_init(run.model, run.recipe, init_from)
    run.folder.mkdir(parents=True, exist_ok=True)
    if init_from is None and run.point.parent is not None:
        parent = _point_done(out_dir / lambda_tag(run.point.parent) / "checkpoint.pth")
        if parent is None:
            raise UserError(f"parent rate point {run.point.parent:g} is not finished in {out_dir}")
        run.model.load_state_dict(parent["model"])
    return RunLog(log_path, keep_until_step=None)


def _train_step(run: _PointRun, images: Sequence[np.ndarray], step: int) -> tuple[dict[str, float], float]:
    """One optimisation step (main and aux); returns its statistics and learning rate."""
    r, model = run.recipe, run.model
    ts = time.perf_counter()
    x = sample_batch(images, r.seed, step, r.batch_size, r.crop).to(run.device)
    lr = r.lr_at(step, run.point.steps)
    for g in run.opt.param_groups:
        g["lr"] = lr
    torch.manual_seed(_noise_seed(r.seed, step))
    run.opt.zero_grad(set_to_none=True)
    run.aux_opt.zero_grad(set_to_none=True)
    out = run.criterion(rd_forward(model, x, run.amp), x)
    out["loss"].backward()
    torch.nn.utils.clip_grad_norm_(run.main_params, r.clip_max_norm)
    run.opt.step()
    aux_loss = model.aux_loss()
    aux_loss.backward()
    run.aux_opt.step()
    stats = {
        "loss": out["loss"].item(),
        "bpp": out["bpp_loss"].item(),
        "mse": out["mse_loss"].item(),
        "aux_loss": aux_loss.item(),
        "step_time_s": time.perf_counter() - ts,
    }
    return stats, lr


def _finish_point(run: _PointRun, log: RunLog, end: int, val: dict[str, float] | None) -> dict[str, Any]:
    """The point's summary; when its last step is done, also ``model.pth`` (fp16 export),
    ``summary.json`` and the log's ``end`` record."""
    r, ran = run.recipe, run.start < end
    finished = _point_done(run.ckpt_path)
    summary = {
        "lambda": run.point.lmbda,
        "arch": r.arch,
        "N": r.N,
        "M": r.M,
        "init": run.init,
        "steps": run.point.steps,
        "step": end if ran else run.start,
        "finished": finished is not None,
        "wall_time_s": run.wall_time() if ran else run.wall,
        "cpu_time_s": run.cpu_time() if ran else run.cpu,
        "machine": machine_description(run.device, r.threads, run.amp),
        "val": val,
        "checkpoint": str(run.ckpt_path),
        "model": str(run.folder / "model.pth"),
    }
    if finished is None:
        return summary
    summary["wall_time_s"], summary["cpu_time_s"] = finished["wall_time_s"], finished["cpu_time_s"]
    summary["machine"] = finished["machine"]
    run.model.load_state_dict(finished["model"])
    save_atomic(export_state_dict(run.model), run.folder / "model.pth")
    write_summary(run.folder / "summary.json", summary)
    if ran:
        log.write(kind="end", step=end, **{"lambda": run.point.lmbda}, wall_time_s=summary["wall_time_s"])
    return summary


def train_point(
    recipe: Recipe,
    point: RatePoint,
    out_dir: str | Path,
    *,
    images: Sequence[np.ndarray],
    val_batch: torch.Tensor | None,
    device: torch.device,
    resume: bool = False,
    stop_after: int | None = None,
    init_from: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one rate point; returns its summary (also written to ``summary.json``).

    Args:
        recipe: the validated recipe.
        point: λ, step count and parent λ (warm start from ``out_dir/<parent>/``).
        out_dir: root output folder (one sub-folder per rate point).
        images: preloaded training images (uint8 HxWx3).
        val_batch: fixed validation crops, or None.
        device: CPU or CUDA (bf16 autocast there unless ``recipe.amp`` is false).
        resume: continue from an existing checkpoint instead of refusing to overwrite it.
        stop_after: stop (with a checkpoint) once this many steps are done.
        init_from: start from this model checkpoint (any file or shipped name
            :func:`qft.models.load_checkpoint` reads, of the recipe's architecture and
            width) instead of ``point.parent``; ignored when resuming.
        progress: show a tqdm bar.
    """
    out_dir = Path(out_dir)
    run = _setup_point(recipe, point, out_dir, device)
    log = _resume_point(run, out_dir, resume, init_from)
    end = point.steps if stop_after is None else min(point.steps, stop_after)
    head = {"lambda": point.lmbda}
    if run.start < end:
        log.write(kind="start", step=run.start, **head, steps=point.steps, init=run.init, device=str(device))
    run.t0, run.c0 = time.perf_counter(), time.process_time()
    val = None
    run.model.train()
    monitor = TrainMonitor(
        log,
        total=point.steps,
        initial=run.start,
        desc=lambda_tag(point.lmbda),
        log_every=recipe.log_every,
        postfix={"loss": ".3f", "bpp": ".3f", "psnr": ".2f"},
        enabled=progress,
    )
    for step in range(run.start, end):
        stats, lr = _train_step(run, images, step)
        done = step + 1
        monitor.step(done, end, stats, head, {"lr": lr, "wall_time_s": run.wall_time()})
        if val_batch is not None and (done % recipe.validate_every == 0 or done == point.steps):
            val = _validate(run.model, run.criterion, val_batch.to(device), run.amp)
            log.write(kind="val", step=done, **head, **val)
        if done % recipe.checkpoint_every == 0 or done == end:
            run.save(done)
    monitor.close()
    return _finish_point(run, log, end, val)


def _load_init(model: torch.nn.Module, recipe: Recipe, path: str | Path) -> str:
    """Load the weights of checkpoint ``path`` into ``model``; returns the ``init`` label
    (file name and SHA-256 prefix). The checkpoint must be of the recipe's architecture
    and width."""
    from qft.models import load_checkpoint

    loaded = load_checkpoint(path, recipe.arch)
    wanted = recipe.model_params
    differ = {k: loaded.params.get(k) for k, v in wanted.items() if loaded.params.get(k) != v}
    if differ:
        key = next(iter(differ))
        raise UserError(f"--init {path}: {key}={differ[key]} but the recipe trains {key}={wanted[key]}")
    model.load_state_dict(loaded.model.state_dict())
    return f"{Path(loaded.path).name} (sha256 {loaded.sha256[:12]})"


def train(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    lmbda: float | None = None,
    device: str | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    init_from: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train a recipe's schedule (highest λ first, then each lower λ warm-started from
    the previous one), or only the point ``lmbda``.

    With ``lmbda`` set, the point warm-starts from its parent when the parent is finished
    in ``out_dir``; otherwise it is trained from scratch for ``first_steps``. With
    ``init_from`` (needs ``lmbda``), it starts from that model checkpoint and trains for
    ``warm_steps`` (continued training, e.g. of a shipped model on a GPU). With
    ``resume``, finished points are skipped and an interrupted one continues.
    """
    set_threads(recipe.threads, numba=False)
    dev = resolve_device(device or recipe.device)
    if init_from is not None and lmbda is None:
        raise UserError("--init needs --lambda: it starts one rate point from a checkpoint")
    if lmbda is None:
        points = recipe.points
    elif init_from is not None:
        points = [RatePoint(recipe.point(lmbda).lmbda, recipe.warm_steps, None)]
    else:
        p = recipe.point(lmbda)
        parent_ckpt = None if p.parent is None else Path(out_dir) / lambda_tag(p.parent) / "checkpoint.pth"
        if parent_ckpt is not None and _point_done(parent_ckpt) is None:
            print(f"parent {p.parent:g} not finished in {out_dir}: training {lmbda:g} from scratch")
            p = RatePoint(p.lmbda, recipe.first_steps, None)
        points = [p]
    images = load_images(recipe.data_root, recipe.train_splits)
    val_batch = None
    if recipe.val_split is not None:
        val_batch = center_crops(
            load_images(recipe.data_root, [recipe.val_split], recipe.val_images),
            recipe.val_crop,
        )
    summaries = []
    for p in points:
        s = train_point(
            recipe,
            p,
            out_dir,
            images=images,
            val_batch=val_batch,
            device=dev,
            resume=resume,
            stop_after=stop_after,
            init_from=init_from,
            progress=progress,
        )
        summaries.append(s)
        if not s["finished"]:
            break
    return summaries
