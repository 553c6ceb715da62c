"""``qft compress``: code an image into a ``.qft`` bitstream.

::

    qft compress -m ckpt.pth -q tcq8 kodim01.png -o kodim01.qft
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
    add_checkpoint_arguments(parser)
    add_quantizer_arguments(parser)
    parser.add_argument("image", help="input image (PNG, JPEG, …)")
    add_output_arguments(parser, "output .qft file")


def run(args: argparse.Namespace) -> int:
    from qft.codec import Codec, read_image
    from qft.files import atomic_write, check_output
    from qft.models import load_checkpoint
    from qft.settings import read_settings

    check_output(args.output, args.force, inputs=(args.image, args.checkpoint))
    x = read_image(args.image)
    ckpt = load_checkpoint(args.checkpoint, args.arch, unsafe_load=args.unsafe_load)
    choice = quantizer_from_args(args, read_settings(ckpt))
    quantizer = choice.quantizer
    codec = Codec.from_checkpoint(ckpt, device=device_from_args(args))
    out = codec.compress(x, quantizer, choice.weights, choice.target, choice.refine)
    atomic_write(args.output, out["bitstream"])
    h, w = x.shape[-2:]
    target = f", target η {out['target']:g}" if out.get("target") else ""
    print(
        f"{args.output}: {len(out['bitstream'])} bytes, {len(out['bitstream']) * 8 / (h * w):.4f} bpp "
        f"({quantizer.method}{target}, {out['time_s']:.2f} s)"
    )
    return 0
