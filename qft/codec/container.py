"""The ``.qft`` container: a compact, self-describing, checksummed envelope.

The header holds only what the decoder needs, so the file size is an honest rate (about
30 bytes above the entropy-coded payload; 0.0006 bpp on a Kodak image)::

    magic        2 bytes  b"\\x89Q"
    version      u8       FORMAT_VERSION
    checkpoint   4 bytes  first bytes of the model's weight fingerprint (SHA-256)
    quantizer    u8       plain rows << 3 | method index (trellis.METHODS) << 1 | reset index
    step         f64      the quantizer's step (the tables are rebuilt from it)
    tables       u32      CRC-32 of the y and z coding tables the encoder used and of the
                          image size (``Codec`` computes it)
    height,width u32, u32 image size (padding to a multiple of 64 is implied)
    sections     u8 count, then each section's length as a LEB128 varint, then the bytes
    crc32        u32      over everything before it

λ and the USQ rounding offset are encoder choices and are not transmitted. A damaged file
is refused before any entropy decoding: wrong magic, unknown version, truncation or a
checksum mismatch each end in one :class:`~qft.errors.UserError` line.

The header is validated before the decoder allocates anything: the image size lies within
:data:`MAX_SIDE` and :data:`MAX_PIXELS`, the step within :data:`STEP_RANGE` (the tables the
decoder rebuilds from it stay small). The image size is also folded into the ``tables``
check: the latent only fixes the size to a 64-pixel block, so without it a height changed
within its block (with a forged file checksum) would decode to an image of the wrong size.
The y stream of hyperprior models is moreover *sealed* with the header (:meth:`Header.seal`:
the rANS coder starts from a state that carries the header's CRC-32, and the decoder checks
that it ends there), so even a header forged with every check recomputed fails to decode
instead of describing the payload wrongly. Format 1 (before the size checks and the seal)
is refused with a message naming it. Format 3 added TCQ's plain rows
(:attr:`trellis.Quantizer.plain_rows`) in the quantizer byte's upper five bits; format 2
streams (where they are 0) are still read.
"""

from __future__ import annotations

import struct
import zlib

from dataclasses import dataclass, field

from trellis import METHODS, RESETS

from qft.errors import UserError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "MAX_SIDE",
    "MAX_PIXELS",
    "STEP_RANGE",
    "Header",
    "Container",
    "check_image_size",
    "check_step",
    "varint",
    "with_checksum",
]

MAGIC = b"\x89Q"
FORMAT_VERSION = 3
#: Formats this qft reads (2: before plain rows, which it lacks).
READ_VERSIONS = (2, 3)
#: Largest image side and pixel count qft codes (67 MP: ≈ 6 GB to code at ≈ 70 MB per MP
#: above a 1 GB process; docs/design.md, "Hostile streams" and "Tiled transforms").
MAX_SIDE = 1 << 15
MAX_PIXELS = 1 << 26
#: Quantizer steps a stream may carry: below, the rebuilt rate tables grow as 1/step.
STEP_RANGE = (1 / 16, 1024.0)
_FIXED = struct.Struct("<B4sBdIII")  # version, checkpoint, quantizer, step, tables, height, width


@dataclass(frozen=True)
class Header:
    """What a decoder needs besides the sections."""

    checkpoint: bytes
    method: str
    reset: str
    step: float
    tables: int
    height: int
    width: int
    plain_rows: int = 0
    version: int = FORMAT_VERSION

    def fixed_bytes(self) -> bytes:
        """The fixed part of the header as written (version to width)."""
        quant = self.plain_rows << 3 | METHODS.index(self.method) << 1 | RESETS.index(self.reset)
        return _FIXED.pack(self.version, self.checkpoint[:4], quant, self.step, self.tables, self.height, self.width)

    def seal(self) -> int:
        """CRC-32 of :meth:`fixed_bytes`: the rANS coder's seal of the y stream
        (:func:`trellis.rans.encode`), which binds the payload to this header."""
        return zlib.crc32(self.fixed_bytes())


def check_image_size(height: int, width: int, name: str = "image", advice: str = "split the image") -> None:
    """Raises :class:`UserError` (``name``: what is wrong, then ``advice``) unless
    ``1 <= height, width <= MAX_SIDE`` and ``height * width <= MAX_PIXELS``."""
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE and height * width <= MAX_PIXELS):
        raise UserError(
            f"{name}: image size {width}×{height} outside what qft codes (1 to {MAX_SIDE} pixels a side, "
            f"{MAX_PIXELS / 1e6:.0f} MP in all); {advice}"
        )


def check_step(step: float, name: str = "quantizer", advice: str = "give a step in that range") -> None:
    """Raises :class:`UserError` unless ``step`` lies in :data:`STEP_RANGE`."""
    if not STEP_RANGE[0] <= step <= STEP_RANGE[1]:  # also refuses NaN
        raise UserError(f"{name}: step {step!r} outside {STEP_RANGE[0]:g}…{STEP_RANGE[1]:g}; {advice}")


def varint(n: int) -> bytes:
    """``n >= 0`` as an unsigned LEB128 varint (7 bits a byte, low first): a section length."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def with_checksum(body: bytes | bytearray) -> bytes:
    """A stream's ``body`` followed by its checksum: CRC-32 of ``body``, u32 little-endian."""
    body = bytes(body)
    return body + struct.pack("<I", zlib.crc32(body))


@dataclass
class Container:
    """A header plus a list of binary sections."""

    header: Header
    sections: list[bytes] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        parts = [MAGIC, self.header.fixed_bytes()]
        parts.append(bytes([len(self.sections)]))
        parts += [varint(len(s)) for s in self.sections]
        parts += [bytes(s) for s in self.sections]
        return with_checksum(b"".join(parts))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "stream") -> Container:
        """Parses and verifies a container. Raises :class:`UserError` when damaged."""
        if data[: len(MAGIC)] != MAGIC:
            raise UserError(f"{name}: not a qft bitstream (wrong magic bytes)")
        if len(data) < len(MAGIC) + _FIXED.size + 5:
            raise UserError(f"{name}: truncated qft bitstream")
        version = data[len(MAGIC)]
        if version not in READ_VERSIONS:
            old = " (written before the image size was checked against the tables)" if version == 1 else ""
            raise UserError(
                f"{name}: qft bitstream format {version}{old}, this qft reads formats "
                f"{', '.join(map(str, READ_VERSIONS))}; decode it with the qft that wrote it, or encode the image again"
            )
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise UserError(f"{name}: corrupted or truncated qft bitstream (checksum mismatch)")
        try:
            _, ckpt, quant, step, tables, height, width = _FIXED.unpack_from(body, len(MAGIC))
            if version == 2 and quant >> 3:
                raise ValueError("plain rows in a format 2 stream")
            header = Header(
                ckpt, METHODS[quant >> 1 & 3], RESETS[quant & 1], step, tables, height, width, quant >> 3, version
            )
            damaged = f"{name}: malformed qft bitstream header", "the stream is damaged"
            check_image_size(height, width, *damaged)
            check_step(step, *damaged)
            pos = len(MAGIC) + _FIXED.size
            count = body[pos]
            pos += 1
            lengths = []
            for _ in range(count):
                n = shift = 0
                while True:
                    byte = body[pos]
                    pos += 1
                    n |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                lengths.append(n)
            sections = []
            for n in lengths:
                sections.append(body[pos : pos + n])
                pos += n
            if pos != len(body):
                raise ValueError("section lengths do not add up")
        except (struct.error, IndexError, ValueError) as exc:
            raise UserError(f"{name}: malformed qft bitstream ({exc})") from None
        return cls(header, sections)
