"""Google-family hyperprior models of CompressAI (:mod:`compressai.models.google`).

========================  ====================================  =====================
id                        class                                 entropy
========================  ====================================  =====================
``bmshj2018-hyperprior``  ``ScaleHyperprior``                   scale-hyperprior
``mbt2018-mean``          ``MeanScaleHyperprior``               mean-scale-hyperprior
``mbt2018``               ``JointAutoregressiveHierarchicalPriors``  autoregressive
========================  ====================================  =====================

All three take ``N`` (channels of the transforms and of ``z``) and ``M`` (channels of
``y``), read back as ``g_a.0.weight.shape[0]`` and ``g_a.6.weight.shape[0]``, as
CompressAI's ``from_state_dict`` does. The first two share every key name; they differ in
the shape of ``h_s.4.weight`` (``M`` or ``2M`` output channels), which detection checks.
"""

from __future__ import annotations

from collections.abc import Mapping

from compressai.models import (
    JointAutoregressiveHierarchicalPriors,
    MeanScaleHyperprior,
    ScaleHyperprior,
)
from torch import Tensor

from .registry import Architecture, register_architecture

__all__ = ["infer_google_params"]

_HYPERPRIOR_KEYS = frozenset(
    {
        "g_a.0.weight",
        "g_a.1.beta",
        "g_a.6.weight",
        "g_s.0.weight",
        "h_a.0.weight",
        "h_s.4.weight",
        "entropy_bottleneck.quantiles",
    }
)


#: the autoregressive context of mbt2018, absent from the two hyperprior models
_CONTEXT_KEYS = frozenset({"context_prediction.weight", "entropy_parameters.0.weight"})


def infer_google_params(state_dict: Mapping[str, Tensor]) -> dict:
    """``N`` and ``M`` of a Google-family state_dict."""
    return {
        "N": state_dict["g_a.0.weight"].shape[0],
        "M": state_dict["g_a.6.weight"].shape[0],
    }


register_architecture(
    Architecture(
        name="bmshj2018-hyperprior",
        cls=ScaleHyperprior,
        entropy="scale-hyperprior",
        defaults={"N": 128, "M": 192},
        signature=_HYPERPRIOR_KEYS,
        excludes=_CONTEXT_KEYS,
        infer_params=infer_google_params,
        description="Ballé et al. 2018, scale hyperprior (ICLR 2018)",
    )
)

register_architecture(
    Architecture(
        name="mbt2018-mean",
        cls=MeanScaleHyperprior,
        entropy="mean-scale-hyperprior",
        defaults={"N": 128, "M": 192},
        signature=_HYPERPRIOR_KEYS,
        excludes=_CONTEXT_KEYS,
        infer_params=infer_google_params,
        description="Minnen et al. 2018, mean-scale hyperprior (NeurIPS 2018)",
    )
)

register_architecture(
    Architecture(
        name="mbt2018",
        cls=JointAutoregressiveHierarchicalPriors,
        entropy="autoregressive",
        defaults={"N": 192, "M": 192},
        signature=_HYPERPRIOR_KEYS | _CONTEXT_KEYS,
        infer_params=infer_google_params,
        description="Minnen et al. 2018, hyperprior + autoregressive context (NeurIPS 2018)",
    )
)
