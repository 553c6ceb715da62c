"""Step-coded models (issue 21): speed and RD of TCQ-8 against USQ, real bitstreams.

For each checkpoint of any step-wise coded architecture (TCM, DCAE, CCA, the hyperpriors;
a file or a shipped name) on the first N Kodak images:

(a) **speed**: each configuration — ``usq``, ``tcq8`` (no decoder target: the trellis
    alone) and ``tcq8-target`` (TCQ-8 with its default decoder target: ``rd`` when the
    model's λ is known) at the checkpoint's settings (``--global-defaults``: the global
    rule) — runs in a fresh subprocess on one torch/Numba thread: one untimed warm-up
    image, then per image the compress and decompress seconds (the decoded latent
    checked equal to the encoder's) and the subprocess' peak RSS. Ratios to USQ; goals
    for TCQ-8: compress ≤ 1.3×, decompress ≤ 1.1×.
(b) **RD** at one rate point, the local measure at equal PSNR: USQ swept over its step
    (``--usq-scales`` × its step), TCQ-8 over its union step (``--tcq-scales``, λ_T
    following Δ by the global rule of :mod:`qft.settings`) without and with the decoder target
    (``rd`` at the checkpoint's λ or ``--lambda``); one analysis per image, real
    bitstreams (:func:`qft.eval.evaluate_configs`). Per configuration the image-mean bpp
    and PSNR; per TCQ-8 curve its BD-rate against the USQ curve (each curve's Pareto
    front, pchip over the common PSNR range) and the local rate change at equal PSNR of
    each of its points (:func:`qft.eval.bdrate.local_rate_change`; ``at_default``: the
    point at scale 1, the codec's operating point; ``psnr_db_at_default``: its PSNR change
    at equal rate).

The JSON records the machine and its load average (start and end): figures taken on a
loaded machine are marked by it. ::

    python benchmarks/step_models.py CKPT [CKPT ...] [--data qft/assets/kodak] [--images N]
        [--lambda L] [--global-defaults] [--parts speed rd] [--out benchmarks/results/step_models.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: step multipliers of USQ's RD sweep (its anchor curve): down to 0.5, because the decoder
#: target raises PSNR at equal rate beyond what Δ 0.8 reaches (docs/design.md, "Measuring
#: step-coded models")
USQ_SCALES = (0.5, 0.63, 0.8, 0.9, 1.0, 1.12, 1.25)
#: step multipliers of TCQ-8's RD sweeps (× its union step)
TCQ_SCALES = (0.8, 0.9, 1.0, 1.12, 1.25)
#: speed configurations: label -> (method, decoder target: ``auto`` = the resolved default)
SPEED = {"usq": ("usq", 0.0), "tcq8": ("tcq8", 0.0), "tcq8-target": ("tcq8", "auto")}
#: goals of TCQ-8 (no target) over USQ
GOALS = {"compress": 1.3, "decompress": 1.1}


def _settings(ck, args) -> dict:
    """The checkpoint's settings (or none: ``--global-defaults``), with ``--lambda``."""
    from qft.settings import read_settings

    recorded = read_settings(ck)
    settings = {k: v for k, v in recorded.items() if k == "model_lambda" or not args.global_defaults}
    if args.lmbda is not None:
        settings["model_lambda"] = args.lmbda
    return settings


def _images(args) -> list[Path]:
    from qft.codec import list_images

    return list_images(args.data)[: args.images or None]


def _speed_worker(args) -> None:
    """One speed configuration in this (fresh) process; writes its JSON to ``--worker-out``."""
    from qft.threads import set_threads

    set_threads(1)
    import numpy as np

    from qft.codec import Codec, read_image
    from qft.models import load_checkpoint
    from qft.settings import resolve_quantizer

    t0 = time.perf_counter()
    ck = load_checkpoint(args.checkpoints[0])
    codec = Codec.from_checkpoint(ck)
    method, target = SPEED[args.speed_worker]
    choice = resolve_quantizer(method, _settings(ck, args), target=target)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    images = _images(args)

    def code(path):
        x = read_image(path)
        t = time.perf_counter()
        enc = codec.compress(x, choice.quantizer, choice.weights, choice.target)
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        dec = codec.decompress(enc["bitstream"])
        t_dec = time.perf_counter() - t
        if not np.array_equal(dec["y_hat"], enc["y_hat"]):
            raise RuntimeError(f"{path.name}: the decoded latent differs from the encoder's")
        pixels = x.shape[-2] * x.shape[-1]
        return {
            "image": path.name,
            "compress_s": t_enc,
            "decompress_s": t_dec,
            "bpp": len(enc["bitstream"]) * 8 / pixels,
            "target": enc["target"],
        }

    code(images[0])  # warm-up: Numba's cache, torch's allocator
    set_threads(1)  # the first parallel Numba kernel reset torch's OpenMP threads (qft.threads)
    rows = [code(p) for p in images]
    out = {
        "quantizer": choice.describe(),
        "compress_s": statistics.fmean(r["compress_s"] for r in rows),
        "decompress_s": statistics.fmean(r["decompress_s"] for r in rows),
        "bpp": statistics.fmean(r["bpp"] for r in rows),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded,
        "wall_s": time.perf_counter() - t0,
        "per_image": rows,
    }
    Path(args.worker_out).write_text(json.dumps(out))


