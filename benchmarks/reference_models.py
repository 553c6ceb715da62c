"""Ship and evaluate the reference models (issue 5).

For every finished rate point of a ``qft train`` run, copy its fp16 ``model.pth`` to
``qft/assets/checkpoints/mbt2018-mean-<λ>.pth`` (``--ship``), then evaluate each shipped
file on the 24 Kodak images exactly as ``python -m compressai.utils.eval_model
checkpoint`` does: plain ``MeanScaleHyperprior.from_state_dict`` + ``update(force=True)``,
centred zero-padding to a multiple of 64, CompressAI's real ``compress``/``decompress``
(rANS, USQ), PSNR-RGB and MS-SSIM-RGB on 8-bit-rounded RGB, bpp from the string lengths
over the unpadded pixels, means over images, one thread.

Writes:

- ``qft/assets/checkpoints/manifest.json``: one entry per checkpoint (file, arch, λ, N, M,
  sha256, steps, init, train_data, wall_time_s, machine, kodak metrics, BD-rate of the set;
  for a model continued from a shipped one with ``qft train --init``, the ``history`` of
  the files it replaces and its ``total_steps``); the finetuned entries are kept while
  their base is unchanged;
- ``--json`` (CompressAI results schema plus ``lambda``, ``per_image`` and ``bd_rate``);
- ``--plot``: the Kodak RD curves (PSNR and MS-SSIM) next to CompressAI's published
  mbt2018-mean curve, whose BD-rate (``bjontegaard``, pchip; cubic and akima printed too)
  is the quality bar.

::

    python benchmarks/reference_models.py --runs runs/reference/mbt2018-mean-cpu --ship
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import sys
import time
import warnings

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "qft" / "assets"
ANCHOR = REPO.parent / "shared" / "anchors" / "kodak" / "compressai-mbt2018-mean_mse.json"
TRAIN_DATA = "BSDS500 train+test (400 images), random crops + flips; val for validation loss"
BD_METHODS = ("pchip", "cubic", "akima")
TRAINING_KEYS = (
    "batch_size",
    "crop",
    "lr",
    "aux_lr",
    "decay_at",
    "decay_factor",
    "clip_max_norm",
    "seed",
    "threads",
)


HISTORY_KEYS = ("file", "sha256", "steps", "init", "wall_time_s", "cpu_time_s", "machine", "recipe", "kodak")


def history(init: str, previous: list[dict]) -> list[dict]:
    """The training stages before a run that started (``qft train --init``) from a shipped
    file of the manifest ``previous`` (``init`` names it by its SHA-256 prefix): that
    entry's own history, then the entry itself (``HISTORY_KEYS``); ``[]`` otherwise."""
    match = re.search(r"\(sha256 ([0-9a-f]+)\)", init)
    for e in previous if match else ():
        if e["sha256"].startswith(match.group(1)) and "finetuned_from" not in e:
            return [*e.get("history", []), {k: e[k] for k in HISTORY_KEYS if k in e}]
    return []


def finetuned_kept(previous: list[dict], bases: list[dict], folder: Path) -> list[dict]:
    """The finetuned entries of the manifest ``previous`` whose base is among ``bases``
    with the SHA-256 their delta file was made from; a delta of a replaced base can no
    longer load, so its entry is dropped with a line saying how to rebuild it."""
    shas = {b["file"]: b["sha256"] for b in bases}
    kept = []
    for e in previous:
        if "finetuned_from" not in e:
            continue
        path = folder / e["file"]
        delta = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
        made_from = delta.get("base_sha256")
        if made_from is not None and made_from == shas.get(e["finetuned_from"]):
            kept.append(e)
        else:
            print(
                f"{e['file']}: its base {e['finetuned_from']} was replaced; entry dropped "
                "(rebuild: benchmarks/finetune_runs.py, two_stage.py)",
                file=sys.stderr,
            )
    return kept


def ship(runs: Path, dest: Path, previous: list[dict]) -> list[dict]:
    """Copy every finished point's ``model.pth``; returns the training summaries, each
    with its ``history`` and ``total_steps`` when it continued a file of the manifest
    ``previous`` it replaces."""
    summaries = []
    for summary_path in sorted(runs.glob("lambda-*/summary.json")):
        s = json.loads(summary_path.read_text())
        if not s["finished"]:
            continue
        s["file"] = f"{s['arch']}-{s['lambda']:g}.pth"
        dest.mkdir(parents=True, exist_ok=True)
        source, target = summary_path.parent / "model.pth", dest / s["file"]
        if not target.is_file() or target.read_bytes() != source.read_bytes():  # rewrites nothing it need not
            shutil.copyfile(source, target)
        recipe = torch.load(
            summary_path.parent / "checkpoint.pth",
            map_location="cpu",
            weights_only=True,
        )["recipe"]
        s["recipe"] = recipe["path"]
        s["training"] = {k: recipe[k] for k in TRAINING_KEYS}
        s["history"] = history(s["init"], previous)
        s["total_steps"] = s["steps"] + sum(h["steps"] for h in s["history"])
        summaries.append(s)
    return sorted(summaries, key=lambda s: s["lambda"])


