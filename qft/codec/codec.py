"""Image codec: a model, a quantizer and the ``.qft`` container.

:class:`Codec` is the one place where images become bitstreams and back::

    codec = Codec(model, "mbt2018-mean", "mean-scale-hyperprior")
    out = codec.compress(x, Quantizer("tcq8", step=0.6, lam=0.02))  # x: (1, 3, H, W) in [0, 1]
    x_hat = codec.decompress(out["bitstream"])["x_hat"]   # the quantizer comes from the stream

Hyperprior-family models (``scale-hyperprior``, ``mean-scale-hyperprior``) are coded by
:class:`~qft.codec.latent.HyperpriorLatentCoder` with any quantizer over the whole latent.
Models with spatial autoregressive context (``mbt2018``, ``cheng2020-*``) and with channel
groups + checkerboard (``elic2022-*``) are coded with their own ``compress``/``decompress``
(USQ only; the container still adds the header and checksum): an exact trellis is
impossible with a spatial context, since each trellis path would need its own entropy
parameters, and TCQ over channel groups is not built yet.
"""

from __future__ import annotations

import hashlib
import time
import zlib

import numpy as np
import torch

from trellis import Quantizer
from trellis.rans import CorruptStreamError

from qft.codec.container import Container
from qft.codec.image import crop, pad
from qft.codec.latent import HYPERPRIOR_ENTROPY, HyperpriorLatentCoder
from qft.errors import UserError

__all__ = ["Codec", "model_fingerprint"]

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


