"""The image-domain cross term in the quantizer's cost: a decoder-aware target.

The per-channel weights make the trellis minimise the *quadratic* term of the linearised
image error, ``‖x − g_s(y) − J e‖² = ‖x − g_s(y)‖² − 2 gᵀe + eᵀJᵀJ e`` (``e = ŷ − y``,
``J`` the Jacobian of ``g_s`` at ``y``, ``g = Jᵀ(x − g_s(y))``). ``latent_gain.py`` finds
the linear term is not negligible: the error a trellis leaves is aligned with the synthesis
error (positive cross term), more so as λ_T grows. With ``d_c`` the diagonal of ``JᵀJ``
averaged over channel ``c``, the linear term folds into the target: minimising
``Σ d e² − 2 g e`` per element is minimising ``Σ d (y + s − ŷ)²`` with the shift
``s = g / d`` — one diagonal Gauss–Newton step of "decode better" on the latent. Damped
(Levenberg–Marquardt) and scaled: ``η g / (d + ρ·median(d))``; the quantizer (any:
USQ rounds it, the trellis weighs it) then quantizes ``y + η·s``. The decoder needs
nothing. This is :func:`qft.codec.latent.target_direction` (``ρ = 1``, 4 probes), what
``--target η`` does in every qft command; this script sweeps ``η`` on fixed analyses.

``g`` costs one backward pass of ``g_s`` per image, ``d`` four more (Hutchinson,
pixel-space Gaussian probes, seeded). Rates are table bits of y plus the likelihood bits
of ẑ (real streams are within 0.2 %); quality is PSNR of ``g_s(ŷ)`` rounded to 8 bits;
savings are rate changes at equal PSNR against the *plain* USQ step sweep (``vs_usq``)
and against the USQ sweep of the same shifted target (``vs_usq_shifted``: what the trellis
adds on top of the target). TCQ-8 at the checkpoint's calibrated Δ and weights, λ_T ×
``--mults``. Images: top-left crops with sides multiples of 64. ``rd_choice``: ``η`` chosen
per image among :data:`~qft.codec.latent.RD_ETAS` by the model's RD cost (what ``--target
rd`` does), for USQ at step 1 and the calibrated TCQ-8, beside each fixed ``η`` of the set.

    python benchmarks/archive/decoder_target.py --json benchmarks/results/decoder_target_val.json
    python benchmarks/archive/decoder_target.py --data qft/assets/kodak --images 24 --etas 0.25 --json out.json
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from trellis import Quantizer

from qft.codec.latent import RD_ETAS, TARGET_DAMPING, TARGET_PROBES, target_direction, target_record
from qft.eval.bdrate import local_rate_change
from qft.settings import read_settings, resolve_quantizer

from _latents import USQ_STEPS, analyse, arguments, checkpoints, finite, read_images, write_result  # sibling script


def main() -> None:
    p = arguments(__doc__, images=12)
    p.add_argument("--etas", type=float, nargs="+", default=(0.125, 0.25, 0.375))
    p.add_argument("--mults", type=float, nargs="+", default=(1.0, 4.0), help="× the calibrated λ_T")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = read_images(args.data, args.images)
    models = {}
    for spec, ck, coder in checkpoints(args.checkpoint):
        g_s = ck.model.g_s
        t0 = time.perf_counter()
        lats = analyse(coder, images)
        analyse_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        shifts = [target_direction(g_s, x, torch.from_numpy(y)[None])[0] for x, y, *_ in lats]
        target_s = time.perf_counter() - t0
        torch.set_num_threads(args.threads)  # Numba's first parallel kernel may reset it

        def per_image(q: Quantizer, eta: float, w=None) -> list[tuple[float, float]]:
            """``(bpp, MSE)`` of every image."""
            out = []
            for (x, y, mu, sigma, z_bits), s in zip(lats, shifts, strict=True):
                r = q.quantize(y + eta * s, mu, sigma, weights=None if w is None else w.reshape(-1, 1, 1))
                with torch.no_grad():
                    x_hat = g_s(torch.from_numpy(r.y_hat)[None]).clamp(0, 1).mul(255).round().div(255)
                out.append(((r.bits + z_bits) / (x.shape[-2] * x.shape[-1]), torch.mean((x_hat - x) ** 2).item()))
            return out

        def mean_point(rows: list[tuple[float, float]]) -> tuple[float, float]:
            return float(np.mean([b for b, _ in rows])), float(np.mean([-10 * math.log10(m) for _, m in rows]))

        def rd(q: Quantizer, eta: float, w=None) -> tuple[float, float]:
            return mean_point(per_image(q, eta, w))

        def rd_choice(q: Quantizer, w=None) -> dict:
            """``--target rd``: per image the η of RD_ETAS of least λ·255²·MSE + bpp."""
            by = {eta: per_image(q, eta, w) for eta in RD_ETAS}
            picks = [min(RD_ETAS, key=lambda e: lmbda * 255**2 * by[e][i][1] + by[e][i][0]) for i in range(len(lats))]
            point = mean_point([by[e][i] for i, e in enumerate(picks)])
            return {
                "vs_usq": finite(local_rate_change(usq, point)),
                "fixed_vs_usq": {str(e): finite(local_rate_change(usq, mean_point(by[e]))) for e in RD_ETAS},
                "picks": {str(e): picks.count(e) for e in RD_ETAS},
            }

        usq = [rd(Quantizer("usq", step=s), 0.0) for s in USQ_STEPS]
        cal = resolve_quantizer("tcq8", read_settings(ck))
        w, base = cal.weights, cal.quantizer
        plain = {
            str(m): finite(local_rate_change(usq, rd(Quantizer("tcq8", step=base.step, lam=base.lam * m), 0.0, w)))
            for m in args.mults
        }
        by_eta = {}
        for eta in args.etas:
            usq_shifted = [rd(Quantizer("usq", step=s), eta) for s in USQ_STEPS]
            out = {"usq_step1": {"vs_usq": finite(local_rate_change(usq, usq_shifted[USQ_STEPS.index(1.0)]))}}
            for m in args.mults:
                pt = rd(Quantizer("tcq8", step=base.step, lam=base.lam * m), eta, w)
                out[f"tcq8_x{m:g}"] = {
                    "vs_usq": finite(local_rate_change(usq, pt)),
                    "vs_usq_shifted": finite(local_rate_change(usq_shifted, pt)),
                }
            by_eta[str(eta)] = out
        lmbda = float(ck.extra["lambda"])
        per_image_choice = {
            "usq_step1": rd_choice(Quantizer("usq", step=1.0)),
            "tcq8_x1": rd_choice(base, w),
            "calibrated_eta": target_record(cal.target),
        }
        models[spec] = {
            "calibrated_tcq8": cal.describe(),
            "usq_sweep": usq,
            "tcq8_plain_vs_usq": plain,
            "by_eta": by_eta,
            "rd_choice": per_image_choice,
            "seconds": {"analyse": analyse_s, "target": target_s},
        }
        print(
            f"{spec}: TCQ-8 plain {plain}; "
            + "; ".join(
                f"η {e}: USQ {v['usq_step1']['vs_usq']}, TCQ-8 "
                + ", ".join(f"{k} {v[k]['vs_usq']} ({v[k]['vs_usq_shifted']})" for k in v if k != "usq_step1")
                for e, v in by_eta.items()
            )
            + f"; per-image η: USQ {per_image_choice['usq_step1']['vs_usq']}, "
            f"TCQ-8 {per_image_choice['tcq8_x1']['vs_usq']}",
            flush=True,
        )
    write_result(
        args.json,
        "decoder_target",
        {"data": args.data, "images": len(images), "rho": TARGET_DAMPING, "probes": TARGET_PROBES, "models": models},
    )


if __name__ == "__main__":
    main()
