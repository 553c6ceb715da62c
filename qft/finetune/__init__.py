"""Finetuning on genuinely quantized latents (``qft finetune``; docs/design.md,
"Finetuning").

- :mod:`qft.finetune.recipe`: YAML recipes, validated into :class:`FinetuneRecipe`.
- :mod:`qft.finetune.cache`: the memory-mapped cache of quantized training latents.
- :mod:`qft.finetune.parts`: the part sets each model family trains (``--parts``).
- :mod:`qft.finetune.objective`: the losses of hyperprior models (decoder /
  decoder+hyperdecoder, quantized or the noise-proxy control arm) and their batches.
- :mod:`qft.finetune.slices`: the loss of the models coded step by step with an LRP
  (channel-slice models TCM, DCAE, CCA; MLIC++), which quantizes every batch anew with the
  current weights.
- :mod:`qft.finetune.loop`: the training loop, single process or DDP under torchrun.
- :mod:`qft.finetune.ship`: a finished run as a delta checkpoint + manifest entry (``qft ship``).

The package itself is callable: ``from qft import finetune; finetune(checkpoint, out,
data=…)`` is :func:`qft.finetune.loop.finetune_checkpoint` (``qft finetune`` as a function).
"""

import sys
import types

from qft.finetune.cache import LatentCache, cache_identity
from qft.finetune.loop import finetune, finetune_checkpoint
from qft.finetune.objective import FinetuneObjective, cell_mass, index_cells
from qft.finetune.parts import PARTS, family_parts, part_prefixes, trainable_parameters
from qft.finetune.recipe import FinetuneRecipe, default_recipe, load_finetune_recipe, override_recipe
from qft.finetune.ship import ship_finetune
from qft.finetune.slices import SliceObjective

__all__ = [
    "PARTS",
    "FinetuneRecipe",
    "default_recipe",
    "load_finetune_recipe",
    "override_recipe",
    "LatentCache",
    "cache_identity",
    "FinetuneObjective",
    "SliceObjective",
    "family_parts",
    "part_prefixes",
    "cell_mass",
    "index_cells",
    "finetune",
    "finetune_checkpoint",
    "trainable_parameters",
    "ship_finetune",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """:func:`finetune_checkpoint`."""
        return finetune_checkpoint(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
