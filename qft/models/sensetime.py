"""ELIC models of CompressAI (:mod:`compressai.models.sensetime`).

``elic2022-official`` (``Elic2022Official``) and ``elic2022-chandelier``
(``Elic2022Chandelier``) take ``N``, ``M`` and ``groups``, the uneven channel groups of
``y`` (``sum(groups) == M``; CompressAI's default ``[16, 16, 32, 64, M - 128]``). Each
group is coded with a checkerboard spatial context, conditioned on the previously decoded
groups. Both share every key name; they differ in the shapes of ``h_s`` and of the
channel-context convolutions, which detection checks.

The parameters are read back from shapes: ``N = g_a.0.weight.shape[0]``,
``M = g_a.13.weight.shape[0]``, and group ``k`` from its checkerboard convolution
``latent_codec.y.latent_codec.y{k}.context_prediction.weight`` (``[2g, g, 5, 5]``).
CompressAI's own ``from_state_dict`` reads ``N`` only, so it loads only ``M = 320``.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressai.models.sensetime import Elic2022Chandelier, Elic2022Official
from torch import Tensor

from qft.errors import UserError

from .registry import Architecture, register_architecture

__all__ = ["infer_elic_params", "complete_elic_params"]

_GROUP_KEY = "latent_codec.y.latent_codec.y{}.context_prediction.weight"

_ELIC_KEYS = frozenset(
    {
        "g_a.0.weight",
        "g_a.13.weight",
        "g_s.1.weight",
        "latent_codec.hyper.h_a.0.weight",
        "latent_codec.hyper.h_s.4.weight",
        "latent_codec.hyper.entropy_bottleneck.quantiles",
        _GROUP_KEY.format(0),
    }
)


def infer_elic_params(state_dict: Mapping[str, Tensor]) -> dict:
    """``N``, ``M`` and ``groups`` of an ELIC state_dict."""
    groups = []
    while _GROUP_KEY.format(len(groups)) in state_dict:
        groups.append(state_dict[_GROUP_KEY.format(len(groups))].shape[1])
    if not groups:
        raise KeyError(_GROUP_KEY.format(0))
    return {
        "N": state_dict["g_a.0.weight"].shape[0],
        "M": state_dict["g_a.13.weight"].shape[0],
        "groups": groups,
    }


def complete_elic_params(params: dict) -> dict:
    """Fill ``groups = None`` with CompressAI's default and check ``sum(groups) == M``."""
    M, groups = params["M"], params["groups"]
    if groups is None:
        if M <= 128:
            raise UserError(
                f"ELIC at M={M} needs explicit groups (CompressAI's default [16, 16, 32, 64, M-128] needs M > 128)"
            )
        groups = [16, 16, 32, 64, M - 128]
    groups = list(groups)
    if not groups or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in groups):
        raise UserError(f"ELIC groups must be positive integers, got {groups}")
    if sum(groups) != M:
        raise UserError(f"ELIC groups {groups} sum to {sum(groups)}, not M={M}")
    return {**params, "groups": groups}


register_architecture(
    Architecture(
        name="elic2022-official",
        cls=Elic2022Official,
        entropy="channel-checkerboard",
        defaults={"N": 192, "M": 320, "groups": None},
        signature=_ELIC_KEYS,
        infer_params=infer_elic_params,
        description="He et al. 2022, ELIC: uneven channel groups, checkerboard (CVPR 2022)",
        complete_params=complete_elic_params,
    )
)

register_architecture(
    Architecture(
        name="elic2022-chandelier",
        cls=Elic2022Chandelier,
        entropy="channel-checkerboard",
        defaults={"N": 192, "M": 320, "groups": None},
        signature=_ELIC_KEYS,
        infer_params=infer_elic_params,
        description="ELIC re-implemented by Chandelier 2023: context from 1st + last group",
        complete_params=complete_elic_params,
    )
)
