"""Image codec: a model, a quantizer and the ``.qft`` container.

:class:`Codec` is the one place where images become bitstreams and back::

    codec = Codec.from_checkpoint("mbt2018-mean-0.013")  # or a LoadedCheckpoint, or Codec(model, "mbt2018-mean")
    out = codec.compress(x, Quantizer("tcq8", step=0.6, lam=0.02))  # x: (1, 3, H, W) in [0, 1], or a file
    x_hat = codec.decompress(out["bitstream"])["x_hat"]   # the quantizer comes from the stream

Hyperprior-family models (``scale-hyperprior``, ``mean-scale-hyperprior``), the
channel-slice models (``channel-conditional``: TCM, DCAE, CCA) and the checkerboard models
(``channel-checkerboard``: ELIC, MLIC++) are coded by
:class:`~qft.codec.latent.LatentCoder` with any quantizer, step by step
(:mod:`qft.codec.steps`: the whole latent in one step, one step per slice, or one per
checkerboard half of each channel group, :mod:`qft.codec.checkerboard`). Models with
spatial autoregressive context (``mbt2018``, ``cheng2020-*``) are coded with their own
``compress``/``decompress`` (USQ only; the container still adds the header and checksum):
an exact trellis is impossible with a spatial context, since each trellis path would need
its own entropy parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
import zlib

from typing import TYPE_CHECKING

import numpy as np
import torch

from trellis import Quantizer
from trellis.rans import CorruptStreamError

from qft.allocator import tune_allocator
from qft.codec.container import Container, Header, check_image_size, check_step
from qft.codec.image import crop, pad, padding_for, read_image
from qft.codec.latent import HYPERPRIOR_ENTROPY, LatentCoder, QuantizedLatent, RDTarget
from qft.codec.refine import SGARefine
from qft.codec.steps import STEP_ENTROPY
from qft.errors import UserError

if TYPE_CHECKING:
    from qft.models import LoadedCheckpoint

__all__ = ["Codec", "check_finite_weights", "model_fingerprint"]

_CDF_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length")


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (float32, sorted keys, CDF buffers excluded).

    Streams carry it: a stream decodes only with the same weights, whatever file layout
    or precision they were stored in.
    """
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key.rsplit(".", 1)[-1] in _CDF_BUFFERS:
            continue
        h.update(key.encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raises :class:`UserError` naming the first top-level module (``g_a``, ``h_s``,
    ``g_s``, …) whose parameters or floating-point buffers hold NaN or ±inf.

    Such weights make the encoder hang (CompressAI's coder on NaN indices), raise deep
    inside the entropy parameters, or code a valid stream of a black image; one check
    before any work replaces all three.
    """
    for name, module in model.named_children():
        tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
        if any(not torch.isfinite(t).all() for t in tensors):
            raise UserError(
                f"the model's {name} weights hold NaN or infinite values; "
                "the checkpoint is damaged or diverged, use another one"
            )


def _plain(obj):
    """Shapes (``torch.Size``, tuples, nested dicts) as JSON lists and dicts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return int(obj)


def _layout_fits(shape, hp: int, wp: int) -> bool:
    """Whether a context model's layout ``shape`` (``z``'s spatial size) is that of the
    latent of a ``hp × wp`` padded image: ``[hp/64, wp/64]``."""
    return shape == [hp // 64, wp // 64]


def _eb_checksum(model: torch.nn.Module) -> int:
    """CRC-32 of the EntropyBottleneck CDF tables (those of ``ẑ``) a stream depends on."""
    crc = 0
    for _, module in sorted(model.named_modules()):
        cdf = getattr(module, "_quantized_cdf", None)
        if cdf is not None and not hasattr(module, "scale_table"):  # EntropyBottleneck(s) only
            crc = zlib.crc32(cdf.cpu().numpy().astype("<i4").tobytes(), crc)
    return crc


class Codec:
    """Compresses images to ``.qft`` bitstreams and back.

    Args:
        model: the compression model (CDFs up to date: ``update(force=True)``).
        arch: registry id of the architecture (named in messages).
        entropy: its entropy-model kind (:data:`qft.models.ENTROPY_KINDS`); ``None``: the
            registered architecture's. Given, it must agree with the registry; a model of an
            unregistered architecture (a test's) needs it.
        device: where the analysis/synthesis transforms run; the entropy-parameter path
            always runs on the CPU.

    :meth:`compress` without a quantizer codes with :attr:`quantizer`, :attr:`weights`,
    :attr:`target` and :attr:`refine` (USQ, none, 0, none unless set;
    :meth:`qft.api.Codec.from_checkpoint` sets them to the quantizer the CLI resolves).

    Making a codec fixes glibc's allocator thresholds for the process once
    (:func:`qft.allocator.tune_allocator`: time linear in pixels on large images; the
    user's own ``MALLOC_*`` settings win).

    Raises:
        UserError: ``arch`` not registered and no ``entropy`` given.
        ValueError: ``entropy`` contradicts the registered architecture's.
    """

    def __init__(self, model: torch.nn.Module, arch: str, entropy: str | None = None, device: str = "cpu"):
        from qft.models import ARCHITECTURES, get_architecture

        if entropy is None:
            entropy = get_architecture(arch).entropy
        elif arch in ARCHITECTURES and ARCHITECTURES[arch].entropy != entropy:
            raise ValueError(f"{arch} has a {ARCHITECTURES[arch].entropy} entropy model, not {entropy}")
        tune_allocator()
        self.model = model.to(device).eval()
        self.arch = arch
        self.entropy = entropy
        self.device = device
        check_finite_weights(model)
        self.fingerprint = model_fingerprint(model)
        self.z_cdf_crc = _eb_checksum(model)
        self.latent_coder = LatentCoder(model, entropy) if entropy in STEP_ENTROPY else None
        #: what :meth:`compress` codes with when given no quantizer: the quantizer, its
        #: per-channel distortion weights, its decoder target and the latent refinement
        self.quantizer: Quantizer = Quantizer("usq")
        self.weights: np.ndarray | None = None
        self.target: float | RDTarget = 0.0
        self.refine: SGARefine | None = None
        #: the checkpoint the codec was made from (:meth:`from_checkpoint`), else None
        self.checkpoint: LoadedCheckpoint | None = None

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: LoadedCheckpoint | str | os.PathLike,
        device: str = "cpu",
        *,
        arch: str | None = None,
        unsafe_load: bool = False,
    ) -> Codec:
        """The codec of a checkpoint: its model and architecture, the entropy model the
        registry records for it.

        ``checkpoint``: a loaded one (:func:`qft.models.load_checkpoint`), or a file or
        shipped model name, loaded as ``load_checkpoint(checkpoint, arch,
        unsafe_load=unsafe_load)`` (``arch`` and ``unsafe_load`` apply only then).

        Raises:
            qft.errors.UserError: the checkpoint does not load (as :func:`~qft.models.load_checkpoint`).
        """
        from qft.models import LoadedCheckpoint, load_checkpoint

        if not isinstance(checkpoint, LoadedCheckpoint):
            checkpoint = load_checkpoint(checkpoint, arch, unsafe_load=unsafe_load)
        codec = cls(checkpoint.model, checkpoint.arch, device=device)
        codec.checkpoint = checkpoint
        return codec

    def check_quantizer(self, quantizer: Quantizer) -> None:
        """Raises :class:`UserError` when the model cannot use this quantizer."""
        if self.latent_coder is None and quantizer != Quantizer("usq"):
            raise UserError(
                f"{self.arch} has a {self.entropy} entropy model: {quantizer.method} (or a non-default USQ) needs the "
                "entropy parameters of every latent before quantization, which a spatial context only gives after "
                "it; use -q usq with its defaults"
            )

    def _tables(self, q: Quantizer, height: int, width: int) -> int:
        """CRC-32 of the coding tables a stream depends on (y rows for this quantizer, z)
        and of the image size, which the latent fixes only to a 64-pixel block."""
        y = q.table.checksum if self.latent_coder else 0
        return zlib.crc32(struct.pack("<IIII", y, self.z_cdf_crc, height, width))

    @torch.no_grad()
    def compress(
        self,
        x: torch.Tensor | str | os.PathLike,
        quantizer: Quantizer | None = None,
        weights: np.ndarray | None = None,
        target: float | RDTarget | None = None,
        refine: SGARefine | None = None,
    ) -> dict:
        """Codes one image ``(1, 3, H, W)`` in ``[0, 1]`` (or an image file,
        :func:`~qft.codec.image.read_image`) with the given latent quantizer.

        Without ``quantizer``: with :attr:`quantizer`, and :attr:`weights`, :attr:`target`
        and :attr:`refine` unless given; with one, ``weights`` None is none, ``target`` None
        is 0 and ``refine`` None is none. ``weights``: per-channel distortion weights
        ``(C,)`` of RDOQ/TCQ; ``target``: ``η`` of the decoder target
        (:mod:`qft.codec.latent`; 0: none), or an :class:`RDTarget` that chooses it for
        this image; ``refine``: an SGA refinement of the latents (:mod:`qft.codec.refine`;
        hyperprior models), whose refined ``y`` the quantizer codes. All are encoder-side
        choices of step-wise coded models; the decoder needs none. The target and the
        refinement exclude each other (docs/design.md, "SGA refinement").

        Returns:
            dict with ``bitstream`` (bytes), ``bits_estimated`` (for step-wise coded models
            the table rate of the y indices plus the likelihood bits of ``ẑ``; otherwise
            the model's likelihood bits), ``time_s``, and for step-wise coded models
            ``y_hat`` (the decoder's latent, numpy), ``y_table_bits``, ``y_bytes``,
            ``z_bytes``, ``target`` (the ``η`` coded); with ``refine.usq_fallback``
            (:class:`~qft.codec.SGARefine`) and a quantizer other than USQ also
            ``usq_fallback``: whether SGA + USQ's stream was kept, its RD cost at
            ``refine.lmbda`` (:meth:`rd_cost`) being lower than the quantizer's.
        """
        if not isinstance(x, torch.Tensor):
            x = read_image(x)
        if quantizer is None:
            quantizer = self.quantizer
            weights = self.weights if weights is None else weights
            target = self.target if target is None else target
            refine = self.refine if refine is None else refine
        target = 0.0 if target is None else target
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"expected one RGB image (1, 3, H, W), got {tuple(x.shape)}")
        self.check_quantizer(quantizer)
        if target and self.latent_coder is None:
            raise UserError(f"{self.arch}: the decoder target needs a step-wise coded model; use --target 0")
        if refine is not None and self.entropy not in HYPERPRIOR_ENTROPY:
            raise UserError(f"{self.arch}: --refine sga needs a hyperprior model; use --refine none")
        if refine is not None and target:
            raise ValueError("the decoder target and the SGA refinement exclude each other; give one of them")
        t0 = time.perf_counter()
        h, w = x.shape[-2:]
        check_image_size(h, w)
        check_step(quantizer.step)
        xp, padding = pad(x.to(self.device))
        if self.latent_coder is not None:
            if refine is not None and refine.usq_fallback and quantizer.method != "usq":
                # the encoder's RD decision: SGA + USQ's stream where it costs less
                (lat,), (usq_lat,) = self.latent_coder.quantize_or_usq(xp, quantizer, weights, padding, refine)
                out, alt = self.encode_latent(lat, quantizer, h, w), self.encode_latent(usq_lat, Quantizer("usq"), h, w)
                costs = [self.rd_cost(o, xp, padding, refine.lmbda) for o in (out, alt)]
                out = alt if costs[1] < costs[0] else out
                out["usq_fallback"] = out is alt
            else:
                (lat,) = self.latent_coder.quantize(xp, quantizer, weights, target, padding, refine)
                out = self.encode_latent(lat, quantizer, h, w)
            out["time_s"] = time.perf_counter() - t0
            return out
        # spatial context models: their own coder (USQ), inside the container
        likelihoods = self.model(xp)["likelihoods"]
        enc = self.model.compress(xp)
        strings = enc["strings"]
        layout = {"shape": _plain(enc["shape"]), "groups": [len(s) for s in strings]}
        sections = [json.dumps(layout, separators=(",", ":")).encode()] + [s for group in strings for s in group]
        return {
            "bitstream": Container(self._header(quantizer, h, w), sections).to_bytes(),
            "bits_estimated": float(sum(-torch.log2(v).sum() for v in likelihoods.values())),
            "time_s": time.perf_counter() - t0,
        }

    def encode_latent(self, lat: QuantizedLatent, quantizer: Quantizer, height: int, width: int) -> dict:
        """The bitstream of an already quantized latent (step-wise coded models).

        :meth:`compress` is :meth:`LatentCoder.quantize` followed by this; callers
        that try several quantizers on one image analyse once and re-quantize
        (:meth:`LatentCoder.requantize`). Returns :meth:`compress`'s dict less
        ``time_s``.
        """
        header = self._header(quantizer, height, width)
        y_stream = self.latent_coder.encode(lat, quantizer, header.seal())
        bitstream = Container(header, [lat.z_string, y_stream]).to_bytes()
        return {
            "bitstream": bitstream,
            "y_hat": lat.y_hat,
            "y_table_bits": lat.result.bits,
            "z_bytes": len(lat.z_string),
            "y_bytes": len(y_stream),
            "bits_estimated": lat.result.bits + lat.z_bits_estimated,
            "target": lat.target,
        }

    def rd_cost(self, out: dict, xp: torch.Tensor, padding: tuple[int, int, int, int], lmbda: float) -> float:
        """The RD cost ``λ·255²·MSE + bpp`` at ``lmbda`` of :meth:`encode_latent`'s ``out``
        for the zero-padded image ``xp`` ``(1, 3, H, W)`` it coded (``padding``:
        ``(left, right, top, bottom)``): the error of the image the decoder renders
        (:meth:`LatentCoder.mse`) and the whole stream's bits per unpadded pixel."""
        left, right, top, bottom = padding
        pixels = (xp.shape[-2] - top - bottom) * (xp.shape[-1] - left - right)
        return lmbda * 255**2 * self.latent_coder.mse(out["y_hat"], xp, padding) + 8 * len(out["bitstream"]) / pixels

    def _header(self, quantizer: Quantizer, height: int, width: int) -> Header:
        return Header(
            bytes.fromhex(self.fingerprint),
            quantizer.method,
            quantizer.reset,
            quantizer.step,
            self._tables(quantizer, height, width),
            height,
            width,
            quantizer.plain_rows,
        )

    @torch.no_grad()
    def decompress(self, data: bytes, name: str = "stream") -> dict:
        """Decodes a ``.qft`` bitstream.

        Returns:
            dict with ``x_hat`` ``(1, 3, H, W)`` in ``[0, 1]`` (CPU), ``y_hat`` (numpy, for
            step-wise coded models: the decoder's latent) and ``time_s``.

        Raises:
            UserError: damaged stream, or one made with another model or tables. The
                header is checked against the payload before anything image-sized is
                allocated: its size limits (:mod:`qft.codec.container`), the tables and
                size check, and the z stream (or a context model's layout), which must
                hold exactly the latent of that size.
        """
        t0 = time.perf_counter()
        c = Container.from_bytes(data, name)
        hd = c.header
        try:
            quantizer = self._check_compatible(hd, name)
            padding = padding_for(hd.height, hd.width)
            hp, wp = hd.height + padding[2] + padding[3], hd.width + padding[0] + padding[1]
            out = {}
            if self.latent_coder is not None:
                z_string, y_stream = c.sections
                y_hat, _, _ = self.latent_coder.decode(z_string, (hp // 64, wp // 64), y_stream, quantizer, hd.seal())
                x_hat = crop(self.latent_coder.render(y_hat, self.device), padding).cpu()
                out["y_hat"] = y_hat
            else:
                layout = json.loads(c.sections[0].decode())
                if not _layout_fits(layout["shape"], hp, wp):
                    raise ValueError(f"latent shape {layout['shape']} is not that of a {hd.width}×{hd.height} image")
                strings, pos = [], 1
                for n in layout["groups"]:
                    strings.append(list(c.sections[pos : pos + n]))
                    pos += n
                x_hat = crop(self.model.decompress(strings, layout["shape"])["x_hat"], padding).cpu()
        except CorruptStreamError as exc:
            raise UserError(f"{name}: {exc}") from None
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{name}: malformed qft bitstream ({exc})") from None
        if x_hat.shape[-2:] != (hd.height, hd.width):
            raise UserError(f"{name}: malformed qft bitstream (image size does not match its latent)")
        out |= {"x_hat": x_hat, "time_s": time.perf_counter() - t0}
        return out

    def _check_compatible(self, hd: Header, name: str) -> Quantizer:
        """The stream's quantizer, after checking the weights and the tables."""
        if hd.checkpoint != bytes.fromhex(self.fingerprint)[:4]:
            raise UserError(
                f"{name}: coded with other checkpoint weights ({hd.checkpoint.hex()}…) than the given ones "
                f"({self.fingerprint[:8]}…); decode with the checkpoint that encoded it"
            )
        quantizer = Quantizer(hd.method, step=hd.step, reset=hd.reset, plain_rows=hd.plain_rows)
        self.check_quantizer(quantizer)
        if hd.tables != self._tables(quantizer, hd.height, hd.width):
            raise UserError(
                f"{name}: the probability tables rebuilt here or the image size differ from the encoder's (a damaged "
                "header, or another numpy/scipy/compressai?); decode with the software versions that encoded it"
            )
        return quantizer
