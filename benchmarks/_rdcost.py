"""The per-image scoring of the encoder-help probes (``trellis_loop.py``, ``soft_trellis.py``):
a real stream decoded and scored by the model's RD cost ``J = λ·255²·MSE + bpp``, each
configuration against plain USQ, and the means over the images.

Imported by sibling scripts (``from _rdcost import …``): a script's folder is on ``sys.path``
when it runs.
"""

from __future__ import annotations

import numpy as np
import torch

from qft.codec import Codec

__all__ = ["score", "versus_usq", "means"]


def score(codec: Codec, x: torch.Tensor, bitstream: bytes, lmbda: float, cpu_s: float) -> dict:
    """``{"bpp", "psnr", "J", "cpu_s"}`` of ``bitstream`` for the image ``x`` ``(1, 3, H, W)``, decoded."""
    h, w = x.shape[-2:]
    mse = float((codec.decompress(bitstream)["x_hat"] - x).pow(2).mean())
    bpp = len(bitstream) * 8 / (h * w)
    return {"bpp": bpp, "psnr": -10 * np.log10(mse), "J": lmbda * 255**2 * mse + bpp, "cpu_s": cpu_s}


def versus_usq(rows: dict) -> None:
    """Adds ``dJ_vs_usq_pct`` (the RD cost change against the ``"usq"`` row, %) to every row."""
    for r in rows.values():
        r["dJ_vs_usq_pct"] = 100 * (r["J"] / rows["usq"]["J"] - 1)


def means(per_image: dict, configs) -> dict:
    """``{"mean_dJ_vs_usq_pct", "mean_cpu_s"}`` over the images of ``per_image``, per configuration."""
    return {
        f"mean_{key}": {k: float(np.mean([rows[k][key] for rows in per_image.values()])) for k in configs}
        for key in ("dJ_vs_usq_pct", "cpu_s")
    }
