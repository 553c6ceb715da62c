"""The registry of architectures qft can load, create and code.

Each model family registers its architectures in its own module (:mod:`.google`,
:mod:`.waseda`, :mod:`.sensetime`, …), timm-style; importing :mod:`qft.models` imports
them all. An :class:`Architecture` knows its CompressAI class, its entropy-model kind (what
the codec needs to know), its constructor parameters, how to read those parameters back
from the tensor shapes of a state_dict, and a *key signature* (keys every checkpoint of the
architecture holds, keys none holds), used to pick the candidates when detecting the
architecture of a file.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torch import Tensor, nn

from qft.errors import UserError

__all__ = [
    "ARCHITECTURES",
    "ENTROPY_KINDS",
    "Architecture",
    "register_architecture",
    "get_architecture",
    "create_model",
    "forked_rng",
]

#: Entropy-model kinds, as the codec dispatches on them.
#:
#: - ``scale-hyperprior``: ``μ = 0``, ``σ = h_s(ẑ)`` (bmshj2018-hyperprior);
#: - ``mean-scale-hyperprior``: ``σ, μ = h_s(ẑ).chunk(2, 1)``, scales first (mbt2018-mean);
#: - ``autoregressive``: hyperprior plus a masked-convolution spatial context (mbt2018,
#:   cheng2020-*);
#: - ``channel-checkerboard``: uneven channel groups, each with a checkerboard spatial
#:   context (elic2022-*);
#: - ``channel-conditional``: hyperprior plus channel slices coded in order, each
#:   conditioned on the earlier slices, with latent residual prediction (tcm, dcae, cca;
#:   :mod:`qft.models.slices`).
ENTROPY_KINDS = (
    "scale-hyperprior",
    "mean-scale-hyperprior",
    "autoregressive",
    "channel-checkerboard",
    "channel-conditional",
)


@dataclass(frozen=True)
class Architecture:
    """One registered architecture.

    Attributes:
        name: CompressAI-style id (``"mbt2018-mean"``).
        cls: the CompressAI model class.
        entropy: entropy-model kind, one of :data:`ENTROPY_KINDS`.
        defaults: constructor parameters and their defaults (CompressAI's), e.g.
            ``{"N": 128, "M": 192}``. A default of ``None`` is completed by
            ``complete_params`` from the other parameters.
        signature: state_dict keys every checkpoint of this architecture holds (after
            :func:`qft.models.state_dict_of`); a file is a candidate when it holds them all.
            Must include the keys ``infer_params`` reads.
        infer_params: ``state_dict -> params``, read from tensor shapes.
        description: one line for ``qft models``.
        complete_params: optional ``params -> params`` hook that fills ``None`` defaults
            and checks constraints between parameters, raising :class:`UserError`.
        excludes: keys no checkpoint of this architecture holds (those of a sibling
            architecture that extends it); a file holding one is not a candidate.
        training_only: key prefixes (each ending in ``"."``) of modules that only
            training checkpoints hold, e.g. an auxiliary model of the loss. Loading drops
            the keys under them, and only those: every other key is still checked
            strictly. Empty for most architectures.
    """

    name: str
    cls: type
    entropy: str
    defaults: dict
    signature: frozenset[str]
    infer_params: Callable[[Mapping[str, Tensor]], dict]
    description: str
    complete_params: Callable[[dict], dict] | None = None
    excludes: frozenset[str] = frozenset()
    training_only: tuple[str, ...] = ()

    def is_candidate(self, keys: set[str] | frozenset[str]) -> bool:
        """Whether state_dict keys ``keys`` (training-only ones aside) match the key
        signature."""
        keys = {k for k in keys if not k.startswith(self.training_only)} if self.training_only else keys
        return self.signature <= keys and not self.excludes & keys

    def drop_training_only(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state_dict`` without the keys under the :attr:`training_only` prefixes."""
        if not self.training_only:
            return dict(state_dict)
        return {k: v for k, v in state_dict.items() if not k.startswith(self.training_only)}

    def resolve_params(self, params: Mapping[str, Any] | None = None) -> dict:
        """``defaults`` updated with ``params``, checked and completed.

        Raises:
            UserError: unknown parameter name, channel count not a positive integer, or a
                constraint of the architecture violated.
        """
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise UserError(f"{self.name} has no parameter {unknown[0]} (its parameters: {', '.join(self.defaults)})")
        out = {**self.defaults, **params}
        for key in ("N", "M"):
            if key in out and not (isinstance(out[key], int) and not isinstance(out[key], bool) and out[key] > 0):
                raise UserError(f"{self.name}: {key} must be a positive integer, got {out[key]!r}")
        if self.complete_params is not None:
            out = self.complete_params(out)
        return out

    def build(self, params: Mapping[str, Any] | None = None, *, seed: int | None = None) -> nn.Module:
        """A new randomly initialised model (train mode, CDF tables not built).

        With a ``seed``, initialisation draws from a forked RNG seeded with it, so the
        caller's global torch RNG is left untouched; without, from the global RNG, as any
        ``nn.Module`` constructor does.
        """
        params = self.resolve_params(params)
        if seed is None:
            return self.cls(**params)
        with forked_rng(seed):
            return self.cls(**params)


@contextlib.contextmanager
def forked_rng(seed: int | None = None) -> Iterator[None]:
    """Run the block on a copy of the global CPU RNG (seeded with ``seed`` if given); the
    global RNG state is restored on exit."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


#: id -> :class:`Architecture`, in registration order.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add ``arch`` to :data:`ARCHITECTURES` (ids are unique)."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f'architecture "{arch.name}" is already registered')
    if arch.entropy not in ENTROPY_KINDS:
        raise ValueError(f'architecture "{arch.name}": unknown entropy kind "{arch.entropy}"')
    if not all(p.endswith(".") for p in arch.training_only):
        raise ValueError(f'architecture "{arch.name}": training_only prefixes must end in "." (whole modules)')
    ARCHITECTURES[arch.name] = arch
    return arch


def get_architecture(name: str) -> Architecture:
    """The registered architecture ``name``; :class:`UserError` listing the ids if none."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UserError(f"unknown architecture '{name}' (registered: {', '.join(ARCHITECTURES)})") from None


def create_model(arch: str, *, seed: int | None = None, **params: Any) -> nn.Module:
    """A randomly initialised model of architecture ``arch``, ready to code.

    Args:
        arch: registered id, e.g. ``"mbt2018-mean"``.
        seed: seeds the initialisation (``torch.manual_seed``) on a forked RNG, so the
            caller's global RNG state is unchanged; ``None``: draws from the global RNG.
        **params: constructor parameters (``N``, ``M``, …); missing ones take the
            architecture's defaults.

    Returns:
        the model in eval mode, on the CPU, with ``update(force=True)`` done.

    Raises:
        UserError: unknown architecture or invalid parameters.
    """
    model = get_architecture(arch).build(params, seed=seed)
    model.update(force=True)
    return model.eval()
