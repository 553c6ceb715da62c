"""Memory-mapped cache of the quantized latents of a training set.

Finetuning with frozen analysis transforms sees the same latents at every step, so they
are computed once — TCQ runs once per image, not once per step — and stored as flat
``.npy`` files that every step (and every DDP process) reads through ``np.load(...,
mmap_mode="r")``.

Each image is cropped (top-left) to multiples of 16 pixels, zero-padded at the bottom and
right to multiples of 64, and coded as one batch of one by
:meth:`qft.codec.LatentCoder.quantize` — exactly the encoder path of ``qft
compress``. Per image the cache holds, on the padded grid:

==========  =======  ====================================================================
field       dtype    content
==========  =======  ====================================================================
``image``   uint8    the cropped image, ``H×W×3`` (H, W multiples of 16)
``y``       float32  analysis output ``g_a(x)``, ``C×H/16×W/16``
``mu``      float32  μ of the entropy model (0 for scale hyperpriors)
``y_hat``   float32  the quantizer's reconstruction ``μ + t(k, s)``
``index``   int32    the coded index ``k``
``qclass``  uint8    the quantizer class of ``k`` (0: USQ or TCQ ``Q0``; 1: TCQ ``Q1``; 2: TCQ's plain)
``z``       float32  hyper-latent ``h_a(y)`` (``h_a(|y|)`` for scale hyperpriors)
``z_hat``   float32  the decoded hyper-latent ``ẑ``
==========  =======  ====================================================================

A latent crop of ``h×w`` at ``(i, j)`` belongs to the image crop of ``16h×16w`` at
``(16i, 16j)``; only crops inside the image (not its padding) are drawn. ``meta.json``
records the identity of the cache — weight fingerprint of the model, quantizer
parameters, SHA-256 of the decoded training images — and opening a cache with another
identity is a :class:`UserError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tqdm import tqdm

from trellis import NUM_SCALES, Quantizer

from qft.codec import LatentCoder, RDTarget, model_fingerprint, target_record, to_tensor
from qft.errors import UserError
from qft.settings import quantizer_identity, weights_digest
from qft.threads import set_threads

__all__ = [
    "CACHE_FORMAT",
    "LatentCache",
    "cache_identity",
    "images_digest",
    "trim_images",
]

#: ``format`` field of ``meta.json``
CACHE_FORMAT = "qft-finetune-cache/1"

#: latent-domain fields (``C×h×w`` per image) and hyper-latent fields
_LATENT = {
    "y": np.float32,
    "mu": np.float32,
    "y_hat": np.float32,
    "index": np.int32,
    "qclass": np.uint8,
}
_HYPER = {"z": np.float32, "z_hat": np.float32}


def trim_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Crop each HxWx3 image (top-left) to multiples of 16 pixels."""
    return [img[: img.shape[0] // 16 * 16, : img.shape[1] // 16 * 16] for img in images]


def images_digest(images: Sequence[np.ndarray]) -> str:
    """SHA-256 over the shapes and pixels of the (trimmed) training images."""
    h = hashlib.sha256()
    for img in images:
        h.update(np.asarray(img.shape, np.int64).tobytes())
        h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def cache_identity(
    model: torch.nn.Module,
    arch: str,
    entropy: str,
    quantizer: Quantizer,
    data: str,
    weights: np.ndarray | None = None,
    target: float | RDTarget = 0.0,
) -> dict[str, Any]:
    """What a cache's content depends on: model weights, architecture, quantizer (and its
    distortion weights, by SHA-256, and decoder target), images."""
    identity = {
        "format": CACHE_FORMAT,
        "model": model_fingerprint(model),
        "arch": arch,
        "entropy": entropy,
        "quantizer": quantizer_identity(quantizer),
        "data": data,
    }
    if weights is not None:
        identity["weights"] = weights_digest(weights)
    if target:
        identity["target"] = target_record(target)
    return identity


def _kind(name: str) -> str:
    return "image" if name == "image" else "latent" if name in _LATENT else "hyper"


def _describe_mismatch(found: dict, want: dict) -> str:
    if found.get("format") != want["format"]:
        return f"format {found.get('format')}, this version reads {want['format']}"
    if found.get("model") != want["model"] or found.get("arch") != want["arch"]:
        return f"another checkpoint (weights {str(found.get('model'))[:12]}…, this run {want['model'][:12]}…)"
    if any(found.get(k) != want.get(k) for k in ("quantizer", "weights", "target")):
        return f"another quantizer ({found.get('quantizer')}, this run {want['quantizer']})"
    return "other training images"


@dataclasses.dataclass
class LatentCache:
    """An opened cache: memory-mapped fields and per-image offsets.

    Attributes:
        folder: the cache folder.
        meta: the content of ``meta.json`` (identity, shapes, offsets).
        arrays: field name -> flat memory-mapped array.
    """

    folder: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def num_images(self) -> int:
        return len(self.meta["images"])

    def latent_size(self, i: int) -> tuple[int, int]:
        """Latent rows and columns of image ``i`` that lie inside the image."""
        h, w = self.meta["images"][i]["image"][:2]
        return h // 16, w // 16

    def _field(self, name: str, i: int) -> np.ndarray:
        entry = self.meta["images"][i]
        kind = _kind(name)
        shape = entry[kind]
        start = entry[f"{kind}_offset"]
        return self.arrays[name][start : start + int(np.prod(shape))].reshape(shape)

    def image(self, i: int) -> np.ndarray:
        """The (trimmed) training image ``i``, HxWx3 uint8."""
        return self._field("image", i)

    def hyper(self, name: str, i: int) -> np.ndarray:
        """The whole ``z`` or ``ẑ`` of image ``i`` (``C×h×w``, over the padded image)."""
        if name not in _HYPER:
            raise ValueError(f"name must be one of {sorted(_HYPER)}, got {name!r}")
        return self._field(name, i)

    def crop(self, name: str, i: int, top: int, left: int, size: int) -> np.ndarray:
        """The ``size×size`` latent crop of field ``name`` of image ``i`` at latent
        position ``(top, left)``; for ``image`` the matching ``16·size`` pixel crop
        (HxWx3), for ``z``/``z_hat`` the ``size/4`` crop at ``(top/4, left/4)``. A
        read-only view of the memory-mapped cache: copy it (``np.array``) before
        ``torch.from_numpy``."""
        a = self._field(name, i)
        if name == "image":
            return a[16 * top : 16 * (top + size), 16 * left : 16 * (left + size)]
        if name in _HYPER:
            t, le, s = top // 4, left // 4, size // 4
            return a[:, t : t + s, le : le + s]
        return a[:, top : top + size, left : left + size]

    # -- opening and building ------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path, identity: dict[str, Any]) -> LatentCache:
        """Open an existing cache, checking that it was built for ``identity``.

        Raises:
            UserError: no cache there, or one built for another checkpoint, quantizer
                or data.
        """
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except FileNotFoundError:
            raise UserError(f"no latent cache in {folder}") from None
        except (OSError, ValueError):
            raise UserError(f"latent cache {folder} is damaged (meta.json); delete it") from None
        found = meta.get("identity", {})
        if found != identity:
            raise UserError(
                f"latent cache {folder} belongs to {_describe_mismatch(found, identity)}; "
                "delete it or choose another --cache"
            )
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("image", *_LATENT, *_HYPER)}
        return cls(folder, meta, arrays)

    @classmethod
    def build(
        cls,
        folder: str | Path,
        identity: dict[str, Any],
        model: torch.nn.Module,
        entropy: str,
        quantizer: Quantizer,
        images: Sequence[np.ndarray],
        device: torch.device,
        progress: bool = True,
        weights: np.ndarray | None = None,
        target: float | RDTarget = 0.0,
    ) -> LatentCache:
        """Quantize every (trimmed) image once (with the quantizer's per-channel
        distortion ``weights``, if any, and decoder ``target``) and write the cache
        atomically (a temporary folder
        renamed into place, ``meta.json`` last). Every image is computed with the
        caller's torch thread count."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        threads = torch.get_num_threads()
        try:
            coder = LatentCoder(model, entropy)
            entries, offsets, files = [], {"image": 0, "latent": 0, "hyper": 0}, {}
            shapes = [(-(-h // 64) * 64, -(-w // 64) * 64) for h, w, _ in map(np.shape, images)]
            totals = {
                "image": sum(img.size for img in images),
                "latent": sum(hp * wp // 256 for hp, wp in shapes),
                "hyper": sum(hp * wp // 4096 for hp, wp in shapes),
            }
            for img, (hp, wp) in zip(tqdm(images, desc="latent cache", disable=not progress), shapes):
                x = torch.zeros(1, 3, hp, wp)
                x[0, :, : img.shape[0], : img.shape[1]] = to_tensor(img)[0]  # img may be a read-only memmap
                with torch.no_grad():
                    padding = (0, wp - img.shape[1], 0, hp - img.shape[0])
                    q = coder.quantize(x.to(device), quantizer, weights, target, padding)[0]
                    # Numba's first parallel kernel resets the OpenMP thread count that
                    # torch shares: keep the caller's, or g_a's float summation (hence
                    # y) would differ between a process's first build and later ones
                    set_threads(threads, numba=False)
                    y = torch.from_numpy(q.y)[None].to(device)
                    z = model.h_a(torch.abs(y) if entropy == "scale-hyperprior" else y).float().cpu()
                    z_hat = model.entropy_bottleneck.decompress([q.z_string], q.z_shape).cpu()
                values = {
                    "image": img,
                    "y": q.y,
                    "mu": q.mu,
                    "y_hat": q.y_hat,
                    "index": q.result.indices,
                    "qclass": q.result.rows // NUM_SCALES,
                    "z": z[0].numpy(),
                    "z_hat": z_hat[0].numpy(),
                }
                if not files:
                    c, cz = q.y.shape[0], z.shape[1]
                    for name, dtype in (
                        ("image", np.uint8),
                        *_LATENT.items(),
                        *_HYPER.items(),
                    ):
                        kind = _kind(name)
                        mult = {"image": 1, "latent": c, "hyper": cz}[kind]
                        files[name] = np.lib.format.open_memmap(
                            tmp / f"{name}.npy", "w+", dtype, (totals[kind] * mult,)
                        )
                entry = {
                    "image": list(img.shape),
                    "latent": list(q.y.shape),
                    "hyper": list(values["z"].shape),
                }
                for kind in ("image", "latent", "hyper"):
                    entry[f"{kind}_offset"] = offsets[kind]
                for name, a in files.items():
                    kind = _kind(name)
                    flat = np.ascontiguousarray(values[name]).reshape(-1)
                    a[offsets[kind] : offsets[kind] + flat.size] = flat
                for kind in ("image", "latent", "hyper"):
                    offsets[kind] += int(np.prod(entry[kind]))
                entries.append(entry)
            for a in files.values():
                a.flush()
            del files
            meta = {"identity": identity, "images": entries}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(folder, identity)
