"""SGA through the trellis: how to split the steps, which temperatures (issue 24).

A refinement of ``N`` steps for a trellis quantizer spends its first ``(1 − share)·N``
steps on SGA (``y`` and ``z``, step-1 grid) and the rest on the relaxed trellis (``y``,
``z`` fixed; :func:`qft.codec.refine.refine_through_trellis`). Measured here per image,
on the model's RD cost ``J = λ·255²·MSE + bpp`` of real, decoded streams against plain
USQ: SGA-N with USQ, and with TCQ-8 at each ``share`` of ``--shares`` (0: SGA then the
trellis codes SGA's latent, the form that lost), each soft-trellis temperature schedule of
``--taus`` and each multiple ``--lambda-t-scales`` of TCQ-8's calibrated λ_T (what the
codec's SGA path uses). BSDS500 *validation* images (full size; nothing is tuned on Kodak), the shipped
``mbt2018-mean-0.013`` (``--model``) at its calibrated TCQ-8 step, no target, one thread.
Writes ``benchmarks/results/soft_trellis.json`` after every image, with the machine's load
(seconds on a shared machine are upper bounds).

    python benchmarks/soft_trellis.py --images 3 --steps 200 --shares 0 0.25 0.5 0.75 1
    python benchmarks/soft_trellis.py --model mbt2018-mean-0.0035 --steps 200 --shares 0.5 \
        --lambda-t-scales 0.5 1 2 -o benchmarks/results/soft_trellis_lt_0.0035.json

``--family A.json B.json …`` codes nothing: from records of several models (a model's
records joined; every model over the same images), the family's BD-rate of every
configuration they share against plain USQ — the mean (bpp, PSNR) over the images per
model, pchip over the models on both curves' Pareto fronts
(:func:`qft.eval.bdrate.front_bd_rate`), as ``qft report`` computes it — written to
``-o``. The RD cost at each model's own λ and this BD can disagree (a setting that moves
each point up its curve):

    python benchmarks/soft_trellis.py --family r0.0035.json r0.0067.json r0.013.json \
        r0.025.json r0.0483.json -o family.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from pathlib import Path

import numpy as np

from _rdcost import means, score, versus_usq  # sibling helper (the script's folder is on sys.path)

from trellis.hardware import machine_info

from qft.codec import Codec, SGARefine, list_images, read_image
from qft.codec.refine import SOFT_TAU_END, SOFT_TAU_START
from qft.eval.bdrate import front_bd_rate
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

OUT = Path(__file__).parent / "results" / "soft_trellis.json"
DATA = Path(__file__).parents[1].parent / "shared" / "data" / "bsds500" / "val"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mbt2018-mean-0.013")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--skip", type=int, default=0, help="start after this many images")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, nargs="+", default=[200])
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument(
        "--taus",
        nargs="+",
        default=[f"{SOFT_TAU_START:g}:{SOFT_TAU_END:g}"],
        help="soft-trellis temperature schedules START:END (default: the codec's)",
    )
    ap.add_argument("--tcq-step", type=float, default=None, help="TCQ-8's Δ instead of the calibrated one")
    ap.add_argument(
        "--lambda-t-scales",
        type=float,
        nargs="+",
        default=[1.0],
        help="multiples of TCQ-8's λ_T (the codec's with SGA) for the trellis phase and the final Viterbi",
    )
    ap.add_argument(
        "--plain-rows",
        type=int,
        nargs="+",
        default=None,
        help="TCQ-8's plain rows, one configuration each (default: the calibrated)",
    )
    ap.add_argument("--family", nargs="+", metavar="JSON", help="only the family's BD over these records (above)")
    ap.add_argument("-o", "--output", default=str(OUT))
    args = ap.parse_args()
    if args.family:
        return family(args.family, args.output)
    set_threads(1)
    ck = load_checkpoint(args.model)
    settings = read_settings(ck)
    lmbda = settings["model_lambda"]
    codec = Codec.from_checkpoint(ck)
    usq = resolve_quantizer("usq", settings, target=0.0)
    # suffix: TCQ-8 at the calibrated plain rows, or at each of --plain-rows
    tcqs = {
        (f" plain {p}" if args.plain_rows else ""): resolve_quantizer("tcq8", settings, target=0.0, plain_rows=p)
        for p in (args.plain_rows or [None])
    }
    if args.tcq_step:
        tcqs = {
            k: dataclasses.replace(t, quantizer=dataclasses.replace(t.quantizer, step=args.tcq_step))
            for k, t in tcqs.items()
        }
    tcq = next(iter(tcqs.values()))
    taus = [tuple(float(v) for v in t.split(":")) for t in args.taus]
    # name: (choice, SGA refinement or None)
    configs = {"usq": (usq, None), "tcq8": (tcq, None)}
    for n in args.steps:
        configs[f"sga{n}+usq"] = (usq, SGARefine(lmbda, n))
        for share in args.shares:
            for tau in taus if share else taus[:1]:
                for scale in args.lambda_t_scales:
                    for suffix, t in tcqs.items():
                        name = (
                            f"sga{n}+tcq8 share {share:g}"
                            + (f" tau {tau[0]:g}:{tau[1]:g}" if share and len(taus) > 1 else "")
                            + (f" lambda_t x{scale:g}" if len(args.lambda_t_scales) > 1 else "")
                            + suffix
                        )
                        c = dataclasses.replace(
                            t, quantizer=dataclasses.replace(t.quantizer, lam=t.quantizer.lam * scale)
                        )
                        configs[name] = (c, SGARefine(lmbda, n, trellis_share=share, trellis_taus=tau))
    images = list_images(args.data)[args.skip : args.skip + args.images]
    record = {
        "model": args.model,
        "model_lambda": lmbda,
        "tcq8": tcq.describe(),
        "plain_rows": args.plain_rows,
        "taus": args.taus,
        "lambda_t_base": {"base": "calibrated", "lambda_t": tcq.quantizer.lam},
        "lambda_t_scales": args.lambda_t_scales,
        "data": os.path.relpath(args.data, Path(__file__).parents[1]),
        "images": [p.name for p in images],
        "threads": 1,
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "per_image": {},
    }
    for path in images:
        x = read_image(path)
        rows = {}
        for name, (c, refine) in configs.items():
            t0 = time.process_time()
            enc = codec.compress(x, c.quantizer, c.weights, 0.0, refine)
            seconds = time.process_time() - t0
            rows[name] = score(codec, x, enc["bitstream"], lmbda, seconds)
            print(path.name, name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
        versus_usq(rows)
        record["per_image"][path.name] = rows
        record |= means(record["per_image"], configs)
        record["load_after"] = os.getloadavg()
        atomic_write(args.output, json.dumps(record, indent=1).encode())
    print(json.dumps(record["mean_dJ_vs_usq_pct"], indent=1))


def family(paths: list[str], output: str) -> None:
    """The family's BD-rate of each configuration the records at ``paths`` share against
    plain USQ (module docstring), into ``output``: the models in the order of their λ, the
    points used (``bd_points``) and the mean RD cost change per model. A model's records
    (other images, e.g. one process each) are joined."""
    models: dict[str, dict] = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        if not {"model", "model_lambda", "tcq8", "per_image"} <= set(r):
            raise SystemExit(f"soft_trellis --family: {p} is not a record of this script (a family's output?)")
        m = models.setdefault(r["model"], {"lambda": r["model_lambda"], "tcq8": r["tcq8"], "per_image": {}})
        if r["tcq8"] != m["tcq8"] or set(r["per_image"]) & set(m["per_image"]):
            raise SystemExit(f"soft_trellis --family: {p} repeats an image of {r['model']} or has other TCQ-8 settings")
        m["per_image"] |= r["per_image"]
    order = sorted(models, key=lambda k: models[k]["lambda"])
    rows = [list(models[k]["per_image"].values()) for k in order]  # per model, per image
    same_images = len({tuple(sorted(models[k]["per_image"])) for k in order}) == 1
    if not same_images or len({models[k]["lambda"] for k in order}) < len(order):
        raise SystemExit("soft_trellis --family: give one model per λ, all over the same images")
    names = [k for k in rows[0][0] if all(k in row for rs in rows for row in rs)]
    curve = {
        k: [(np.mean([x[k]["bpp"] for x in rs]), np.mean([x[k]["psnr"] for x in rs])) for rs in rows] for k in names
    }
    out = {
        "records": paths,
        "models": order,
        "images": sorted(models[order[0]]["per_image"]),
        "tcq8": [models[k]["tcq8"] for k in order],
        "bd_vs_usq_pchip": {},
        "bd_points": {},
    }
    for k in names:
        if k != "usq":
            bd, sel = front_bd_rate(curve["usq"], curve[k])
            out["bd_vs_usq_pchip"][k], out["bd_points"][k] = bd, [order[j] for j in sel]
    per_model = [means(models[m]["per_image"], names)["mean_dJ_vs_usq_pct"] for m in order]
    out["mean_dJ_vs_usq_pct"] = {k: [pm[k] for pm in per_model] for k in names}
    atomic_write(output, json.dumps(out, indent=1).encode())
    print(json.dumps(out["bd_vs_usq_pchip"], indent=1))


if __name__ == "__main__":
    main()
