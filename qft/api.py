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

from qft.codec import Codec as CodecBase
from qft.finetune import finetune_checkpoint as finetune
from qft.models import LoadedCheckpoint
from qft.settings import DEFAULT_REFINE_STEPS, QuantizerChoice, read_settings, resolve_quantizer

__all__ = ["Codec", "finetune"]


class Codec(CodecBase):
    """A :class:`qft.codec.Codec` whose :meth:`from_checkpoint` also sets the quantizer
    :meth:`compress` uses by default (:attr:`choice`), resolved as the CLI resolves it.

    It overrides nothing else: every call of :class:`qft.codec.Codec` means the same here."""

    #: the quantizer, distortion weights, decoder target and refinement :meth:`from_checkpoint` resolved
    choice: QuantizerChoice | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: LoadedCheckpoint | str | os.PathLike,
        device: str = "cpu",
        *,
        arch: str | None = None,
        unsafe_load: bool = False,
        quantizer: str = "usq",
        step: float | None = None,
        lambda_t: float | None = None,
        lambda_mult: float | None = None,
        reset: str = "channel",
        weights: str = "auto",
        target: str | float = "auto",
        plain_rows: int | None = None,
        refine: str = "none",
        refine_steps: int = DEFAULT_REFINE_STEPS,
        refine_fallback: bool = False,
    ) -> Codec:
        """:meth:`qft.codec.Codec.from_checkpoint` (the same arguments, the same meaning),
        with the quantizer that ``qft compress -m CHECKPOINT -q QUANTIZER`` and the same
        options (``--step``, ``--lambda-t``, ``--lambda-mult``, ``--reset``, ``--weights``,
        ``--target``, ``--plain-rows``, ``--refine``, ``--refine-steps``,
        ``--refine-fallback``) would use as the codec's default (:attr:`quantizer`,
        :attr:`weights`, :attr:`target`, :attr:`refine`; :attr:`choice`), as
        :func:`qft.settings.resolve_quantizer` resolves them.

        Raises:
            qft.errors.UserError: what the CLI refuses (unreadable checkpoint, a quantizer
                the model cannot use, invalid values).
        """
        codec = super().from_checkpoint(checkpoint, device, arch=arch, unsafe_load=unsafe_load)
        choice = resolve_quantizer(
            quantizer,
            read_settings(codec.checkpoint),
            step=step,
            lambda_t=lambda_t,
            lambda_mult=lambda_mult,
            reset=reset,
            weights=weights,
            target=target,
            plain_rows=plain_rows,
            refine=refine,
            refine_steps=refine_steps,
            refine_fallback=refine_fallback,
        )
        codec.check_quantizer(choice.quantizer)
        codec.choice = choice
        codec.quantizer, codec.weights, codec.target = choice.quantizer, choice.weights, choice.target
        codec.refine = choice.refine
        return codec
