"""Evaluation of a codec on an image folder with real bitstreams.

Per image: compress → bitstream → decompress (exactly as a user would), bits per pixel from
the stream length over the unpadded pixels, PSNR-RGB and MS-SSIM-RGB on 8-bit-rounded RGB,
encoding and decoding times. Dataset values are means over images (CompressAI's
convention). The result follows CompressAI's JSON schema (``name``, ``description``,
``results``) with qft's own fields under ``qft``.
"""

from __future__ import annotations

import math
import statistics

from pathlib import Path

import numpy as np
import torch

from tqdm import tqdm

from trellis import Quantizer

from qft.codec import Codec, RDTarget, SGARefine, crop, pad, read_image
from qft.errors import UserError
from qft.eval.metrics import ms_ssim_rgb, psnr
from qft.threads import set_threads

__all__ = ["evaluate_images", "evaluate_configs", "evaluate_in_processes", "results_json"]


def evaluate_images(
    codec: Codec,
    quantizer: Quantizer,
    images: list[Path],
    desc: str = "eval",
    weights: np.ndarray | None = None,
    target: float | RDTarget = 0.0,
    progress: bool = True,
    refine: SGARefine | None = None,
) -> list[dict]:
    """Per-image metrics of one codec/quantizer (weights, decoder target, latent
    refinement) over image files; ``target`` of each row: the ``η`` coded."""
    rows = []
    for path in tqdm(images, desc=desc, unit="img", leave=False, disable=not progress):
        x = read_image(path)
        pixels = x.shape[-2] * x.shape[-1]
        enc = codec.compress(x, quantizer, weights, target, refine)
        dec = codec.decompress(enc["bitstream"], name=path.name)
        rows.append(
            {
                "image": path.name,
                "bpp": len(enc["bitstream"]) * 8 / pixels,
                "bpp_estimated": enc["bits_estimated"] / pixels,
                "psnr-rgb": psnr(x, dec["x_hat"]),
                "ms-ssim-rgb": ms_ssim_rgb(x, dec["x_hat"]),
                "encoding_time": enc["time_s"],
                "decoding_time": dec["time_s"],
                "target": enc.get("target", 0.0),
            }
        )
    return rows


@torch.no_grad()
def evaluate_configs(
    codec: Codec,
    configs: dict[str, tuple[Quantizer, np.ndarray | None, float]],
    images: list[Path],
    desc: str = "eval",
    ms_ssim: bool = True,
    progress: bool = True,
) -> dict[str, list[dict]]:
    """Per-image metrics of many quantizers on one step-wise coded codec, analysing each image once.

    Each image is analysed once (``g_a``, ``h_a``, ``ẑ``, ``h_s``) and re-quantized per
    configuration; the rate is the length of the ``.qft`` stream
    :meth:`Codec.encode_latent` writes (exactly ``qft compress``'s output), the distortion
    that of ``g_s(ŷ)``. The first image's stream of every configuration is decoded end to
    end (its metrics are the decoder's) and must give the same ``ŷ`` (otherwise
    RuntimeError); the others are decoded from the encoder's ``ŷ``. No timings.

    Args:
        configs: label -> (quantizer, per-channel weights or None, decoder target: ``η``
            or an :class:`~qft.codec.RDTarget`).

    Returns:
        label -> one row per image (``image``, ``bpp``, ``bpp_estimated``, ``psnr-rgb``,
        ``ms-ssim-rgb``, ``target``: the ``η`` coded).
    """
    if codec.latent_coder is None:
        raise UserError(
            f"{codec.arch}: its spatial autoregressive context codes with the model's own USQ coder; "
            "it cannot be re-quantized per image"
        )
    out: dict[str, list[dict]] = {label: [] for label in configs}
    direction = any(c[2] for c in configs.values())  # the target's step is computed once per image
    coder = codec.latent_coder
    for i, path in enumerate(tqdm(images, desc=desc, unit="img", leave=False, disable=not progress)):
        x = read_image(path)
        h, w = x.shape[-2:]
        xp, padding = pad(x.to(codec.device))
        (lat0,) = coder.latents(xp, direction, padding)
        for label, (q, weights, target) in configs.items():
            lat = coder.requantize(lat0, q, weights, target)
            enc = codec.encode_latent(lat, q, h, w)
            if i == 0:  # the first stream goes through the real decoder
                dec = codec.decompress(enc["bitstream"])
                if not np.array_equal(dec["y_hat"], lat.y_hat):
                    raise RuntimeError(f"{label}: the decoded latent differs from the encoder's")
                x_hat = dec["x_hat"]
            else:
                y_hat = torch.from_numpy(lat.y_hat)[None].to(codec.device)
                x_hat = crop(codec.model.g_s(y_hat).clamp(0, 1), padding).cpu()
            out[label].append(
                {
                    "image": path.name,
                    "bpp": len(enc["bitstream"]) * 8 / (h * w),
                    "bpp_estimated": enc["bits_estimated"] / (h * w),
                    "psnr-rgb": psnr(x, x_hat),
                    "ms-ssim-rgb": ms_ssim_rgb(x, x_hat) if ms_ssim else float("nan"),
                    "target": lat.target,
                }
            )
    return out


#: a configuration of :func:`evaluate_configs`: quantizer, per-channel weights, decoder target
Config = tuple[Quantizer, "np.ndarray | None", "float | RDTarget"]  # end to end, (…, SGARefine | None) too


