"""qft's MLIC++ against the official implementation, on the same weights, for both weight
generations.

The official ``MLICPlusPlus`` (imported from a checkout of JiangWeibeta/MLIC, at its
release config N=192, M=320, 10 slices; random weights with a gain on ``g_a``'s last
layer so that ``y`` needs many symbols) is copied into qft's model through
:func:`qft.models.load_weights`, then on a centre crop of one BSDS500 validation image:

- ``forward`` (eval mode): ``x_hat`` and the likelihoods, bitwise and max abs difference;
- ``compress``: the y and z strings, byte for byte;
- ``decompress``: qft's decoder on the official strings and the official decoder on qft's.

The 2023-09 generation is built as the official README says, by rebinding
``LatentResidualPrediction`` and ``SynthesisTransform`` of ``models/mlicpp.py`` to their
``…Old`` variants before construction. Shims, each neutral for these checks:
``compressai.ops.ste_round`` (the name in compressai 1.2.0b3; ``quantize_ste`` since) is
aliased; ``timm`` (only ``to_2tuple`` is imported) is stubbed when absent; and without CUDA
``torch.cuda.synchronize``, which the official ``compress``/``decompress`` call around
their timers, is a no-op.

::

    python benchmarks/official_equivalence_mlicpp.py --mlic ../MLIC \\
        --json benchmarks/results/official_equivalence_mlicpp.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types

from pathlib import Path

import compressai.ops
import torch

from _equivalence import add_arguments, centre_crop, check, write_record  # sibling helper

from qft.codec import read_image
from qft.models import create_model, load_weights


def _shims() -> None:
    if not hasattr(compressai.ops, "ste_round"):
        compressai.ops.ste_round = compressai.ops.quantize_ste
    try:
        importlib.import_module("timm")
    except ImportError:
        layers = types.ModuleType("timm.models.layers")
        layers.to_2tuple = lambda x: (x, x)
        for mod in ("timm", "timm.models"):
            sys.modules[mod] = types.ModuleType(mod)
        sys.modules["timm.models.layers"] = layers
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *args, **kwargs: None


class _Config(dict):
    """The official constructor reads its settings as attributes of a dict."""

    __getattr__ = dict.__getitem__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--mlic", type=Path, required=True, help="checkout of JiangWeibeta/MLIC (at 4aa9d2a: the fixtures' commit)"
    )
    add_arguments(p, "side of the centre crop (a multiple of 64)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    image = read_image(args.image)
    h, w = image.shape[-2:]
    if args.size > min(h, w) or args.size % 64:
        p.error(f"--size must be a multiple of 64 within the image ({h}x{w}), got {args.size}")
    x = centre_crop(image, args.size, args.size)

    _shims()
    sys.path.insert(0, str(args.mlic / "MLIC++"))
    official_module = importlib.import_module("models.mlicpp")
    quantization = importlib.import_module("modules.transform.quantization")
    config = _Config(N=192, M=320, slice_num=10, context_window=5, act=torch.nn.GELU)
    results = {}
    for generation in ("2024-04", "2023-09"):
        if generation == "2023-09":
            official_module.LatentResidualPrediction = quantization.LatentResidualPredictionOld
            official_module.SynthesisTransform = official_module.SynthesisTransformOld
        torch.manual_seed(0)
        official = official_module.MLICPlusPlus(config)
        with torch.no_grad():
            official.g_a.analysis_transform[-1].weight.mul_(args.gain)
        official.update(force=True)
        ours = load_weights(
            create_model("mlicpp", generation=generation), official.state_dict(), name=f"official MLIC++ {generation}"
        )
        results[generation] = check(official, ours, x, likelihoods=("y_likelihoods", "z_likelihoods"))
        print(generation, json.dumps(results[generation]), flush=True)

    write_record(args, args.size, results)


if __name__ == "__main__":
    main()
