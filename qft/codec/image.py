"""Image reading and writing, padding and cropping.

Conversions (each announced with one warning line, never silent):

* grayscale (``L``, ``1``) → RGB by replicating the channel;
* with alpha (``RGBA``, ``LA``, ``PA``) → the alpha channel is dropped;
* 16-bit and 32-bit grayscale (``I;16``, ``I``) and float (``F``) → 8-bit by ``round(v / 257)``
  (16-bit) or clipping to 0…255 (others), then RGB; 16-bit RGB PNGs arrive from Pillow
  already reduced to 8 bits;
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` → RGB by Pillow's conversion;
* palette (``P``) → RGB silently (lossless).

Models see float tensors in ``[0, 1]`` of shape ``(1, 3, H, W)``; sizes are padded to a
multiple of 64 (zeros, centred, as CompressAI's ``eval_model``) and cropped back.
"""

from __future__ import annotations

import warnings

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from PIL import Image, UnidentifiedImageError

from qft.errors import UserError
from qft.files import atomic_write

__all__ = [
    "IMAGE_SUFFIXES",
    "OUTPUT_FORMATS",
    "output_format",
    "read_rgb",
    "read_image",
    "to_tensor",
    "write_image",
    "pad",
    "padding_for",
    "crop",
    "list_images",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Decoded images are written losslessly: Pillow's format for each accepted suffix.
OUTPUT_FORMATS = {".png": "PNG", ".ppm": "PPM", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        if "transparency" in img.info:
            warnings.warn(f"{name}: palette image with transparency, alpha dropped", stacklevel=3)
        return img.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = np.round(a / 257.0) if mode.startswith("I;16") else a
        warnings.warn(f"{name}: {mode} image converted to 8-bit RGB", stacklevel=3)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        warnings.warn(f"{name}: alpha channel dropped", stacklevel=3)
    elif mode in ("L", "1"):
        warnings.warn(f"{name}: grayscale image replicated to RGB", stacklevel=3)
    else:
        warnings.warn(f"{name}: {mode} image converted to RGB", stacklevel=3)
    return img.convert("RGB")


def read_rgb(path: str | Path) -> np.ndarray:
    """Reads an image file as RGB ``uint8`` ``(H, W, 3)``, converting as the module
    docstring says (with a warning for every lossy conversion): the one image reader of
    qft (codec, evaluation, training data, finetuning cache).

    Raises:
        UserError: the file does not exist or is not an image Pillow can read.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            img.load()
            rgb = _to_rgb(img, path.name)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise UserError(
            f"{path}: not a readable image ({exc.__class__.__name__}); give a PNG, JPEG, BMP, PPM, TIFF or WebP file"
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An RGB ``uint8`` array ``(H, W, 3)`` as a float tensor ``(1, 3, H, W)`` in ``[0, 1]``
    (a copy: the array may be read-only, e.g. a memory map)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def read_image(path: str | Path) -> torch.Tensor:
    """Reads an image file as a float tensor ``(1, 3, H, W)`` in ``[0, 1]`` (:func:`read_rgb`).

    Raises:
        UserError: the file does not exist or is not an image Pillow can read.
    """
    return to_tensor(read_rgb(path))


def output_format(path: str | Path) -> str:
    """Pillow's format name for an output image path (:data:`OUTPUT_FORMATS`, by suffix).

    Raises:
        UserError: a suffix qft does not write (a lossy or unknown format).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UserError(
            f"{path}: cannot write a '{suffix}' image; name the output "
            f"{' or '.join(sorted(set(OUTPUT_FORMATS)))} (lossless formats)"
        )
    return OUTPUT_FORMATS[suffix]


def write_image(x: torch.Tensor, path: str | Path) -> None:
    """Writes ``(1, 3, H, W)`` or ``(3, H, W)`` values in ``[0, 1]`` as an 8-bit RGB image,
    atomically (:func:`qft.files.atomic_write`), in the format of its suffix (:func:`output_format`)."""
    fmt = output_format(path)
    x = x.detach().squeeze(0).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    img = Image.fromarray(x, "RGB")
    atomic_write(path, lambda f: img.save(f, fmt))


def padding_for(height: int, width: int, multiple: int = 64) -> tuple[int, int, int, int]:
    """Centred zero padding ``(left, right, top, bottom)`` up to a multiple of ``multiple``."""
    ph, pw = (-height) % multiple, (-width) % multiple
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def pad(x: torch.Tensor, multiple: int = 64) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Zero-pads height and width to a multiple, centred. Returns ``(x_padded, padding)``.

    ``padding = (left, right, top, bottom)`` (:func:`padding_for`), the argument of :func:`crop`.
    """
    padding = padding_for(*x.shape[-2:], multiple)
    return F.pad(x, padding, mode="constant", value=0.0), padding


def crop(x: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Removes the padding added by :func:`pad`."""
    left, right, top, bottom = padding
    h, w = x.shape[-2:]
    return x[..., top : h - bottom, left : w - right]


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files in a folder, sorted.

    Args:
        folder: the folder.
        recursive: also in subfolders (as CompressAI's ``eval_model``); otherwise only
            directly inside (as CompressAI's ``ImageFolder`` split folders).

    Raises:
        UserError: not a folder, or no image in it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files