def _shard(
    checkpoint: str,
    arch: str | None,
    unsafe_load: bool,
    configs: dict[str, Config],
    images: list[Path],
    end_to_end: bool,
    ms_ssim: bool,
) -> dict[str, list[dict]]:
    """One worker's part of :func:`evaluate_in_processes`: one thread, its own codec."""
    from qft.models import load_checkpoint

    set_threads(1)
    ck = load_checkpoint(checkpoint, arch, unsafe_load=unsafe_load)
    codec = Codec.from_checkpoint(ck)
    for q, *_ in configs.values():
        codec.check_quantizer(q)
    if end_to_end:
        return {
            label: evaluate_images(codec, q, images, weights=w, target=t, progress=False, refine=r[0] if r else None)
            for label, (q, w, t, *r) in configs.items()
        }
    return evaluate_configs(codec, configs, images, ms_ssim=ms_ssim, progress=False)


def evaluate_in_processes(
    jobs: list[tuple[str, dict[str, Config]]],
    images: list[Path],
    workers: int,
    *,
    arch: str | None = None,
    unsafe_load: bool = False,
    end_to_end: bool = False,
    ms_ssim: bool = True,
    progress: bool = True,
) -> list[dict[str, list[dict]]]:
    """Every job — a checkpoint (file or shipped name) and its configurations — over
    ``images`` in ``workers`` processes of one torch/Numba thread each (``spawn``).

    The images are split into ``workers`` contiguous shards, each (job, shard) is one task,
    and the rows are put back in image order: the rows are those of the serial functions
    (per-image results do not depend on the other images), :func:`evaluate_images`'s for
    ``end_to_end`` (every image compressed and decompressed, with timings), else
    :func:`evaluate_configs`'s (each image analysed once). Returns one ``label -> rows``
    per job.
    """
    import multiprocessing

    from concurrent.futures import ProcessPoolExecutor

    shards = [images[i::workers] for i in range(workers)]  # strided: equal shares of large and small images
    shards = [s for s in shards if s]
    out: list[dict[str, list[dict]]] = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            [pool.submit(_shard, str(ck), arch, unsafe_load, configs, shard, end_to_end, ms_ssim) for shard in shards]
            for ck, configs in jobs
        ]
        bar = tqdm(
            total=len(jobs) * len(shards),
            desc=f"eval ({workers} processes)",
            unit="shard",
            leave=False,
            disable=not progress,
        )
        for (_, configs), parts in zip(jobs, futures):
            results = []
            for f in parts:
                results.append(f.result())
                bar.update()
            merged: dict[str, list] = {label: [None] * len(images) for label in configs}
            for i, r in enumerate(results):  # shard i holds images i, i + n, i + 2n, …
                for label in configs:
                    for j, row in enumerate(r[label]):
                        merged[label][i + j * len(shards)] = row
            out.append(merged)
        bar.close()
    return out


def _column_mean(rows: list[dict], key: str) -> float | None:
    """Mean over images; ``None`` (JSON null) when not finite (MS-SSIM of images too small
    for its five scales, PSNR of a lossless image), so the file stays strict JSON."""
    m = statistics.fmean(r[key] for r in rows)
    return m if math.isfinite(m) else None


def results_json(
    name: str,
    checkpoints: list[dict],
    per_checkpoint: list[list[dict]],
    estimate: bool = False,
    per_image: bool = False,
    dataset: str = "",
) -> dict:
    """CompressAI-schema results: one list entry per checkpoint, means over images.

    Args:
        checkpoints: one dict per checkpoint (``path``, ``sha256``, ``arch``, ``params``,
            ``quantizer``: :meth:`~qft.settings.QuantizerChoice.describe`). The
            top-level ``qft.quantizer`` is their common quantizer when all agree (without
            where it came from), else only the method: calibrated settings are per checkpoint.
        per_checkpoint: :func:`evaluate_images` output per checkpoint.
        estimate: report the estimated bpp as ``bpp`` (the real one stays in ``qft``).
    """
    results = {key: [] for key in ("psnr-rgb", "ms-ssim-rgb", "bpp", "encoding_time", "decoding_time")}
    real, est = [], []
    for rows in per_checkpoint:
        for key in ("psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time"):
            results[key].append(_column_mean(rows, key))
        real.append(_column_mean(rows, "bpp"))
        est.append(_column_mean(rows, "bpp_estimated"))
        results["bpp"].append(est[-1] if estimate else real[-1])
    described = [{k: v for k, v in c["quantizer"].items() if k != "source"} for c in checkpoints]
    q = (
        described[0]
        if all(d == described[0] for d in described)
        else {"method": described[0]["method"], "per_checkpoint": True}
    )
    out = {
        "name": name,
        "description": f"qft {q['method']}, real bitstreams" + (" (bpp: estimated)" if estimate else ""),
        "results": results,
        "qft": {
            "quantizer": q,
            "dataset": dataset,
            "images": len(per_checkpoint[0]) if per_checkpoint else 0,
            "checkpoints": checkpoints,
            "bpp_real": real,
            "bpp_estimated": est,
            "torch": torch.__version__,
        },
    }
    if per_image:
        out["qft"]["per_image"] = [
            [
                {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in rows
            ]
            for rows in per_checkpoint
        ]
    return out
