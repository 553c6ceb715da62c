"""qft: post-training quantization and quantization-aware finetuning of learned image codecs.

The torch side of the toolkit (models, codec, training, finetuning, evaluation, CLI).
The quantization engine itself lives in the torch-free package :mod:`trellis`.

The Python API is importable from here; the names load on first use, so ``import qft``
stays light (no torch)::

    from qft import Codec, Quantizer, bd_rate, finetune, load_checkpoint
"""

import importlib

__version__ = "0.1.0"

#: top-level name -> module that defines it (imported on first access)
_API = {
    "Codec": "qft.api",
    "Quantizer": "trellis",
    "load_checkpoint": "qft.models",
    "bd_rate": "qft.eval.bdrate",
    "read_image": "qft.codec",
    "write_image": "qft.codec",
}

# ``from qft import finetune`` imports the package qft.finetune, which is callable: the
# function qft.finetune.finetune_checkpoint (a package and a function cannot share the name otherwise)
__all__ = ["__version__", "Codec", "Quantizer", "bd_rate", "finetune", "load_checkpoint", "read_image", "write_image"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qft' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
