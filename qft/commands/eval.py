"""``qft eval``: rate-distortion of checkpoints on an image folder, with real bitstreams.

::

    qft eval -m ckpt1.pth ckpt2.pth -q tcq8 --data qft/assets/kodak -o results.json

Writes CompressAI's JSON schema (plottable with ``compressai.utils.plot``) plus a ``qft``
block: quantizer and parameters, checkpoint hashes, real and estimated bpp, and with
``--per-image`` every image's values. ``bpp`` is the real stream size unless ``--estimate``.
"""

from __future__ import annotations

import argparse

from qft.commands._options import (
    add_checkpoint_arguments,
    add_output_arguments,
    add_quantizer_arguments,
    device_from_args,
    quantizer_from_args,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser, many=True)
    add_quantizer_arguments(parser)
    parser.add_argument("--data", required=True, help="image folder (searched recursively)")
    add_output_arguments(parser, "results JSON")
    parser.add_argument("--name", help="curve name in the JSON (default: ARCH-QUANTIZER)")
    parser.add_argument("--estimate", action="store_true", help="report likelihood/table bpp as `bpp`")
    parser.add_argument("--per-image", action="store_true", help="store every image's values")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="evaluate in N processes of one thread each (default: 1, this process)",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from qft.codec import Codec, list_images
    from qft.errors import UserError
    from qft.eval import evaluate_images, results_json
    from qft.eval.evaluate import evaluate_in_processes
    from qft.files import atomic_write, check_output
    from qft.models import load_checkpoint
    from qft.settings import read_settings

    check_output(args.output, args.force, inputs=tuple(args.checkpoint))
    images = list_images(args.data)
    device = device_from_args(args)
    if args.workers < 1 or (args.workers > 1 and device != "cpu"):
        raise UserError("--workers must be at least 1, and 1 with --cuda")
    checkpoints, per_checkpoint, jobs, arch, method = [], [], [], None, None
    for path in args.checkpoint:
        ckpt = load_checkpoint(path, args.arch, unsafe_load=args.unsafe_load)
        arch = ckpt.arch
        choice = quantizer_from_args(args, read_settings(ckpt))
        method = choice.quantizer.method
        codec = Codec.from_checkpoint(ckpt, device=device)
        codec.check_quantizer(choice.quantizer)
        if args.workers > 1:
            jobs.append((path, {"q": (choice.quantizer, choice.weights, choice.target, choice.refine)}))
        else:
            per_checkpoint.append(
                evaluate_images(
                    codec,
                    choice.quantizer,
                    images,
                    desc=str(path),
                    weights=choice.weights,
                    target=choice.target,
                    refine=choice.refine,
                )
            )
        checkpoints.append(
            {
                "path": str(path),
                "sha256": ckpt.sha256,
                "arch": ckpt.arch,
                "params": ckpt.params,
                "quantizer": choice.describe(),
            }
        )
    if jobs:
        per_checkpoint = [
            rows["q"]
            for rows in evaluate_in_processes(
                jobs, images, args.workers, arch=args.arch, unsafe_load=args.unsafe_load, end_to_end=True
            )
        ]
    name = args.name or f"{arch}-{method}"
    out = results_json(name, checkpoints, per_checkpoint, args.estimate, args.per_image, str(args.data))
    atomic_write(args.output, json.dumps(out, indent=2, allow_nan=False))
    for c, bpp, p in zip(checkpoints, out["results"]["bpp"], out["results"]["psnr-rgb"]):
        print(f"{c['path']}: {bpp:.4f} bpp, {p:.3f} dB")
    print(f"wrote {args.output}")
    return 0