def evaluate(path: Path, images: list[Path]) -> dict:
    """Kodak metrics of one shipped state_dict, via CompressAI's ``eval_model`` code."""
    from compressai.models import MeanScaleHyperprior
    from compressai.utils.eval_model.__main__ import inference, read_image

    net = MeanScaleHyperprior.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net.update(force=True)
    net.eval()
    per_image = {}
    for img in images:
        per_image[img.stem] = inference(net, read_image(img))
    keys = ("bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time")
    mean = {k: float(np.mean([r[k] for r in per_image.values()])) for k in keys}
    return {"mean": mean, "per_image": per_image, "N": net.N, "M": net.M}


def _bd(fn, *args, method: str, caught: list[str]) -> float | None:
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        value = float(fn(*args, method=method, require_matching_points=False))
    caught.extend(m for m in (str(w.message) for w in ws) if m not in caught)
    return value if math.isfinite(value) else None  # no overlap


def bd_rates(anchor: dict, rates: list[float], psnrs: list[float]) -> dict:
    """BD-rate (%) and BD-PSNR (dB) of our PSNR-RGB curve against the anchor's, per
    method, with the PSNR and bpp intervals both curves cover (the BD-rate integrates over
    the PSNR overlap, the BD-PSNR over the log-rate overlap)."""
    import bjontegaard as bd

    ra, da = anchor["results"]["bpp"], anchor["results"]["psnr-rgb"]
    out: dict = {"anchor": anchor["name"], "metric": "psnr-rgb", "warnings": []}
    for m in BD_METHODS:
        out[m] = _bd(bd.bd_rate, ra, da, rates, psnrs, method=m, caught=out["warnings"])
    out["bd_psnr_db"] = {m: _bd(bd.bd_psnr, ra, da, rates, psnrs, method=m, caught=out["warnings"]) for m in BD_METHODS}
    lo, hi = max(min(da), min(psnrs)), min(max(da), max(psnrs))
    out["psnr_overlap_db"] = [lo, hi]
    out["overlap_fraction_of_ours"] = (hi - lo) / (max(psnrs) - min(psnrs)) if hi > lo else 0.0
    out["bpp_overlap"] = [max(min(ra), min(rates)), min(max(ra), max(rates))]
    return out


