"""The trainable part sets of each model family: the one home of what ``--parts`` trains.

=====================  ==========================  ==============================================
model family           parts                       trained modules (everything else is frozen)
=====================  ==========================  ==============================================
hyperprior             ``decoder``                 ``g_s``
(bmshj2018, mbt2018)   ``decoder+hyperdecoder``    ``g_s``, ``h_s``
channel slices         ``decoder``                 ``g_s``, ``lrp_transforms`` (every LRP network)
(TCM, DCAE, CCA)       ``decoder+entropy``         ``g_s`` and the whole entropy path after ``ẑ``:
                                                   hyper-synthesis, slice transforms of ``μ``/``σ``
                                                   (and their supports), LRP; every module and
                                                   parameter but ``g_a``, ``h_a``, the z
                                                   ``EntropyBottleneck`` and ``gaussian_conditional``
MLIC++                 ``decoder``                 ``g_s``, ``lrp_anchor``, ``lrp_nonanchor``
                       ``decoder+entropy``         ``g_s`` and the whole entropy path after ``ẑ``:
                                                   ``h_s``, the channel, local and global contexts,
                                                   both entropy-parameter nets, both LRPs; all but
                                                   ``g_a``, ``h_a``, ``entropy_bottleneck`` and
                                                   ``gaussian_conditional``
=====================  ==========================  ==============================================

The frozen side is what the encoder computes before the first coded symbol: ``g_a``,
``h_a`` and the z bottleneck, so ``ẑ`` (and its stream) stay those of the base model.
"""

from __future__ import annotations

import torch

from qft.errors import UserError
from qft.models import ChannelSliceModel
from qft.models.mlicpp import MLICPlusPlus

__all__ = ["PARTS", "family_parts", "check_parts", "part_names", "part_prefixes", "trainable_parameters"]

#: every part set of any family (:func:`family_parts` gives a model's own)
PARTS = ("decoder", "decoder+hyperdecoder", "decoder+entropy")

_HYPERPRIOR_PARTS = {"decoder": ("g_s",), "decoder+hyperdecoder": ("g_s", "h_s")}
_STEP_PARTS = ("decoder", "decoder+entropy")
#: modules of a model coded step by step that no part set trains (with its z bottleneck)
_STEP_FROZEN = ("g_a", "h_a", "gaussian_conditional")


def _step_family(model: torch.nn.Module) -> tuple[tuple[str, ...], str] | None:
    """``(decoder modules, z bottleneck name)`` of a model coded step by step with an LRP
    (a channel-slice model or MLIC++), else ``None``."""
    if isinstance(model, ChannelSliceModel):
        return ("g_s", "lrp_transforms"), model.z_bottleneck_name
    if isinstance(model, MLICPlusPlus):
        return ("g_s", "lrp_anchor", "lrp_nonanchor"), "entropy_bottleneck"
    return None


def family_parts(model: torch.nn.Module) -> tuple[str, ...]:
    """The part sets that apply to ``model`` (a hyperprior model, a channel-slice model or
    MLIC++)."""
    return _STEP_PARTS if _step_family(model) else tuple(_HYPERPRIOR_PARTS)


def check_parts(model: torch.nn.Module, arch: str, parts: str) -> None:
    """Raises a one-line :class:`UserError` when ``parts`` does not apply to ``model``."""
    allowed = family_parts(model)
    if parts not in allowed:
        raise UserError(f"parts {parts} does not apply to {arch}; its parts are: {', '.join(allowed)}")


def part_names(model: torch.nn.Module, parts: str) -> tuple[str, ...]:
    """The top-level attribute names (submodules and direct parameters) ``parts`` trains
    on ``model``, in the model's own order.

    Raises:
        UserError: ``parts`` does not apply to the model's family.
    """
    check_parts(model, type(model).__name__, parts)
    family = _step_family(model)
    if family is None:
        return _HYPERPRIOR_PARTS[parts]
    decoder, z_bottleneck = family
    if parts == "decoder":
        return decoder
    frozen = {*_STEP_FROZEN, z_bottleneck}
    names = [n for n, _ in model.named_children()] + [n for n, _ in model.named_parameters(recurse=False)]
    return tuple(n for n in names if n not in frozen)


def part_prefixes(model: torch.nn.Module, parts: str) -> tuple[str, ...]:
    """``state_dict`` key prefixes of the trained parts (``"g_s."`` for a submodule, the
    key itself for a parameter held directly by the model, e.g. DCAE's dictionary ``dt``)."""
    direct = {n for n, _ in model.named_parameters(recurse=False)}
    return tuple(n if n in direct else f"{n}." for n in part_names(model, parts))


def trainable_parameters(model: torch.nn.Module, parts: str) -> list[torch.nn.Parameter]:
    """Freeze the model, then unfreeze the modules and parameters of ``parts``
    (:func:`part_names`); returns the unfrozen parameters."""
    model.requires_grad_(False)
    params = []
    for name in part_names(model, parts):
        member = getattr(model, name)
        member.requires_grad_(True)
        params += [member] if isinstance(member, torch.nn.Parameter) else list(member.parameters())
    return params