def _plain(obj):
    """Shapes (``torch.Size``, tuples, nested dicts) as JSON lists and dicts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return int(obj)


def _eb_checksum(model: torch.nn.Module) -> int:
    crc = 0
    for name, module in sorted(model.named_modules()):
        cdf = getattr(module, "_quantized_cdf", None)
        if cdf is not None and not hasattr(module, "scale_table"):  # EntropyBottleneck(s) only
            crc = zlib.crc32(cdf.cpu().numpy().astype("<i4").tobytes(), crc)
    return crc


class Codec:
    """Compresses images to ``.qft`` bitstreams and back.

    Args:
        model: the compression model (CDFs up to date: ``update(force=True)``).
        arch: registry id of the architecture (written into the stream).
        entropy: the architecture's entropy-model kind (:class:`qft.models.Architecture`).
        device: where the analysis/synthesis transforms run; the entropy-parameter path
            always runs on the CPU.
    """

    def __init__(self, model: torch.nn.Module, arch: str, entropy: str, device: str = "cpu"):
        self.model = model.to(device).eval()
        self.arch = arch
        self.entropy = entropy
        self.device = device
        self.fingerprint = model_fingerprint(model)
        self.z_tables = _eb_checksum(model)
        hyper = entropy in HYPERPRIOR_ENTROPY
        self.latent_coder = HyperpriorLatentCoder(model, entropy) if hyper else None

    def check_quantizer(self, quantizer: Quantizer) -> None:
        """Raises :class:`UserError` when the model cannot use this quantizer."""
        if self.latent_coder is None and quantizer != Quantizer("usq"):
            raise UserError(
                f"{self.arch} has a {self.entropy} entropy model: {quantizer.method} (or a non-default USQ) needs the "
                "entropy parameters of every latent before quantization, which a spatial or channel context only "
                "gives after it; use -q usq with its defaults"
            )

    def _header(self, q: Quantizer) -> dict:
        return {
            "arch": self.arch,
            "checkpoint": self.fingerprint,
            "quantizer": {"method": q.method, "step": q.step, "lam": q.lam, "theta": q.theta, "reset": q.reset},
            "y_tables": q.table.checksum if self.latent_coder else None,
            "z_tables": self.z_tables,
        }

    @torch.no_grad()
    def compress(self, x: torch.Tensor, quantizer: Quantizer) -> dict:
        """Codes one image ``(1, 3, H, W)`` in ``[0, 1]`` with the given latent quantizer.

        Returns:
            dict with ``bitstream`` (bytes), ``y_hat`` (the decoder's latent, numpy; for
            hyperprior models), ``y_table_bits`` (table rate of the indices), ``y_bytes``,
            ``z_bytes`` and ``time_s``.
        """
        if x.ndim != 4 or x.shape[:2] != (1, 3):
            raise ValueError(f"expected one RGB image (1, 3, H, W), got {tuple(x.shape)}")
        self.check_quantizer(quantizer)
        t0 = time.perf_counter()
        h, w = x.shape[-2:]
        xp, padding = pad(x.to(self.device))
        header = self._header(quantizer) | {"image": [h, w], "padding": list(padding)}
        out = {}
        if self.latent_coder is not None:
            (q,) = self.latent_coder.quantize(xp, quantizer)
            y_stream = self.latent_coder.encode(q, quantizer)
            header |= {"z_shape": list(q.z_shape), "y_shape": list(q.result.indices.shape)}
            sections = [q.z_string, y_stream]
            out |= {"y_hat": q.result.y_hat, "y_table_bits": q.result.bits, "z_bytes": len(q.z_string), "y_bytes": len(y_stream)}
        else:
            enc = self.model.compress(xp)
            strings = enc["strings"]
            header |= {"shape": _plain(enc["shape"]), "layout": [len(s) for s in strings]}
            sections = [s for group in strings for s in group]
        out["bitstream"] = Container(header, sections).to_bytes()
        out["time_s"] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def decompress(self, data: bytes, name: str = "stream") -> dict:
        """Decodes a ``.qft`` bitstream.

        Returns:
            dict with ``x_hat`` ``(1, 3, H, W)`` in ``[0, 1]`` (CPU), ``y_hat`` (numpy, for
            hyperprior models) and ``time_s``.

        Raises:
            UserError: damaged stream, or one made with another model or tables.
        """
        t0 = time.perf_counter()
        c = Container.from_bytes(data, name)
        hd = c.header
        try:
            quantizer = self._check_compatible(hd, name)
            h, w = hd["image"]
            padding = tuple(hd["padding"])
            out = {}
            if self.latent_coder is not None:
                z_string, y_stream = c.sections
                y_hat, _, _ = self.latent_coder.decode(z_string, hd["z_shape"], y_stream, hd["y_shape"], quantizer)
                x_hat = self.model.g_s(torch.from_numpy(y_hat)[None].to(self.device)).clamp_(0, 1)
                out["y_hat"] = y_hat
            else:
                strings, pos = [], 0
                for n in hd["layout"]:
                    strings.append(list(c.sections[pos : pos + n]))
                    pos += n
                x_hat = self.model.decompress(strings, hd["shape"])["x_hat"]
        except CorruptStreamError as exc:
            raise UserError(f"{name}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{name}: malformed qft bitstream ({exc})") from None
        x_hat = crop(x_hat, padding).cpu()
        if x_hat.shape[-2:] != (h, w):
            raise UserError(f"{name}: malformed qft bitstream (image size {h}x{w} does not match its latent)")
        out |= {"x_hat": x_hat, "time_s": time.perf_counter() - t0}
        return out

    def _check_compatible(self, hd: dict, name: str) -> Quantizer:
        """The stream's quantizer, after checking architecture, weights and tables."""
        if hd.get("arch") != self.arch:
            raise UserError(f"{name}: coded with architecture {hd.get('arch')}, the given checkpoint is {self.arch}")
        if hd.get("checkpoint") != self.fingerprint:
            raise UserError(
                f"{name}: coded with checkpoint weights {str(hd.get('checkpoint'))[:12]}…, the given checkpoint has "
                f"{self.fingerprint[:12]}…; decode with the checkpoint that encoded it"
            )
        quantizer = Quantizer(**hd["quantizer"])
        self.check_quantizer(quantizer)
        if hd.get("y_tables") != (quantizer.table.checksum if self.latent_coder else None) or hd.get("z_tables") != self.z_tables:
            raise UserError(
                f"{name}: the probability tables rebuilt here differ from the encoder's (another numpy/scipy/compressai?); "
                "decode with the software versions that encoded it"
            )
        return quantizer
