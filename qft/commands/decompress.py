"""``qft decompress``: decode a ``.qft`` bitstream to a PNG (or PPM, BMP, TIFF).

::

    qft decompress kodim01.qft -m ckpt.pth -o kodim01-dec.png

The quantizer and its parameters come from the stream; the checkpoint must hold the
weights that encoded it.
"""

from __future__ import annotations

import argparse

from qft.commands._options import add_checkpoint_arguments, add_output_arguments, device_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stream", help="input .qft file")
    add_checkpoint_arguments(parser)
    add_output_arguments(parser, "output image (.png, .ppm, .bmp, .tif)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qft.codec import Codec, output_format, write_image
    from qft.errors import UserError
    from qft.files import check_output
    from qft.models import load_checkpoint

    check_output(args.output, args.force, inputs=(args.stream, args.checkpoint))
    output_format(args.output)
    path = Path(args.stream)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    data = path.read_bytes()
    ckpt = load_checkpoint(args.checkpoint, args.arch, unsafe_load=args.unsafe_load)
    codec = Codec.from_checkpoint(ckpt, device=device_from_args(args))
    out = codec.decompress(data, name=str(path))
    write_image(out["x_hat"], args.output)
    print(f"{args.output}: {tuple(out['x_hat'].shape[-2:])} ({out['time_s']:.2f} s)")
    return 0
