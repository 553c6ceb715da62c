"""Cheng et al. 2020 models of CompressAI (:mod:`compressai.models.waseda`).

``cheng2020-anchor`` (``Cheng2020Anchor``) and ``cheng2020-attn`` (``Cheng2020Attention``)
take ``N`` only (``M = N``), read back as ``g_a.0.conv1.weight.shape[0]``. Both use the
autoregressive entropy model of mbt2018 (hyperprior + masked-convolution context);
``cheng2020-attn`` adds attention blocks (``g_a.3``, ``g_a.8``, ``g_s.0``, ``g_s.5``).
"""

from __future__ import annotations

from collections.abc import Mapping

from compressai.models import Cheng2020Anchor, Cheng2020Attention
from torch import Tensor

from .registry import Architecture, register_architecture

__all__ = ["infer_cheng2020_params"]

_CHENG2020_KEYS = frozenset(
    {
        "g_a.0.conv1.weight",
        "g_a.2.conv1.weight",
        "h_a.0.weight",
        "h_s.0.weight",
        "context_prediction.weight",
        "entropy_parameters.0.weight",
        "entropy_bottleneck.quantiles",
    }
)


#: the first attention block of cheng2020-attn, absent from cheng2020-anchor
_ATTENTION_KEYS = frozenset({"g_a.3.conv_a.0.conv.0.weight"})


def infer_cheng2020_params(state_dict: Mapping[str, Tensor]) -> dict:
    """``N`` of a cheng2020 state_dict."""
    return {"N": state_dict["g_a.0.conv1.weight"].shape[0]}


register_architecture(
    Architecture(
        name="cheng2020-anchor",
        cls=Cheng2020Anchor,
        entropy="autoregressive",
        defaults={"N": 192},
        signature=_CHENG2020_KEYS,
        excludes=_ATTENTION_KEYS,
        infer_params=infer_cheng2020_params,
        description="Cheng et al. 2020, residual blocks, autoregressive (CVPR 2020)",
    )
)

register_architecture(
    Architecture(
        name="cheng2020-attn",
        cls=Cheng2020Attention,
        entropy="autoregressive",
        defaults={"N": 192},
        signature=_CHENG2020_KEYS | _ATTENTION_KEYS,
        infer_params=infer_cheng2020_params,
        description="Cheng et al. 2020, residual + attention, autoregressive (CVPR 2020)",
    )
)
