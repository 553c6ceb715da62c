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

import json
import math
import platform
import time

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from compressai.losses import RateDistortionLoss
from compressai.models import MeanScaleHyperprior
from tqdm import tqdm

from qft.errors import UserError
from qft.files import remove_stale_temporaries
from qft.train.checkpoint import (
    CHECKPOINT_FORMAT,
    export_state_dict,
    load_checkpoint,
    save_atomic,
)
from qft.train.data import center_crops, load_images, sample_batch
from qft.train.recipe import Recipe, RatePoint, lambda_tag

__all__ = [
    "build_model",
    "rd_forward",
    "resolve_device",
    "machine_description",
    "train",
    "train_point",
]


def build_model(recipe: Recipe) -> MeanScaleHyperprior:
    """A freshly initialised model of the recipe's architecture, seeded by ``recipe.seed``."""
    torch.manual_seed(recipe.seed)
    return MeanScaleHyperprior(N=recipe.N, M=recipe.M)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, not '{name}'")
    return torch.device(name)


def machine_description(device: torch.device, threads: int, amp: bool = True) -> str:
    """One line naming the hardware a run used, for checkpoints and the manifest
    (``amp``: whether the transforms ran under bf16 autocast on CUDA)."""
    if device.type == "cuda":
        precision = "bf16 autocast" if amp else "fp32"
        return f"{torch.cuda.get_device_name(device)} (CUDA, {precision})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {threads} thread(s)"


