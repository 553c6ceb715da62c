"""The Python API, re-exported at the top level (``from qft import Codec, …``).

::

    from qft import Codec, bd_rate, finetune, load_checkpoint, Quantizer

    codec = Codec.from_checkpoint("mbt2018-mean-0.013", quantizer="tcq8")  # exactly `qft compress -q tcq8`
    out = codec.compress("kodim01.png")            # a path, or a (1, 3, H, W) tensor in [0, 1]
    x_hat = codec.decompress(out["bitstream"])["x_hat"]

:class:`Codec` is :class:`qft.codec.Codec` bound to a checkpoint and to the quantizer the
CLI resolves for it (explicit arguments > the checkpoint's ``qft calibrate`` settings > the
defaults: :func:`qft.settings.resolve_quantizer`), so its bytes are the CLI's.
:func:`finetune` is ``qft finetune`` (:func:`qft.finetune.loop.finetune_checkpoint`): a recipe
(default ``recipes/finetune/cpu.yaml``) with the same overrides.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from trellis import Quantizer

from qft.codec import Codec as CodecBase
from qft.codec import RDTarget, read_image
from qft.finetune import finetune_checkpoint as finetune
from qft.models import LoadedCheckpoint, load_checkpoint
from qft.settings import QuantizerChoice, read_settings, resolve_quantizer

__all__ = ["Codec", "finetune"]


class Codec(CodecBase):
    """A :class:`qft.codec.Codec` with a default quantizer: :meth:`compress` without a
    quantizer codes with :attr:`choice` (set by :meth:`from_checkpoint`)."""

    #: the quantizer, distortion weights and decoder target used by default (None: USQ)
    choice: QuantizerChoice | None = None
    #: the loaded checkpoint (:meth:`from_checkpoint`)
    checkpoint: LoadedCheckpoint | None = None

    @classmethod
    def from_checkpoint(
        cls,
        name_or_path: str | os.PathLike,
        quantizer: str = "usq",
        *,
        step: float | None = None,
        lambda_t: float | None = None,
        lambda_mult: float | None = None,
        reset: str = "channel",
        weights: str = "auto",
        target: str | float = "auto",
        arch: str | None = None,
        unsafe_load: bool = False,
        device: str = "cpu",
    ) -> Codec:
        """The codec of a checkpoint file or shipped model name, with the quantizer that
        ``qft compress -m NAME -q QUANTIZER`` and the same options would use.

        Raises:
            qft.errors.UserError: what the CLI refuses (unreadable checkpoint, a quantizer
                the model cannot use, invalid values).
        """
        ck = load_checkpoint(name_or_path, arch, unsafe_load=unsafe_load)
        choice = resolve_quantizer(
            quantizer,
            read_settings(ck),
            step=step,
            lambda_t=lambda_t,
            lambda_mult=lambda_mult,
            reset=reset,
            weights=weights,
            target=target,
        )
        codec = cls(ck.model, ck.arch, device=device)
        codec.check_quantizer(choice.quantizer)
        codec.choice, codec.checkpoint = choice, ck
        return codec

    def compress(
        self,
        x: torch.Tensor | str | os.PathLike,
        quantizer: Quantizer | None = None,
        weights: np.ndarray | None = None,
        target: float | RDTarget | None = None,
    ) -> dict:
        """:meth:`qft.codec.Codec.compress` of an image tensor or file; without
        ``quantizer``, with :attr:`choice` (its weights and target, unless given)."""
        if not isinstance(x, torch.Tensor):
            x = read_image(x)
        if quantizer is None and self.choice is not None:
            quantizer = self.choice.quantizer
            weights = self.choice.weights if weights is None else weights
            target = self.choice.target if target is None else target
        return super().compress(x, quantizer or Quantizer("usq"), weights, 0.0 if target is None else target)
