"""qft: post-training quantization and quantization-aware finetuning of learned image codecs.

The torch side of the toolkit (models, codec, training, finetuning, evaluation, CLI).
The quantization engine itself lives in the torch-free package :mod:`trellis`.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