def plot(path: Path, ours: dict, anchor: dict, bd: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in (
        (axes[0], "psnr-rgb", "PSNR-RGB [dB]"),
        (axes[1], "ms-ssim-rgb", "MS-SSIM-RGB [dB]"),
    ):
        for res, name, style in (
            (anchor["results"], "CompressAI mbt2018-mean (published, q1-q8)", "s--"),
            (ours["results"], "qft reference (this repo)", "o-"),
        ):
            y = res[metric]
            if metric == "ms-ssim-rgb":
                y = [-10 * math.log10(1 - v) for v in y]
            ax.plot(res["bpp"], y, style, label=name)
        ax.set_xlabel("bpp (real bitstreams)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    lo, hi = bd["psnr_overlap_db"]
    rate = "n/a" if bd["pchip"] is None else f"{bd['pchip']:+.0f} %"
    psnr = bd["bd_psnr_db"]["pchip"]
    psnr = "n/a" if psnr is None else f"{psnr:+.2f} dB"
    axes[0].set_title(
        f"Kodak — vs published (pchip): BD-rate {rate}\n(PSNR overlap {lo:.1f}–{hi:.1f} dB), BD-PSNR {psnr}",
        fontsize=9,
    )
    axes[1].set_title("Kodak, 24 images")
    axes[0].legend(loc="upper left", fontsize=8)
    for x, y, lam in zip(ours["results"]["bpp"], ours["results"]["psnr-rgb"], ours["lambda"], strict=True):
        axes[0].annotate(
            f"λ={lam:g}",
            (x, y),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        type=Path,
        default=REPO / "runs/reference/mbt2018-mean-cpu",
        help="qft train output folder (read with --ship)",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help="copy finished models into qft/assets/checkpoints",
    )
    parser.add_argument("--checkpoints", type=Path, default=ASSETS / "checkpoints")
    parser.add_argument("--kodak", type=Path, default=ASSETS / "kodak")
    parser.add_argument("--anchor", type=Path, default=ANCHOR)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/reference_models.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs/figures/reference_rd.png")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from qft.files import atomic_write
    from qft.train import sha256_file

    torch.set_num_threads(args.threads)
    manifest_path = args.checkpoints / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else []
    if args.ship:
        entries = ship(args.runs, args.checkpoints, previous)
    else:
        entries = [e for e in previous if "finetuned_from" not in e]
    if not entries:
        print(f"no finished rate points under {args.runs}", file=sys.stderr)
        return 1
    images = sorted(args.kodak.glob("*.png"))
    if len(images) != 24:
        print(
            f"expected the 24 Kodak images in {args.kodak}, found {len(images)}",
            file=sys.stderr,
        )
        return 1

    import compressai

    evals = []
    for e in entries:
        t0 = time.perf_counter()
        r = evaluate(args.checkpoints / e["file"], images)
        m = r["mean"]
        print(
            f"{e['file']}: bpp {m['bpp']:.4f}  PSNR {m['psnr-rgb']:.3f} dB  MS-SSIM {m['ms-ssim-rgb']:.4f}"
            f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        evals.append(r)

    ours = {
        "name": "qft-reference-mbt2018-mean",
        "description": f"Inference (ans), USQ; qft reference models ({entries[0]['N']}/{entries[0]['M']}), "
        "compressai eval_model procedure, CPU, 1 thread",
        "results": {
            k: [r["mean"][k] for r in evals]
            for k in (
                "psnr-rgb",
                "ms-ssim-rgb",
                "bpp",
                "encoding_time",
                "decoding_time",
            )
        },
        "lambda": [e["lambda"] for e in entries],
        "files": [e["file"] for e in entries],
        "per_image": [r["per_image"] for r in evals],
    }
    anchor = json.loads(args.anchor.read_text())
    # BD interpolation needs PSNR increasing with rate: use the Pareto front (points not
    # beaten in PSNR by a lower-rate point; undertrained high-λ models can be).
    order = sorted(range(len(entries)), key=lambda i: ours["results"]["bpp"][i])
    front = []
    for i in order:
        if not front or ours["results"]["psnr-rgb"][i] > ours["results"]["psnr-rgb"][front[-1]]:
            front.append(i)
    bd = bd_rates(
        anchor,
        [ours["results"]["bpp"][i] for i in front],
        [ours["results"]["psnr-rgb"][i] for i in front],
    )
    bd["lambdas_used"] = [entries[i]["lambda"] for i in front]
    print(f"BD points (Pareto front): lambda {bd['lambdas_used']}")
    bd["method_default"] = "pchip"
    ours["bd_rate"] = bd
    print("BD-rate vs " + anchor["name"] + ": " + ", ".join(f"{m} {bd[m]} %" for m in BD_METHODS))
    print("BD-PSNR: " + ", ".join(f"{m} {bd['bd_psnr_db'][m]} dB" for m in BD_METHODS))
    print(
        f"PSNR overlap {bd['psnr_overlap_db'][0]:.2f}-{bd['psnr_overlap_db'][1]:.2f} dB "
        f"({100 * bd['overlap_fraction_of_ours']:.0f} % of our range)"
    )

    manifest = []
    for e, r in zip(entries, evals, strict=True):
        path = args.checkpoints / e["file"]
        manifest.append(
            {
                "file": e["file"],
                "arch": e["arch"],
                "lambda": e["lambda"],
                "N": r["N"],
                "M": r["M"],
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
                "dtype": "float16 parameters, int32 CDF tables",
                "steps": e["steps"],
                "init": e["init"],
                **({"history": e["history"], "total_steps": e["total_steps"]} if e.get("history") else {}),
                "train_data": TRAIN_DATA,
                "wall_time_s": round(e["wall_time_s"], 1),
                "cpu_time_s": round(e["cpu_time_s"], 1),
                "machine": e["machine"],
                "recipe": e["recipe"],
                "training": e["training"],
                "val": e["val"],
                "kodak": {k: r["mean"][k] for k in ("bpp", "psnr-rgb", "ms-ssim-rgb")},
                "kodak_eval": "24 images, real bitstreams (compressai rANS), USQ, from_state_dict + update(force=True)",
                "set_bd_rate_vs_published_pct": {m: bd[m] for m in BD_METHODS},
                "set_bd_lambdas_used": bd["lambdas_used"],
                "set_bd_psnr_vs_published_db": bd["bd_psnr_db"],
                "versions": {
                    "compressai": compressai.__version__,
                    "torch": str(torch.__version__),
                    "python": platform.python_version(),
                },
            }
        )
    manifest += finetuned_kept(previous, manifest, args.checkpoints)
    atomic_write(manifest_path, json.dumps(manifest, indent=2) + "\n")
    atomic_write(args.json, json.dumps(ours, indent=2) + "\n")
    plot(args.plot, ours, anchor, bd)
    print(f"wrote {manifest_path}, {args.json}, {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
