"""Finetuning on genuinely quantized latents (``qft finetune``; docs/design.md,
"Finetuning").

- :mod:`qft.finetune.recipe`: YAML recipes, validated into :class:`FinetuneRecipe`.
- :mod:`qft.finetune.cache`: the memory-mapped cache of quantized training latents.
- :mod:`qft.finetune.objective`: the losses (decoder / decoder+hyperdecoder, quantized
  or the noise-proxy control arm) and their batches.
- :mod:`qft.finetune.loop`: the training loop, single process or DDP under torchrun.
- :mod:`qft.finetune.ship`: a finished run as a delta checkpoint + manifest entry (``qft ship``).
"""

from qft.finetune.cache import LatentCache, cache_identity
from qft.finetune.loop import finetune, trainable_parameters
from qft.finetune.objective import FinetuneObjective, cell_mass, index_cells
from qft.finetune.recipe import PARTS, FinetuneRecipe, load_finetune_recipe
from qft.finetune.ship import ship_finetune

__all__ = [
    "PARTS",
    "FinetuneRecipe",
    "load_finetune_recipe",
    "LatentCache",
    "cache_identity",
    "FinetuneObjective",
    "cell_mass",
    "index_cells",
    "finetune",
    "trainable_parameters",
    "ship_finetune",
]
