"""TCQ-8's saving on the real latents, in the latent domain and in the image, per model.

The synthetic benchmark (``benchmarks/trellis_rd.py``) finds TCQ-8 ≈ 1 dB better than USQ at 1–3 bits
per latent; in the image the shipped models save 0–4 % of rate. This separates the two
steps in between, on the reference models' own latents (first ``--images`` BSDS500
*validation* images, top-left crops with sides multiples of 64; never Kodak or Tecnick):

* **latent domain**: rate (table bits of y) at equal latent SNR against USQ's step sweep
  on the same latents — plain MSE, and MSE weighted by the checkpoint's decoder weights
  (the distortion the trellis minimises when calibrated with weights);
* **image**: rate (y + ẑ bits) at equal PSNR of ``g_s(ŷ)``, 8-bit rounded;
* **structure**: the image change the latent error causes, ``MSE(g_s(y), g_s(ŷ))``, over
  the same for the error shuffled in position inside each channel (same per-channel energy,
  hence the same weighted latent MSE, but no spatial structure): 1 when the decoder
  responds to the error as to independent noise (what the per-channel weights assume);
  and the cross term ``2⟨x − g_s(y), g_s(y) − g_s(ŷ)⟩`` per pixel (error aligned with the
  synthesis error);

for TCQ-8 at the checkpoint's calibrated Δ and weights with λ_T × ``--mults``. If the latent
saving is already small, what limits TCQ is the latents (most carry a fraction of a bit),
not the decoder. Also recorded: the rate distribution, the share of y bits carried by
latents whose USQ table rate is below ½ bit.

    python benchmarks/archive/latent_gain.py --json benchmarks/results/latent_gain.json
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trellis import Quantizer

from qft.eval.bdrate import local_rate_change
from qft.settings import read_settings, resolve_quantizer

from _latents import USQ_STEPS, analyse, arguments, checkpoints, finite, read_images, write_result  # sibling script


def main() -> None:
    p = arguments(__doc__, images=16)
    p.add_argument("--mults", type=float, nargs="+", default=(1.0, 4.0, 16.0, 40.0), help="× the calibrated λ_T")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = read_images(args.data, args.images)
    models = {}
    for spec, ck, coder in checkpoints(args.checkpoint):
        model = ck.model
        lats = analyse(coder, images)
        cal = resolve_quantizer("tcq8", read_settings(ck))
        w = cal.weights
        wc = np.ones(lats[0][1].shape[0]) if w is None else w

        def measure(q: Quantizer, weights) -> dict:
            """Mean over the images: y bits per latent, latent SNRs (plain and weighted), bpp, PSNR."""
            bits = se = wse = energy = wenergy = n = pix = zb = pert = pert_shuffled = cross = 0.0
            rng = np.random.default_rng(0)
            psnr = []
            for x, y, mu, sigma, z_bits in lats:
                r = q.quantize(y, mu, sigma, weights=None if weights is None else weights.reshape(-1, 1, 1))
                e = (r.y_hat - y).astype(np.float64) ** 2
                bits += r.bits
                se += e.sum()
                wse += (e.sum((1, 2)) * wc).sum()
                c = (y - mu).astype(np.float64) ** 2
                energy += c.sum()
                wenergy += (c.sum((1, 2)) * wc).sum()
                n += y.size
                pix += x.shape[-2] * x.shape[-1]
                zb += z_bits
                with torch.no_grad():
                    x_hat = model.g_s(torch.from_numpy(r.y_hat)[None]).clamp(0, 1).mul(255).round().div(255)
                    # the image change the latent error causes, and the same error with its
                    # positions shuffled inside each channel (same energy, no structure)
                    x_y = model.g_s(torch.from_numpy(y)[None])
                    err = r.y_hat - y
                    shuffled = np.stack([rng.permutation(c.ravel()).reshape(c.shape) for c in err])
                    x_q = model.g_s(torch.from_numpy(r.y_hat)[None])
                    x_s = model.g_s(torch.from_numpy(y + shuffled)[None])
                    pert += torch.mean((x_q - x_y) ** 2).item()
                    pert_shuffled += torch.mean((x_s - x_y) ** 2).item()
                    cross += 2 * torch.mean((x - x_y) * (x_y - x_q)).item()
                psnr.append(-10 * math.log10(torch.mean((x_hat - x) ** 2).item()))
            return {
                "bits_per_latent": bits / n,
                "latent_snr_db": 10 * math.log10(energy / se),
                "weighted_latent_snr_db": 10 * math.log10(wenergy / wse),
                "bpp": (bits + zb) / pix,
                "psnr": float(np.mean(psnr)),
                "image_perturbation_mse": pert / len(lats),
                "image_perturbation_mse_shuffled": pert_shuffled / len(lats),
                "structure_factor": pert / pert_shuffled,
                "cross_term_mse": cross / len(lats),
            }

        usq = {s: measure(Quantizer("usq", step=s), None) for s in USQ_STEPS}
        curves = {
            "latent": [(u["bits_per_latent"], u["latent_snr_db"]) for u in usq.values()],
            "weighted_latent": [(u["bits_per_latent"], u["weighted_latent_snr_db"]) for u in usq.values()],
            "image": [(u["bpp"], u["psnr"]) for u in usq.values()],
        }
        tcq = {}
        for mult in args.mults:
            q = Quantizer("tcq8", step=cal.quantizer.step, lam=cal.quantizer.lam * mult)
            t = measure(q, w)
            t["saving"] = {
                "latent": finite(local_rate_change(curves["latent"], (t["bits_per_latent"], t["latent_snr_db"]))),
                "weighted_latent": finite(
                    local_rate_change(curves["weighted_latent"], (t["bits_per_latent"], t["weighted_latent_snr_db"]))
                ),
                "image": finite(local_rate_change(curves["image"], (t["bpp"], t["psnr"]))),
            }
            tcq[str(mult)] = t
        # how the USQ (step 1) bits are spread over latents by their row's entropy
        q1 = Quantizer("usq", step=1.0)
        results = [q1.quantize(y, mu, sigma) for _, y, mu, sigma, _ in lats]
        per = np.concatenate([q1.table.index_bits(r.rows.ravel(), r.indices.ravel()) for r in results])
        p_row = np.exp2(-q1.table.bits)
        entropy = (p_row * q1.table.bits).sum(1)  # expected bits of each table row
        expected = np.concatenate([entropy[r.rows.ravel()] for r in results])
        models[spec] = {
            "calibrated_tcq8": cal.describe(),
            "usq": {str(s): u for s, u in usq.items()},
            "tcq8_by_lambda_mult": tcq,
            "usq1_bits_per_latent": float(per.mean()),
            "share_of_latents_below_half_bit": float((expected < 0.5).mean()),
            "share_of_bits_in_latents_below_half_bit": float(per[expected < 0.5].sum() / per.sum()),
        }
        t1 = tcq[str(args.mults[0])]["saving"]
        print(
            f"{spec}: {per.mean():.3f} bits/latent (USQ), TCQ-8 saving latent {t1['latent']}, weighted "
            f"{t1['weighted_latent']}, image {t1['image']} %",
            flush=True,
        )
    write_result(args.json, "latent_gain", {"data": args.data, "images": len(images), "models": models})


if __name__ == "__main__":
    main()
