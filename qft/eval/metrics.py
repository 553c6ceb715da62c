"""Image quality metrics on 8-bit-rounded RGB, as CompressAI's ``eval_model``."""

from __future__ import annotations

import math

import torch

from pytorch_msssim import ms_ssim

__all__ = ["to_8bit", "psnr", "ms_ssim_rgb"]

#: MS-SSIM's five scales need both sides above this many pixels.
MS_SSIM_MIN_SIDE = 161


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Values in ``[0, 1]`` rounded to the 256 levels of an 8-bit image (still in [0, 1])."""
    return x.clamp(0, 1).mul(255).round().div(255)


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """PSNR in dB of 8-bit-rounded RGB images in ``[0, 1]``."""
    mse = torch.mean((to_8bit(x) - to_8bit(x_hat)) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ms_ssim_rgb(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MS-SSIM of 8-bit-rounded RGB images; NaN for images too small for five scales."""
    if min(x.shape[-2:]) < MS_SSIM_MIN_SIDE:
        return float("nan")
    return ms_ssim(to_8bit(x), to_8bit(x_hat), data_range=1.0).item()
