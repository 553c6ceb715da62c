"""SGA latent refinement (qft.codec.refine) against the cheap encoder help, real bitstreams.

Issue 24's table: for the shipped base models (or those given), on Kodak or any folder,
per configuration the mean bpp, PSNR, the model's RD cost ``λ·255²·MSE + bpp`` and encode
seconds per image, and — over two or more models, one rate point each — the BD-rate
(pchip, PSNR) against plain USQ. Configurations: USQ, USQ + target ``rd``, TCQ-8 without
target, TCQ-8 + target (calibrated settings: what ``qft compress -q tcq8`` does), and for
each N of ``--steps`` SGA-N with USQ as the final quantizer, SGA-N then TCQ-8 (SGA's latent
coded by the trellis; the same refinement as USQ's) and SGA-N + TCQ-8 (what ``qft compress
-q tcq8 --refine sga --refine-steps N`` does: the last half of the steps through the relaxed
trellis, ``qft.codec.refine``). Each configuration's encode time is its refinement's plus
its own quantization and coding. The summary adds, per N, SGA-N + TCQ-8 or USQ: per image
the one of the two with the lower RD cost, what ``--refine-fallback`` codes (its time the
sum of both less the SGA head they share; ``usq_kept_by_fallback`` counts the images where
USQ was kept).

Writes ``benchmarks/results/refine_sga.json`` (``-o``), after every image (partial results
survive a timeout); the machine and its load are recorded (times taken on a shared machine
are upper bounds). ``--device cuda`` runs the transforms and SGA on a GPU (the trellis and
the entropy coder stay on the CPU).

    python benchmarks/refine_sga.py --models mbt2018-mean-0.013 --images 2 --steps 50 200
    python benchmarks/refine_sga.py --device cuda --steps 50 200 1000           # all shipped, Kodak
    python benchmarks/refine_sga.py --device cuda --steps 50 200 1000 \\
        --data ../shared/data/tecnick_sampling_300x300 -o benchmarks/results/refine_sga_tecnick.json
    python benchmarks/refine_sga.py --merge a.json b.json -o refine_sga.json   # models or images run apart
    python benchmarks/refine_sga.py --models mbt2018-mean-0.0035 --steps 1000 --center-crop 320  # no padding
    python benchmarks/refine_sga.py --steps 1000 --configs usq usq+target_rd tcq8 tcq8+target sga1000+usq \
        sga1000+tcq8 --reuse old.json     # after a change of the TCQ-8 settings: only the trellis rows are coded

``--reuse OLD`` copies, per model and image, the row of every configuration whose settings
(its ``configs`` entry) are those of OLD, a record of the same data, crop, device and kind
of CPU: SGA's float path is deterministic there, so the row would repeat bit for bit (the
encode seconds are OLD's). ``--configs`` keeps only the configurations named (an SGA-N
then TCQ-8 row needs the SGA-N run that a reused SGA-N + USQ row saves).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from pathlib import Path

import numpy as np
import torch

from trellis import Quantizer
from trellis.hardware import machine_info

from qft.codec import Codec, SGARefine, list_images, pad, read_image
from qft.codec.refine import TRELLIS_SHARE
from qft.eval.bdrate import front_bd_rate
from qft.files import atomic_write
from qft.models import load_checkpoint
from qft.models.zoo import base_entries
from qft.settings import read_settings, resolve_quantizer
from qft.threads import set_threads

ROOT = Path(__file__).parents[1]
OUT = Path(__file__).parent / "results" / "refine_sga.json"
KEYS = ("bpp", "psnr", "rd_cost", "encode_s")


def configs(settings: dict, steps: list[int]) -> dict:
    """name → (quantizer choice, SGA steps or 0, share of them through the trellis)."""
    out = {
        "usq": (resolve_quantizer("usq", settings, target=0.0), 0, 0.0),
        "usq+target_rd": (resolve_quantizer("usq", settings, target="rd"), 0, 0.0),
        "tcq8": (resolve_quantizer("tcq8", settings, target=0.0), 0, 0.0),
        "tcq8+target": (resolve_quantizer("tcq8", settings), 0, 0.0),
    }
    for n in steps:  # the codec's choices with SGA
        sga = {"refine": "sga", "refine_steps": n}
        out[f"sga{n}+usq"] = (resolve_quantizer("usq", settings, **sga), n, 0.0)
        out[f"sga{n} then tcq8"] = (resolve_quantizer("tcq8", settings, **sga), n, 0.0)
        out[f"sga{n}+tcq8"] = (resolve_quantizer("tcq8", settings, **sga), n, TRELLIS_SHARE)
    return out


def selected(table: dict, names: list[str] | None) -> dict:
    """The configurations of ``table`` named by ``--configs`` (None: all), in ``table``'s
    order. Raises ``SystemExit`` for a name ``table`` lacks, or without ``usq`` (the anchor
    of every BD and of ``--merge``)."""
    if names is None:
        return table
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"refine_sga --configs: no configuration {unknown}; these exist: {sorted(table)}")
    if "usq" not in names:
        raise SystemExit("refine_sga --configs: name usq too, the anchor of every BD and of --merge")
    return {k: v for k, v in table.items() if k in names}


def center_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """The centred ``size × size`` crop of an image ``(1, 3, H, W)`` (None: the image).

    Raises ``SystemExit`` when the image is smaller than ``size``."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise SystemExit(f"refine_sga --center-crop {size}: an image is only {h}×{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def reuse_source(path: str, record: dict) -> dict:
    """The record at ``path`` for ``--reuse``; refused where it differs from this run
    (``record``'s header) in data, crop, device or kind of CPU, where its rows would not
    repeat."""
    old = json.loads(Path(path).read_text())
    if not isinstance(old, dict) or "per_model" not in old:
        raise SystemExit(f"refine_sga --reuse: {path} is not a refine_sga record")
    if any(old.get(k) != record[k] for k in SHARED):
        raise SystemExit(f"refine_sga --reuse: {path} differs from this run in data, crop or device")
    if old["machine"]["cpu"] != record["machine"]["cpu"]:
        raise SystemExit(f"refine_sga --reuse: {path} ran on another CPU, where SGA's float path differs")
    return old


def reused_rows(old: dict | None, model: str, configs: dict, image: str) -> dict:
    """name → ``image``'s row in ``old`` (a ``--reuse`` record) for every configuration of
    ``configs`` (name → its ``configs`` entry) that ``old`` ran for ``model`` with the same
    settings and on that image; ``{}`` without ``old``."""
    entry = (old or {}).get("per_model", {}).get(model)
    if entry is None:
        return {}
    out = {}
    for name, described in configs.items():
        if entry["configs"].get(name) != described:
            continue
        row = next((r for r in entry["rows"].get(name, []) if r["image"] == image), None)
        if row is not None:
            out[name] = {**row, "reused": True}
    return out


def code_image(codec: Codec, x: torch.Tensor, lmbda: float, table: dict) -> dict:
    """Every configuration of ``table`` on one image ``(1, 3, H, W)``: name → row."""
    h, w = x.shape[-2:]
    rows, refined = {}, {}
    for name, (c, n, share) in table.items():
        t0 = time.perf_counter()
        if n == 0 or share > 0:  # the codec's own path (SGA through the trellis for a share)
            refine = SGARefine(lmbda, n, trellis_share=share) if n else None
            out = codec.compress(x, c.quantizer, c.weights, c.target, refine)
            seconds = time.perf_counter() - t0
        else:
            if n not in refined:  # SGA once per N; USQ and "then TCQ-8" code its latent
                xp, padding = pad(x.to(codec.device))
                (lat,) = codec.latent_coder.latents(xp, False, padding, SGARefine(lmbda, n))
                refined[n] = (lat, time.perf_counter() - t0)
                t0 = time.perf_counter()
            lat, sga_seconds = refined[n]
            q = codec.latent_coder.requantize(lat, c.quantizer, c.weights)
            out = codec.encode_latent(q, c.quantizer, h, w)
            seconds = sga_seconds + time.perf_counter() - t0
        x_hat = codec.decompress(out["bitstream"])["x_hat"]
        mse = (x_hat - x).pow(2).mean().item()
        bpp = len(out["bitstream"]) * 8 / (h * w)
        rows[name] = {
            "bpp": bpp,
            "psnr": 10 * math.log10(1 / mse),
            "rd_cost": lmbda * 255**2 * mse + bpp,
            "encode_s": seconds,
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models", nargs="+", default=None, help="checkpoints or shipped names (default: the shipped bases)"
    )
    ap.add_argument("--data", default=str(ROOT / "qft" / "assets" / "kodak"))
    ap.add_argument("--images", type=int, default=None, help="the first N images (default: all)")
    ap.add_argument("--skip", type=int, default=0, help="start after this many images")
    ap.add_argument("--steps", type=int, nargs="*", default=[50, 200], help="SGA steps (none: the cheap rows only)")
    ap.add_argument(
        "--center-crop",
        type=int,
        default=None,
        metavar="S",
        help="code the centred S×S crop of each image (S a multiple of 64: no padding; else padded as qft pads)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", nargs="+", default=None, help="only these configurations (default: all)")
    ap.add_argument(
        "--reuse", metavar="JSON", default=None, help="copy the rows of configurations whose settings JSON ran"
    )
    ap.add_argument("-o", "--output", default=str(OUT))
    ap.add_argument(
        "--merge", nargs="+", metavar="JSON", help="only merge these records (other models or images) into -o"
    )
    ap.add_argument(
        "--only-images",
        nargs="+",
        metavar="NAME",
        default=None,
        help="with --merge: keep only these images (a family over the images another record holds)",
    )
    ap.add_argument(
        "--resume", action="store_true", help="keep the images -o already holds (same data, images, steps, device)"
    )
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.output, args.only_images)
    if args.only_images:
        raise SystemExit("refine_sga --only-images: only with --merge (a run's images are --skip and --images)")
    set_threads(1)  # torch and Numba: Numba's first parallel kernel would reset torch's count
    models = args.models or [e["name"] for e in base_entries()]
    images = list_images(args.data)[args.skip :][: args.images]
    record = {
        "models": models,
        "data": os.path.relpath(args.data, ROOT),
        "images": [p.name for p in images],
        "steps": args.steps,
        "center_crop": args.center_crop,
        "device": args.device,
        "threads": 1,
        "machine": machine_info(),
        "load_before": os.getloadavg(),
        "per_model": {},
    }
    if args.resume and Path(args.output).exists():
        record = resumed(record, json.loads(Path(args.output).read_text()), args.output)
    reuse = None
    if args.reuse:
        reuse = reuse_source(args.reuse, record)
        record["reused_from"] = os.path.relpath(args.reuse, ROOT)
    for name in models:
        ck = load_checkpoint(name)
        settings = read_settings(ck)
        lmbda = settings["model_lambda"]
        codec = Codec.from_checkpoint(ck, args.device)
        table = configs(settings, args.steps)
        c, _, _ = table["tcq8+target"]
        table = selected(table, args.configs)
        codec.compress(read_image(images[0]), c.quantizer, c.weights, c.target)  # JIT warm-up / cache load, untimed
        entry = {
            "model_lambda": lmbda,
            "configs": {
                k: {**c.describe(), "refine": SGARefine(lmbda, n, trellis_share=f).record(c.quantizer) if n else "none"}
                for k, (c, n, f) in table.items()
            },
            "rows": {k: [] for k in table},
        }
        old = record["per_model"].get(name)
        if old is not None and old["configs"] != entry["configs"]:
            raise SystemExit(f"refine_sga --resume: {name}'s settings changed since {args.output} was written")
        entry = record["per_model"][name] = old or entry
        done = {r["image"] for r in entry["rows"]["usq"]}
        for path in images:
            if path.name in done:
                continue
            rows = reused_rows(reuse, name, entry["configs"], path.name)
            todo = {k: v for k, v in table.items() if k not in rows}
            rows |= code_image(codec, center_crop(read_image(path), args.center_crop), lmbda, todo)
            for k in table:
                entry["rows"][k].append({"image": path.name, **rows[k]})
            print(name, path.name, {k: round(v[-1]["rd_cost"], 4) for k, v in entry["rows"].items()}, flush=True)
            entry["mean"] = {
                k: {m: float(np.mean([r[m] for r in rs])) for m in KEYS} for k, rs in entry["rows"].items()
            }
            record["load_after"] = os.getloadavg()
            atomic_write(args.output, json.dumps(record, indent=1))
    family(record)
    atomic_write(args.output, json.dumps(record, indent=1))