def transforms_autocast(amp: bool) -> torch.autocast:
    """The precision of the transforms: bf16 autocast on CUDA with ``amp``, else a no-op
    (entropy models and losses stay in fp32 outside it)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)


def rd_forward(
    model: MeanScaleHyperprior, x: torch.Tensor, amp: bool = False
) -> dict[str, Any]:
    """``MeanScaleHyperprior.forward``, with the four transforms optionally under CUDA
    bf16 autocast while the entropy models (likelihoods down to 1e-9) stay in fp32.

    With ``amp=False`` this is exactly ``model(x)``.
    """

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


def _psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def _optimizers(model: MeanScaleHyperprior, recipe: Recipe):
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return (
        torch.optim.Adam(main, lr=recipe.lr),
        torch.optim.Adam(aux, lr=recipe.aux_lr),
        main,
    )


class _Log:
    """Append-only JSON-lines log; on resume, lines past the checkpoint's step are cut."""

    def __init__(self, path: Path, keep_until_step: int | None):
        self.path = path
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if ln and json.loads(ln).get("step", 0) <= keep_until_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, **entry: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class _Window:
    """Running sums of per-step statistics between two log lines."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._n = 0

    def add(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1

    def take(self) -> dict[str, float]:
        """The means since the last call, and a fresh window."""
        mean = {k: v / self._n for k, v in self._sums.items()}
        self._sums, self._n = {}, 0
        return mean


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
        "psnr": _psnr(mse),
    }


def _point_done(path: Path) -> dict[str, Any] | None:
    """The training checkpoint at ``path`` if it exists and reached its last step."""
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    return ckpt if ckpt["step"] >= ckpt["steps"] else None


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
    folder = Path(out_dir) / lambda_tag(point.lmbda)
    ckpt_path, log_path = folder / "checkpoint.pth", folder / "log.jsonl"
    for saved in (ckpt_path, folder / "model.pth"):  # left by a run killed while saving
        remove_stale_temporaries(saved)
    amp = device.type == "cuda" and recipe.amp
    model = build_model(recipe).to(device)
    opt, aux_opt, main_params = _optimizers(model, recipe)
    criterion = RateDistortionLoss(lmbda=point.lmbda)
    init = "scratch" if point.parent is None else lambda_tag(point.parent)
    start, wall, cpu = 0, 0.0, 0.0

    if ckpt_path.exists():
        if not resume:
            raise UserError(
                f"{ckpt_path} exists; pass --resume to continue it or choose another --out"
            )
        ckpt = load_checkpoint(ckpt_path)
        if abs(ckpt["lambda"] - point.lmbda) > 1e-12 or (ckpt["N"], ckpt["M"]) != (
            recipe.N,
            recipe.M,
        ):
            raise UserError(
                f"{ckpt_path} was trained with another lambda or width than the recipe asks for"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        aux_opt.load_state_dict(ckpt["aux_optimizer"])
        start, wall, cpu, init = (
            ckpt["step"],
            ckpt["wall_time_s"],
            ckpt["cpu_time_s"],
            ckpt["init"],
        )
        log = _Log(log_path, keep_until_step=start)
    else:
        if init_from is not None:
            init = _load_init(model, recipe, init_from)
        folder.mkdir(parents=True, exist_ok=True)
        if init_from is None and point.parent is not None:
            parent = _point_done(
                Path(out_dir) / lambda_tag(point.parent) / "checkpoint.pth"
            )
            if parent is None:
                raise UserError(
                    f"parent rate point {point.parent:g} is not finished in {out_dir}"
                )
            model.load_state_dict(parent["model"])
        log = _Log(log_path, keep_until_step=None)
    end = point.steps if stop_after is None else min(point.steps, stop_after)
    if start < end:
        log.write(
            kind="start",
            step=start,
            **{"lambda": point.lmbda},
            steps=point.steps,
            init=init,
            device=str(device),
        )

    def save(done: int) -> None:
        save_atomic(
            {
                "format": CHECKPOINT_FORMAT,
                "arch": recipe.arch,
                "N": recipe.N,
                "M": recipe.M,
                "lambda": point.lmbda,
                "step": done,
                "steps": point.steps,
                "init": init,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "aux_optimizer": aux_opt.state_dict(),
                "recipe": recipe.to_dict(),
                "wall_time_s": wall + time.perf_counter() - t0,
                "cpu_time_s": cpu + time.process_time() - c0,
                "machine": machine_description(device, recipe.threads, amp),
                "torch": str(torch.__version__),
            },
            ckpt_path,
        )

    t0, c0 = time.perf_counter(), time.process_time()
    window = _Window()
    val = None
    model.train()
    bar = tqdm(
        total=point.steps,
        initial=start,
        desc=lambda_tag(point.lmbda),
        disable=not progress,
        mininterval=5,
    )
    for step in range(start, end):
        ts = time.perf_counter()
        x = sample_batch(images, recipe.seed, step, recipe.batch_size, recipe.crop).to(
            device
        )
        lr = recipe.lr_at(step, point.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(_noise_seed(recipe.seed, step))
        opt.zero_grad(set_to_none=True)
        aux_opt.zero_grad(set_to_none=True)
        out = criterion(rd_forward(model, x, amp), x)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(main_params, recipe.clip_max_norm)
        opt.step()
        aux_loss = model.aux_loss()
        aux_loss.backward()
        aux_opt.step()

        done = step + 1
        stats = {
            "loss": out["loss"].item(),
            "bpp": out["bpp_loss"].item(),
            "mse": out["mse_loss"].item(),
            "aux_loss": aux_loss.item(),
            "step_time_s": time.perf_counter() - ts,
        }
        window.add(stats)
        bar.update(1)
        if done % recipe.log_every == 0 or done == end:
            mean = window.take()
            log.write(
                kind="train",
                step=done,
                **{"lambda": point.lmbda},
                **mean,
                psnr=_psnr(mean["mse"]),
                lr=lr,
                wall_time_s=wall + time.perf_counter() - t0,
            )
            bar.set_postfix(
                loss=f"{mean['loss']:.3f}",
                bpp=f"{mean['bpp']:.3f}",
                psnr=f"{_psnr(mean['mse']):.2f}",
            )
        if val_batch is not None and (
            done % recipe.validate_every == 0 or done == point.steps
        ):
            val = _validate(model, criterion, val_batch.to(device), amp)
            log.write(kind="val", step=done, **{"lambda": point.lmbda}, **val)
        if done % recipe.checkpoint_every == 0 or done == end:
            save(done)
    bar.close()

    finished = _point_done(ckpt_path) if ckpt_path.exists() else None
    summary = {
        "lambda": point.lmbda,
        "arch": recipe.arch,
        "N": recipe.N,
        "M": recipe.M,
        "init": init,
        "steps": point.steps,
        "step": end if start < end else start,
        "finished": finished is not None,
        "wall_time_s": wall + time.perf_counter() - t0 if start < end else wall,
        "cpu_time_s": cpu + time.process_time() - c0 if start < end else cpu,
        "machine": machine_description(device, recipe.threads, amp),
        "val": val,
        "checkpoint": str(ckpt_path),
        "model": str(folder / "model.pth"),
    }
    if finished is not None:
        summary["wall_time_s"], summary["cpu_time_s"] = (
            finished["wall_time_s"],
            finished["cpu_time_s"],
        )
        summary["machine"] = finished["machine"]
        model.load_state_dict(finished["model"])
        save_atomic(export_state_dict(model), folder / "model.pth")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if start < end:
            log.write(
                kind="end",
                step=end,
                **{"lambda": point.lmbda},
                wall_time_s=summary["wall_time_s"],
            )
    return summary


def _load_init(model: MeanScaleHyperprior, recipe: Recipe, path: str | Path) -> str:
    """Load the weights of checkpoint ``path`` into ``model``; returns the ``init`` label
    (file name and SHA-256 prefix). The checkpoint must be of the recipe's architecture
    and width."""
    from qft.models import load_checkpoint as load_model

    loaded = load_model(path, recipe.arch)
    width = (loaded.params.get("N"), loaded.params.get("M"))
    if width != (recipe.N, recipe.M):
        raise UserError(
            f"--init {path}: N={width[0]}, M={width[1]} but the recipe trains "
            f"N={recipe.N}, M={recipe.M}"
        )
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
    torch.set_num_threads(recipe.threads)
    dev = resolve_device(device or recipe.device)
    if init_from is not None and lmbda is None:
        raise UserError("--init needs --lambda: it starts one rate point from a checkpoint")
    if lmbda is None:
        points = recipe.points
    elif init_from is not None:
        points = [RatePoint(recipe.point(lmbda).lmbda, recipe.warm_steps, None)]
    else:
        p = recipe.point(lmbda)
        parent_ckpt = (
            None
            if p.parent is None
            else Path(out_dir) / lambda_tag(p.parent) / "checkpoint.pth"
        )
        if parent_ckpt is not None and _point_done(parent_ckpt) is None:
            print(
                f"parent {p.parent:g} not finished in {out_dir}: training {lmbda:g} from scratch"
            )
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