def _speed(spec: str, args) -> dict:
    """Every speed configuration of one checkpoint, each in a fresh subprocess."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in SPEED:
            result = Path(tmp) / f"{label}.json"
            cmd = [sys.executable, __file__, spec, "--speed-worker", label, "--worker-out", str(result)]
            cmd += ["--data", str(args.data), "--images", str(args.images)]
            cmd += ["--global-defaults"] if args.global_defaults else []
            cmd += [] if args.lmbda is None else ["--lambda", str(args.lmbda)]
            print(f"  speed {label} …", flush=True)
            subprocess.run(cmd, check=True)  # in this working directory: relative paths hold
            out[label] = json.loads(result.read_text())
    ratios = {}
    for label in ("tcq8", "tcq8-target"):
        ratios[f"{label}/usq"] = {
            key: out[label][key] / out["usq"][key] for key in ("compress_s", "decompress_s", "peak_rss_mb")
        }
    tcq = ratios["tcq8/usq"]
    ratios["goals"] = {
        "compress_s": GOALS["compress"],
        "decompress_s": GOALS["decompress"],
        "met": {
            "compress_s": tcq["compress_s"] <= GOALS["compress"],
            "decompress_s": tcq["decompress_s"] <= GOALS["decompress"],
        },
    }
    return {"configs": out, "ratios": ratios}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _bd_on_fronts(anchor: list[tuple[float, float]], test: list[tuple[float, float]]) -> dict:
    """BD-rate (pchip, cubic, akima) of ``test`` vs ``anchor``, each on its Pareto front,
    over their common PSNR range; NaN (``None``) with the reason when undefined."""
    from qft.eval.bdrate import bd_rate, pareto_front

    curves = []
    for pts in (anchor, test):
        front = sorted(pts[i] for i in pareto_front([p[0] for p in pts], [p[1] for p in pts]))
        curves.append({"bpp": [p[0] for p in front], "psnr-rgb": [p[1] for p in front]})
    try:
        bd = bd_rate(*curves)
    except ValueError as exc:
        return {"pchip": None, "cubic": None, "akima": None, "warnings": [str(exc)]}
    return {k: (_finite(v) if k != "warnings" else v) for k, v in bd.items()}


def _psnr_change(anchor: list[tuple[float, float]], point: tuple[float, float]) -> float:
    """PSNR change in dB of ``point`` ``(rate, psnr)`` against the anchor's Pareto front at
    equal rate (PSNR linear in log-rate); NaN outside the front's rate range. The dual of
    :func:`~qft.eval.bdrate.local_rate_change`, defined where a flat anchor curve spans too
    little PSNR for a rate change at equal PSNR."""
    import numpy as np

    from qft.eval.bdrate import pareto_front

    front = sorted(anchor[i] for i in pareto_front([p[0] for p in anchor], [p[1] for p in anchor]))
    if len(front) < 2 or not front[0][0] <= point[0] <= front[-1][0]:
        return math.nan
    rates = np.log([p[0] for p in front])
    return point[1] - float(np.interp(math.log(point[0]), rates, [p[1] for p in front]))


def _rd(ck, args) -> dict:
    """The RD sweeps of one checkpoint (module docstring, (b))."""
    from qft.codec import Codec
    from qft.eval.bdrate import local_rate_change
    from qft.eval.evaluate import evaluate_configs
    from qft.settings import resolve_quantizer

    settings = _settings(ck, args)
    families = {"usq": ("usq", 0.0, args.usq_scales), "tcq8": ("tcq8", 0.0, args.tcq_scales)}
    families["tcq8-rd"] = ("tcq8", "rd", args.tcq_scales)
    choices = {
        f"{family}@{s:g}": resolve_quantizer(method, settings, target=target, step_scale=s)
        for family, (method, target, scales) in families.items()
        for s in scales
    }
    configs = {label: (c.quantizer, c.weights, c.target) for label, c in choices.items()}
    t0 = time.perf_counter()
    rows = evaluate_configs(Codec.from_checkpoint(ck), configs, _images(args), desc="rd", ms_ssim=False)
    wall = time.perf_counter() - t0
    points = {}
    for label, r in rows.items():
        points[label] = {
            "quantizer": choices[label].describe(),
            "bpp": statistics.fmean(x["bpp"] for x in r),
            "bpp_estimated": statistics.fmean(x["bpp_estimated"] for x in r),
            "psnr-rgb": statistics.fmean(x["psnr-rgb"] for x in r),
            "target_mean": statistics.fmean(x["target"] for x in r),
        }

    def curve(family):
        scales = families[family][2]
        return [(points[f"{family}@{s:g}"]["bpp"], points[f"{family}@{s:g}"]["psnr-rgb"]) for s in scales]

    usq = curve("usq")
    versus = {}
    for family in ("tcq8", "tcq8-rd"):
        local = [local_rate_change(usq, p) for p in curve(family)]
        finite = [x for x in local if math.isfinite(x)]
        default = args.tcq_scales.index(1.0) if 1.0 in args.tcq_scales else None
        at_default = math.nan if default is None else local[default]
        psnr_at_default = math.nan if default is None else _psnr_change(usq, curve(family)[default])
        versus[family] = {
            "bd": _bd_on_fronts(usq, curve(family)),
            "local": [_finite(x) for x in local],
            "local_mean": _finite(statistics.fmean(finite)) if finite else None,
            "at_default": _finite(at_default),
            "psnr_db_at_default": _finite(psnr_at_default),
        }
    return {
        "usq_scales": list(args.usq_scales),
        "tcq_scales": list(args.tcq_scales),
        "model_lambda": settings["model_lambda"],
        "points": points,
        "vs_usq": versus,
        "wall_s": wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or shipped model names")
    parser.add_argument("--data", default=str(ROOT / "qft/assets/kodak"), help="images (default: the 24 Kodak)")
    parser.add_argument("--images", type=int, default=0, help="first N images (default 0: all)")
    parser.add_argument("--lambda", dest="lmbda", type=float, help="the models' training λ (default: recorded)")
    parser.add_argument("--global-defaults", action="store_true", help="ignore the checkpoints' calibrated settings")
    parser.add_argument("--usq-scales", type=float, nargs="+", default=list(USQ_SCALES), help="USQ's step multipliers")
    parser.add_argument(
        "--tcq-scales", type=float, nargs="+", default=list(TCQ_SCALES), help="TCQ-8's step multipliers"
    )
    parser.add_argument("--parts", nargs="+", default=["speed", "rd"], choices=("speed", "rd"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step_models.json"))
    parser.add_argument("--speed-worker", choices=list(SPEED), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed_worker:
        _speed_worker(args)
        return 0

    from trellis.hardware import machine_info

    from qft.errors import UserError
    from qft.files import atomic_write, check_output
    from qft.models import load_checkpoint
    from qft.threads import set_threads

    try:  # every check before the first measurement
        check_output(args.out, force=True)
        loaded = [(spec, load_checkpoint(spec)) for spec in args.checkpoints]
        for spec, ck in loaded:
            if "rd" in args.parts and "model_lambda" not in _settings(ck, args):
                raise UserError(f"{spec}: its training λ is not recorded (the rd target needs it); give --lambda L")
        _images(args)
    except UserError as exc:
        parser.error(str(exc))
    set_threads(1)
    load_start = os.getloadavg()
    models = []
    for spec, ck in loaded:
        print(f"{spec}: {ck.arch} {ck.params}", flush=True)
        entry = {"checkpoint": {"spec": spec, "sha256": ck.sha256, "arch": ck.arch, "params": ck.params}}
        entry["checkpoint"] |= {k: ck.extra[k] for k in ("lambda", "step", "steps") if k in ck.extra}  # training
        if "speed" in args.parts:
            entry["speed"] = _speed(spec, args)
            for label, r in entry["speed"]["ratios"].items():
                if label != "goals":
                    print(f"  {label}: compress {r['compress_s']:.2f}x, decompress {r['decompress_s']:.2f}x")
        if "rd" in args.parts:
            entry["rd"] = _rd(ck, args)
            for family, v in entry["rd"]["vs_usq"].items():
                print(f"  {family} vs usq: BD {v['bd']['pchip']} %, local at scale 1 {v['at_default']} %")
        models.append(entry)
    result = {
        "machine": machine_info() | {"torch_threads": 1, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "note": "speed on one thread per configuration; compare ratios, and read absolute times with the load average",
        "data": str(args.data),
        "images": [p.name for p in _images(args)],
        "global_defaults": args.global_defaults,
        "models": models,
    }
    atomic_write(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
