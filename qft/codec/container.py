"""The ``.qft`` container: a compact, self-describing, checksummed envelope.

The header holds only what the decoder needs, so the file size is an honest rate (about
30 bytes above the entropy-coded payload; 0.0006 bpp on a Kodak image)::

    magic        2 bytes  b"\\x89Q"
    version      u8       FORMAT_VERSION
    checkpoint   4 bytes  first bytes of the model's weight fingerprint (SHA-256)
    quantizer    u8       method index (trellis.METHODS) << 1 | reset index
    step         f64      the quantizer's step (the tables are rebuilt from it)
    tables       u32      CRC-32 of the y and z coding tables the encoder used
    height,width u32, u32 image size (padding to a multiple of 64 is implied)
    sections     u8 count, then each section's length as a LEB128 varint, then the bytes
    crc32        u32      over everything before it

λ and the USQ rounding offset are encoder choices and are not transmitted. A damaged file
is refused before any entropy decoding: wrong magic, unknown version, truncation or a
checksum mismatch each end in one :class:`~qft.errors.UserError` line.
"""

from __future__ import annotations

import struct
import zlib

from dataclasses import dataclass, field

from trellis import METHODS, RESETS

from qft.errors import UserError

__all__ = ["MAGIC", "FORMAT_VERSION", "Header", "Container"]

MAGIC = b"\x89Q"
FORMAT_VERSION = 1
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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@dataclass
class Container:
    """A header plus a list of binary sections."""

    header: Header
    sections: list[bytes] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        h = self.header
        quant = METHODS.index(h.method) << 1 | RESETS.index(h.reset)
        parts = [MAGIC, _FIXED.pack(FORMAT_VERSION, h.checkpoint[:4], quant, h.step, h.tables, h.height, h.width)]
        parts.append(bytes([len(self.sections)]))
        parts += [_varint(len(s)) for s in self.sections]
        parts += [bytes(s) for s in self.sections]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "stream") -> "Container":
        """Parses and verifies a container. Raises :class:`UserError` when damaged."""
        if data[: len(MAGIC)] != MAGIC:
            raise UserError(f"{name}: not a qft bitstream (wrong magic bytes)")
        if len(data) < len(MAGIC) + _FIXED.size + 5:
            raise UserError(f"{name}: truncated qft bitstream")
        version = data[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise UserError(f"{name}: qft bitstream format {version}, this qft reads format {FORMAT_VERSION}; use a matching qft")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise UserError(f"{name}: corrupted or truncated qft bitstream (checksum mismatch)")
        try:
            _, ckpt, quant, step, tables, height, width = _FIXED.unpack_from(body, len(MAGIC))
            header = Header(ckpt, METHODS[quant >> 1], RESETS[quant & 1], step, tables, height, width)
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
