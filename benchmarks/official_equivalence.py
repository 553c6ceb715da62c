"""qft's DCAE and CCA against the official implementations, on the same weights.

For each family, the official model (imported from a checkout of its repository, at its
release settings, random weights with a gain on ``g_a``'s last layer so that ``y`` needs
many symbols) is copied into qft's model through :func:`qft.models.load_weights`, then on
a centre crop of one BSDS500 validation image:

- ``forward`` (eval mode): ``x_hat`` and the likelihoods, bitwise and max abs difference;
- ``compress``: the y and z strings, byte for byte;
- ``decompress``: qft's decoder on the official strings and the official decoder on qft's,
  against each other's reconstruction.

CCA's official model is built as ``train.py`` builds it (``cca_training=True``), so its
state_dict carries the training-only ``aux_entropymodel.*`` keys; they are dropped by
:data:`qft.models.cca.TRAINING_ONLY_KEYS` before loading (and the strict load without the
drop is shown to fail). Official packages are imported without their ``__init__.py``
(at the checked commits it imports names that do not exist); ``timm``, which DCAE imports
for ``trunc_normal_`` and ``DropPath`` (unused at drop_path 0), is stubbed when absent.

::

    python benchmarks/official_equivalence.py --dcae ../DCAE --cca ../CCA \\
        --json benchmarks/results/official_equivalence.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types

from pathlib import Path

import torch

from _equivalence import add_arguments, centre_crop, check, write_record  # sibling helper

from qft.codec import read_image
from qft.errors import UserError
from qft.models import create_model, load_weights
from qft.models.cca import TRAINING_ONLY_KEYS


def _official_package(name: str, repo: Path) -> str:
    """Register ``repo/models`` as package ``name`` without running its ``__init__``."""
    package = types.ModuleType(name)
    package.__path__ = [str(repo / "models")]
    sys.modules[name] = package
    return name


def _stub_timm() -> None:
    try:
        importlib.import_module("timm")
    except ImportError:
        layers = types.ModuleType("timm.models.layers")
        layers.trunc_normal_ = torch.nn.init.trunc_normal_
        layers.DropPath = lambda p: torch.nn.Identity()
        for mod in ("timm", "timm.models"):
            sys.modules[mod] = types.ModuleType(mod)
        sys.modules["timm.models.layers"] = layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dcae", type=Path, required=True, help="checkout of LabShuHangGU/DCAE")
    p.add_argument("--cca", type=Path, required=True, help="checkout of LabShuHangGU/CCA")
    add_arguments(p, "height of the centre crop (a multiple of 128, >= 256)")
    p.add_argument("--width", type=int, help="width of the centre crop (default: --size)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    image = read_image(args.image)
    h, w = image.shape[-2:]
    width = args.width or args.size
    if args.size > h or width > w:
        p.error(f"{args.image} is {h}x{w} (HxW), smaller than the crop {args.size}x{width}")
    x = centre_crop(image, args.size, width)

    _stub_timm()
    dcae_module = importlib.import_module(_official_package("official_dcae", args.dcae) + ".dcae")
    cca_module = importlib.import_module(_official_package("official_cca", args.cca) + ".vae")
    results = {}

    torch.manual_seed(0)
    official = dcae_module.DCAE()
    with torch.no_grad():
        official.g_a[-1].weight.mul_(args.gain)
    official.update(force=True)
    ours = load_weights(create_model("dcae"), official.state_dict(), name="official DCAE")
    results["dcae"] = check(official, ours, x)
    print("dcae", json.dumps(results["dcae"]))

    torch.manual_seed(0)
    k = 1.7  # eval.py's --prop-slices default
    official = cca_module.LICAutoencoder(
        M=320,
        prop_slices=[1, 2**k, 3**k, 4**k, 5**k],
        ae_dim=[192, 224, 256],
        em_dim=224,
        ae_layers=[4, 4, 4],
        em_layers=4,
        cca_training=True,
    )
    with torch.no_grad():
        official.g_a.down[-1].weight.mul_(args.gain)
    official.update(force=True)
    state_dict = official.state_dict()
    try:
        load_weights(create_model("cca"), state_dict, name="official CCA (training)")
        strict_without_drop = "loaded"
    except UserError as exc:
        strict_without_drop = str(exc)
    kept = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_KEYS)}
    ours = load_weights(create_model("cca"), kept, name="official CCA")
    results["cca"] = check(official, ours, x)
    print("cca", json.dumps(results["cca"]))
    results["cca"]["training_only_keys_dropped"] = len(state_dict) - len(kept)
    results["cca"]["strict_load_without_drop"] = strict_without_drop

    write_record(args, [args.size, width], results)


if __name__ == "__main__":
    main()
