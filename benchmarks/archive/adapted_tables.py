"""Would coding tables learned from real quantizer output change TCQ's gain over USQ?

qft codes every index with the Gaussian cell mass of the model's ``σ`` (design.md D6):
the entropy model as trained. At inference the indices do not follow that model exactly
(noise-trained model; trellis decisions that are not nearest-neighbour). This measures how
much rate a probability model *adapted to the real indices* would save, per quantizer, and
whether it moves TCQ-8's saving against USQ — the open RD goal of issues 4 and 9.

Per shipped base model: latents of the first ``--train-images`` BSDS500 *train* images fit
the tables, the first ``--val-images`` BSDS500 *validation* images measure them (top-left
crops, sides multiples of 64; never Kodak or Tecnick). An adapted row is the histogram of
the indices coded in that row (class × scale row, as the coder selects rows) plus
``--alpha`` pseudo-counts of the Gaussian row, as ideal code lengths ``−log2 p``; escapes
keep the Gaussian cost. Rates are table bits of y plus the likelihood bits of ẑ; quality
is PSNR of ``g_s(ŷ)`` rounded to 8 bits. Variants:

* ``gauss``: the shipped codec (decisions and coding with the Gaussian tables);
* ``adapted``: the same indices coded with adapted rows (USQ: refitted at every step of
  its sweep);
* ``adapted_state`` (TCQ-8): rows adapted per trellis *state* (8 × 64 rows instead of
  2 × 64) — the state-dependent tables of VVC's context sets, which the engine lacks;
* ``adapted_trellis`` (TCQ-8): the trellis decides with the adapted rates too (fit,
  quantize with them, refit).

Savings are rate changes at equal PSNR against the USQ step sweep coded the same way
(:func:`qft.eval.bdrate.local_rate_change`), TCQ-8 at the checkpoint's calibrated Δ,
weights and λ_T times ``--mults``.

    python benchmarks/archive/adapted_tables.py --json benchmarks/results/adapted_tables.json
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from trellis import Quantizer, RateTable

from qft.eval.bdrate import local_rate_change
from qft.settings import read_settings, resolve_quantizer

from _latents import BSDS500_VAL, analyse, arguments, checkpoints, finite, read_images, write_result  # sibling script

DATA = BSDS500_VAL.parent
USQ_STEPS = (0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)


@dataclasses.dataclass(frozen=True)
class TableQuantizer(Quantizer):
    """A :class:`Quantizer` whose trellis decides with the rates of ``rates``."""

    rates: RateTable | None = None

    @property
    def table(self) -> RateTable:
        return self.rates


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f} %"


def adapted_bits(q: Quantizer, results, weights, alpha: float, by_state: bool) -> np.ndarray:
    """``−log2`` of the adapted rows (``[states ×] rows, 2 kmax + 1``) from quantizer outputs."""
    tab = q.table
    rows, width = tab.bits.shape
    states = q.machine.num_states if by_state else 1
    counts = np.zeros((states * rows, width))
    for r in results:
        key = r.rows.ravel().astype(np.int64) + (rows * r.states.ravel().astype(np.int64) if by_state else 0)
        k = r.indices.ravel().astype(np.int64)
        inside = np.abs(k) <= tab.kmax
        np.add.at(counts, (key[inside], k[inside] + tab.kmax), 1)
    prior = np.tile(np.exp2(-tab.bits), (states, 1))
    return -np.log2((counts + alpha * prior) / (counts.sum(1, keepdims=True) + alpha))


def coded_bits(q: Quantizer, r, bits: np.ndarray | None, by_state: bool = False) -> float:
    """Bits of one result's indices under ``bits`` (``None``: the Gaussian tables)."""
    tab = q.table
    gauss = tab.index_bits(r.rows.ravel(), r.indices.ravel())
    if bits is None:
        return float(gauss.sum())
    key = r.rows.ravel().astype(np.int64) + (tab.bits.shape[0] * r.states.ravel().astype(np.int64) if by_state else 0)
    k = r.indices.ravel().astype(np.int64)
    inside = np.abs(k) <= tab.kmax
    gauss[inside] = bits[key[inside], k[inside] + tab.kmax]
    return float(gauss.sum())