def rd_cost_change(rows: dict, config: str, base: str) -> dict:
    """``config``'s RD cost against ``base``'s over the images of one model's ``rows``: the
    mean of the per-image changes in %, on how many images ``config`` costs more, and the
    Pearson correlation over the images of the change with ``base``'s bpp and PSNR
    (``corr_bpp``, ``corr_psnr``; None below 3 images): which images the gain comes from."""
    change = [100 * (c["rd_cost"] / b["rd_cost"] - 1) for c, b in zip(rows[config], rows[base], strict=True)]
    out = {"mean_pct": float(np.mean(change)), "images_worse": sum(v > 0 for v in change), "images": len(change)}
    for key in ("bpp", "psnr"):
        x = [b[key] for b in rows[base]]
        ok = len(change) >= 3 and np.std(x) > 0 and np.std(change) > 0
        out[f"corr_{key}"] = float(np.corrcoef(x, change)[0, 1]) if ok else None
    return out


def family(record: dict) -> None:
    """With two or more models (one rate point each, taken in the order of their λ), the
    family's BD-rate of each configuration against plain USQ and the mean encode seconds,
    into ``record``: pchip over the models on both curves' Pareto fronts, as ``qft report``
    computes it (``bd_points`` names them; the two highest models can reach the same PSNR
    on a few images). A BD that cannot be computed is NaN with the reason. Also each
    trellis row directly against USQ with the same encoder help, as a BD
    (``bd_tcq_vs_usq_same_help``) and per model as the change of its RD cost
    (``rd_cost_tcq_vs_usq_same_help``)."""
    models = sorted(record["per_model"], key=lambda m: record["per_model"][m]["model_lambda"])
    if len(models) < 2:
        return
    rows = {m: record["per_model"][m]["rows"] | fallback_rows(record["per_model"][m]["rows"]) for m in models}
    means = [{k: {q: float(np.mean([r[q] for r in rs])) for q in KEYS} for k, rs in rows[m].items()} for m in models]
    record["usq_kept_by_fallback"] = {
        k: {m: sum(r["kept"] == "usq" for r in rows[m][k]) for m in models} for k in rows[models[0]] if " or usq" in k
    }
    curve = {k: [(m[k]["bpp"], m[k]["psnr"]) for m in means] for k in means[0]}
    record["bd_vs_usq_pchip"], record["bd_points"], record["bd_not_computed"] = {}, {}, {}
    for k, c in curve.items():
        if k == "usq":
            continue
        bd, sel = front_bd_rate(curve["usq"], c)
        record["bd_vs_usq_pchip"][k], record["bd_points"][k] = bd, [models[j] for j in sel]
        if math.isnan(bd):
            record["bd_not_computed"][k] = f"{len(sel)} model(s) on both Pareto fronts, or the fronts tie"
    # what the trellis adds over USQ with the same encoder help (issue 24's measure)
    pairs = [("tcq8+target", "usq+target_rd")] + [
        (f"sga{n}+tcq8{f}", f"sga{n}+usq") for n in record["steps"] for f in ("", " or usq")
    ]
    record["bd_tcq_vs_usq_same_help"] = {
        f"{t} vs {a}": front_bd_rate(curve[a], curve[t])[0] for t, a in pairs if t in curve and a in curve
    }
    # the same per rate point: each model's RD cost (at its own λ) against USQ's, image by image
    record["rd_cost_tcq_vs_usq_same_help"] = {
        f"{t} vs {a}": {m: rd_cost_change(rows[m], t, a) for m in models} for t, a in pairs if t in curve and a in curve
    }
    record["encode_s"] = {k: float(np.mean([m[k]["encode_s"] for m in means])) for k in means[0]}
    shown = ("bd_vs_usq_pchip", "bd_tcq_vs_usq_same_help", "rd_cost_tcq_vs_usq_same_help", "encode_s")
    shown += ("usq_kept_by_fallback",)
    print(json.dumps({k: record[k] for k in shown}, indent=1))


