"""Where the image error of the reference models comes from: synthesis vs quantization.

Issue 9 asks why TCQ-8's latent-domain gain (≈ 1 dB at equal rate, synthetic) shrinks to a
few percent of rate in the image domain. One reason is arithmetic: the image MSE of a
learned codec is the synthesis error that remains without any quantization, MSE(x, g_s(y)),
plus what the quantization error adds. Only the second part responds to a better quantizer.
For every shipped base model, on the first BSDS500 *validation* images (centre crops, sides
multiples of 64; never Kodak or Tecnick), this measures:

* ``mse_unquantized``: MSE(x, g_s(y)), ``y`` unquantized;
* the saving ``qft calibrate`` recorded for TCQ-8 (rate at equal PSNR vs USQ), when there is one;
* per quantizer (USQ at step 1, the calibrated TCQ-8 with its weights): the latent MSE
  ``mean((ŷ − y)²)``, the image MSE, PSNR, the table rate (bpp, y only), and the share of
  the image MSE that the quantization adds, ``(MSE(x, g_s(ŷ)) − MSE(x, g_s(y))) / MSE(x, g_s(ŷ))``.

    python benchmarks/archive/error_budget.py --json benchmarks/results/error_budget.json
    python benchmarks/archive/error_budget.py -m runs/x/model.pth --json out.json   # any checkpoints
"""

from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import torch

from qft.codec import LatentCoder, list_images, read_image
from qft.models import ARCHITECTURES, load_checkpoint
from qft.models.zoo import base_entries
from qft.settings import read_settings, resolve_quantizer

from _latents import arguments, write_result  # sibling script


def _centre(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2] // 64 * 64, x.shape[-1] // 64 * 64
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def main() -> None:
    args = arguments(__doc__, images=8).parse_args()
    torch.set_num_threads(args.threads)
    images = [_centre(read_image(f)) for f in list_images(args.data)[: args.images]]

    specs = args.checkpoint or [Path(e["file"]).stem for e in base_entries()]
    models = {}
    for spec in specs:
        ck = load_checkpoint(spec)
        settings = read_settings(ck)
        coder = LatentCoder(ck.model.eval(), ARCHITECTURES[ck.arch].entropy)
        choices = {"usq": resolve_quantizer("usq", settings), "tcq8": resolve_quantizer("tcq8", settings)}
        sums: dict = {"mse_unquantized": 0.0, "pixels": 0}
        for x in images:
            with torch.no_grad():
                (lat,) = coder.quantize(x, choices["usq"].quantizer)
                mse_y = torch.mean((ck.model.g_s(torch.from_numpy(lat.y)[None]).clamp(0, 1) - x) ** 2).item()
                sums["mse_unquantized"] += mse_y
                sums["pixels"] += x.shape[-2] * x.shape[-1]
                for name, choice in choices.items():  # USQ is the analysis' own quantization
                    q = lat.result if name == "usq" else coder.requantize(lat, choice.quantizer, choice.weights).result
                    x_hat = ck.model.g_s(torch.from_numpy(q.y_hat)[None]).clamp(0, 1)
                    s = sums.setdefault(name, {"latent_mse": 0.0, "image_mse": 0.0, "bits": 0.0})
                    s["latent_mse"] += float(np.mean((q.y_hat - lat.y) ** 2))
                    s["image_mse"] += torch.mean((x_hat - x) ** 2).item()
                    s["bits"] += float(q.bits)
        n = len(images)
        out = {
            "mse_unquantized": sums["mse_unquantized"] / n,
            "psnr_unquantized": -10 * math.log10(sums["mse_unquantized"] / n),
        }
        for name, choice in choices.items():
            s = sums[name]
            mse = s["image_mse"] / n
            out[name] = {
                "quantizer": choice.describe(),
                "latent_mse": s["latent_mse"] / n,
                "image_mse": mse,
                "psnr": -10 * math.log10(mse),
                "bpp_y": s["bits"] / sums["pixels"],
                "quantization_share": (mse - out["mse_unquantized"]) / mse,
            }
        calibrated = settings.get("methods", {}).get("tcq8", {})
        if "saving" in calibrated:  # what qft calibrate measured (rate at equal PSNR vs USQ, %)
            out["calibrated_tcq8"] = {
                **{k: calibrated[k] for k in ("step", "lambda_mult", "weights", "saving", "best_saving")},
                "saving_by_weights": {w: v["saving"] for w, v in calibrated.get("by_weights", {}).items()},
            }
        # positive: TCQ-8 leaves more latent error (at its own, lower, rate)
        out["latent_mse_tcq8_over_usq_db"] = 10 * math.log10(out["tcq8"]["latent_mse"] / out["usq"]["latent_mse"])
        models[spec] = out
        print(
            f"{spec}: unquantized {out['psnr_unquantized']:.2f} dB, USQ {out['usq']['psnr']:.2f} dB "
            f"({100 * out['usq']['quantization_share']:.0f} % of the MSE from quantization), TCQ-8 "
            f"{out['tcq8']['psnr']:.2f} dB; latent MSE TCQ-8 / USQ {out['latent_mse_tcq8_over_usq_db']:+.2f} dB, "
            f"bpp(y) {out['usq']['bpp_y']:.3f} → {out['tcq8']['bpp_y']:.3f}",
            flush=True,
        )
    write_result(args.json, "error_budget", {"data": args.data, "images": len(images), "models": models})


if __name__ == "__main__":
    main()
