"""Architectures, model creation and checkpoint loading.

::

    from qft.models import ARCHITECTURES, create_model, load_checkpoint

    model = create_model("mbt2018-mean", N=64, M=96, seed=0)
    ckpt = load_checkpoint("model.pth")            # architecture detected from the keys
    ckpt.model, ckpt.arch, ckpt.params, ckpt.sha256

One module per model family registers its architectures in :data:`ARCHITECTURES`:
:mod:`.google` (bmshj2018-hyperprior, mbt2018-mean, mbt2018), :mod:`.waseda`
(cheng2020-anchor, cheng2020-attn), :mod:`.sensetime` (elic2022-official,
elic2022-chandelier), :mod:`.tcm` (tcm), :mod:`.dcae` (dcae), :mod:`.cca` (cca), :mod:`.mlicpp`
(mlicpp).
"""

# the families register in this order (the listing order of `qft models`)
# isort: off
from . import google  # noqa: F401
from . import waseda  # noqa: F401
from . import sensetime  # noqa: F401
from . import tcm  # noqa: F401
from . import dcae  # noqa: F401
from . import cca  # noqa: F401
from . import mlicpp  # noqa: F401

# isort: on
from .checkpoint import (
    DERIVED_BUFFERS,
    WRAPPER_KEYS,
    LoadedCheckpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    state_dict_of,
)
from .registry import (
    ARCHITECTURES,
    ENTROPY_KINDS,
    Architecture,
    create_model,
    get_architecture,
    register_architecture,
)
from .slices import ChannelSliceModel

__all__ = [
    "ARCHITECTURES",
    "ENTROPY_KINDS",
    "ChannelSliceModel",
    "Architecture",
    "register_architecture",
    "get_architecture",
    "create_model",
    "LoadedCheckpoint",
    "WRAPPER_KEYS",
    "DERIVED_BUFFERS",
    "state_dict_of",
    "load_weights",
    "load_checkpoint",
    "save_checkpoint",
]