def fallback_rows(rows: dict) -> dict:
    """What ``qft compress -q tcq8 --refine sga --refine-fallback`` codes, from one model's
    ``rows``: for each N with both rows, ``"sgaN+tcq8 or usq"``, per image the row of
    SGA-N + TCQ-8 or of SGA-N + USQ with the lower RD cost (``kept`` says which), its
    encode seconds the sum of both less the SGA steps the two share (the codec runs both
    from one SGA run, ``LatentCoder.quantize_or_usq``; SGA-N + USQ's refinement is the one
    the fallback codes: the same schedule and seed): their share ``head/N`` of SGA-N + USQ's
    seconds, nearly all of which are its N steps."""
    out = {}
    for k in rows:
        usq = k.replace("+tcq8", "+usq")
        if not (k.startswith("sga") and k.endswith("+tcq8") and usq in rows):
            continue
        n = int(k[3:].split("+")[0])
        head, _ = SGARefine(1.0, n).split(Quantizer("tcq8"))
        out[f"{k} or usq"] = kept = []
        for t, u in zip(rows[k], rows[usq], strict=True):
            name, row = ("usq", u) if u["rd_cost"] < t["rd_cost"] else ("tcq8", t)  # the codec's test
            kept.append({**row, "encode_s": t["encode_s"] + u["encode_s"] * (1 - head / n), "kept": name})
    return out


