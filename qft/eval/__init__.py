"""Evaluation: metrics on 8-bit RGB, real-bitstream evaluation, CompressAI-schema JSON."""

from qft.eval.bdrate import BD_METHODS, bd_rate
from qft.eval.evaluate import evaluate_images, results_json
from qft.eval.metrics import ms_ssim_rgb, psnr, to_8bit

__all__ = ["BD_METHODS", "bd_rate", "evaluate_images", "ms_ssim_rgb", "psnr", "results_json", "to_8bit"]