def main() -> None:
    p = arguments(__doc__)
    p.add_argument("--train-images", type=int, default=40)
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--alpha", type=float, default=20.0, help="pseudo-counts of the Gaussian row")
    p.add_argument("--mults", type=float, nargs="+", default=(1.0, 4.0), help="× the calibrated λ_T")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, val = read_images(DATA / "train", args.train_images), read_images(DATA / "val", args.val_images)
    models = {}
    for spec, ck, coder in checkpoints(args.checkpoint):
        model = ck.model

        lat_train, lat_val = analyse(coder, train), analyse(coder, val)

        def quantize(q, w, lats):
            return [q.quantize(y, mu, sigma, weights=w) for _, y, mu, sigma, _ in lats]

        def rd(q, results, bits=None, by_state=False):
            """(bpp, PSNR) over the validation images."""
            bpp, psnr = [], []
            for (x, *_, z_bits), r in zip(lat_val, results, strict=True):
                with torch.no_grad():
                    x_hat = model.g_s(torch.from_numpy(r.y_hat)[None]).clamp(0, 1).mul(255).round().div(255)
                bpp.append((coded_bits(q, r, bits, by_state) + z_bits) / (x.shape[-2] * x.shape[-1]))
                psnr.append(-10 * np.log10(torch.mean((x_hat - x) ** 2).item()))
            return float(np.mean(bpp)), float(np.mean(psnr))

        usq = {}
        for s in USQ_STEPS:
            q = Quantizer("usq", step=s)
            fitted = adapted_bits(q, quantize(q, None, lat_train), None, args.alpha, False)
            res = quantize(q, None, lat_val)
            usq[s] = {"gauss": rd(q, res), "adapted": rd(q, res, fitted)}
        anchor = {v: [usq[s][v] for s in USQ_STEPS] for v in ("gauss", "adapted")}

        cal = resolve_quantizer("tcq8", read_settings(ck))
        w = None if cal.weights is None else cal.weights.reshape(-1, 1, 1)
        tcq = {}
        for mult in args.mults:
            q = Quantizer("tcq8", step=cal.quantizer.step, lam=cal.quantizer.lam * mult)
            res_train, res = quantize(q, w, lat_train), quantize(q, w, lat_val)
            fitted = adapted_bits(q, res_train, w, args.alpha, False)
            fitted_state = adapted_bits(q, res_train, w, args.alpha, True)
            # the trellis deciding with adapted rates: fit, quantize with them, refit
            qa = TableQuantizer("tcq8", q.step, q.lam, rates=dataclasses.replace(q.table, bits=fitted))
            refitted = adapted_bits(qa, quantize(qa, w, lat_train), w, args.alpha, False)
            qa = dataclasses.replace(qa, rates=dataclasses.replace(q.table, bits=refitted))
            points = {
                "gauss": (rd(q, res), "gauss"),
                "adapted": (rd(q, res, fitted), "adapted"),
                "adapted_state": (rd(q, res, fitted_state, True), "adapted"),
                "adapted_trellis": (rd(qa, quantize(qa, w, lat_val), qa.rates.bits), "adapted"),
            }
            tcq[str(mult)] = {
                v: {"bpp": pt[0], "psnr": pt[1], "saving_vs_usq": finite(local_rate_change(anchor[a], pt))}
                for v, (pt, a) in points.items()
            }
        u1 = usq[1.0]
        models[spec] = {
            "usq": {str(s): {"gauss": v["gauss"], "adapted": v["adapted"]} for s, v in usq.items()},
            "usq1_rate_change_adapted": 100 * (u1["adapted"][0] / u1["gauss"][0] - 1),
            "tcq8": {"quantizer": cal.describe(), "by_lambda_mult": tcq},
        }
        t1 = tcq[str(args.mults[0])]
        print(
            f"{spec}: adapted tables USQ {models[spec]['usq1_rate_change_adapted']:+.2f} % rate; TCQ-8 vs USQ "
            + ", ".join(f"{v} {_pct(t1[v]['saving_vs_usq'])}" for v in t1),
            flush=True,
        )
    write_result(
        args.json,
        "adapted_tables",
        {"train_images": len(train), "val_images": len(val), "alpha": args.alpha, "models": models},
    )


if __name__ == "__main__":
    main()