#: what records joined into one table (``--resume``, ``--merge``) must share besides the kind
#: of CPU: SGA's float path, hence its rows, differs across devices and CPUs
SHARED = ("data", "center_crop", "device")


def resumed(record: dict, old: dict, path: str) -> dict:
    """``record`` (a new run's header) carrying on ``old``, the record at ``path``: its
    models' rows are kept and the images they hold are not coded again. Refused where the
    two differ in data, images, steps, crop, device or kind of CPU (their rows would not
    form one table)."""
    if any(old.get(k) != record[k] for k in (*SHARED, "images", "steps")):
        raise SystemExit(f"refine_sga --resume: {path} differs from this run in data, images, steps, crop or device")
    if old["machine"]["cpu"] != record["machine"]["cpu"]:
        raise SystemExit(f"refine_sga --resume: {path} ran on another CPU, where SGA's float path differs")
    sessions = old.get("sessions", [{k: old[k] for k in ("machine", "load_before", "load_after") if k in old}])
    record["sessions"] = sessions + [{"machine": record["machine"], "load_before": record["load_before"]}]
    record["models"] = list(dict.fromkeys(old["models"] + record["models"]))
    record["per_model"] = old["per_model"]
    return record


def merge(paths: list[str], output: str, only: list[str] | None = None) -> None:
    """Records run apart (other models, other images: one process or machine each) as one
    record, with the family's BD-rates. They must share data, crop, device and kind of CPU
    (SGA's float path, hence its rows, differs across CPUs and devices). Only the configurations every record
    holds are kept (e.g. the SGA steps they share); a model's rows are the union of its images, which
    must not repeat, and every model must end with the same images (the family compares
    means over the same images). ``only``: keep just the rows of these image names (e.g. a
    subset that another record holds, to compare the two on the same images)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    if len({tuple(r.get(k) for k in SHARED) for r in records}) > 1:
        raise SystemExit(f"refine_sga --merge: {paths[0]} and the others differ in data, crop or device")
    if len({r["machine"]["cpu"] for r in records}) > 1:
        raise SystemExit(
            f"refine_sga --merge: {paths[0]} and the others ran on other CPUs, where SGA's float path differs:"
            " merge the records of one kind of CPU"
        )
    steps = [n for n in records[0]["steps"] if all(n in r["steps"] for r in records)]
    names = [
        k
        for k in next(iter(records[0]["per_model"].values()))["rows"]
        if all(k in m["rows"] for r in records for m in r["per_model"].values())
    ]
    out = dict(records[0], models=[], steps=steps, per_model={})
    # a record merged before carries its parts' names and loads: merged again, it adds those
    out["merged_from"] = [n for p, r in zip(paths, records) for n in r.get("merged_from", [os.path.basename(p)])]
    for key in ("load_before", "load_after"):
        out[key] = [v for r in records for v in (r[key] if "merged_from" in r else [r.get(key)])]
    for path, r in zip(paths, records):
        for model, m in r["per_model"].items():
            configs = {k: m["configs"][k] for k in names}
            entry = out["per_model"].setdefault(
                model, {"model_lambda": m["model_lambda"], "configs": configs, "rows": {k: [] for k in names}}
            )
            if entry["configs"] != configs:
                raise SystemExit(f"refine_sga --merge: {path} has other settings for {model}")
            rows = {k: [row for row in m["rows"][k] if only is None or row["image"] in only] for k in names}
            seen = {row["image"] for row in entry["rows"]["usq"]}
            if seen & {row["image"] for row in rows["usq"]}:
                raise SystemExit(f"refine_sga --merge: {path} repeats an image of {model}")
            for k in names:
                entry["rows"][k] += rows[k]
    out["models"] = list(out["per_model"])
    image_sets = {model: sorted(row["image"] for row in m["rows"]["usq"]) for model, m in out["per_model"].items()}
    out["images"] = next(iter(image_sets.values()))
    if any(v != out["images"] for v in image_sets.values()):
        raise SystemExit("refine_sga --merge: the models do not hold the same images; merge whole sets")
    if only is not None and sorted(only) != out["images"]:
        raise SystemExit(f"refine_sga --merge --only-images: the records hold only {out['images']} of them")
    for m in out["per_model"].values():
        m["mean"] = {k: {q: float(np.mean([row[q] for row in rs])) for q in KEYS} for k, rs in m["rows"].items()}
    family(out)
    atomic_write(output, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
