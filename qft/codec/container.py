"""The ``.qft`` container: a self-describing, checksummed envelope for coded images.

Layout (all integers little-endian)::

    magic      4 bytes  b"\\x89QFT"
    version    u8       FORMAT_VERSION
    header     u32 length + UTF-8 JSON (architecture, checkpoint hash, quantizer and its
               parameters, table checksums, image size and padding, latent shapes)
    sections   u16 count, then per section u32 length + bytes (z strings, y stream, …)
    crc32      u32 over everything before it

A damaged file is refused before any entropy decoding: wrong magic, unknown version,
truncation or a checksum mismatch each end in one :class:`~qft.errors.UserError` line.
"""

from __future__ import annotations

import json
import struct
import zlib

from dataclasses import dataclass, field

from qft.errors import UserError

__all__ = ["MAGIC", "FORMAT_VERSION", "Container"]

MAGIC = b"\x89QFT"
FORMAT_VERSION = 1


@dataclass
class Container:
    """Header dict plus a list of binary sections."""

    header: dict
    sections: list[bytes] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        head = json.dumps(self.header, sort_keys=True, separators=(",", ":")).encode()
        parts = [MAGIC, struct.pack("<BI", FORMAT_VERSION, len(head)), head, struct.pack("<H", len(self.sections))]
        for s in self.sections:
            parts += [struct.pack("<I", len(s)), bytes(s)]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "stream") -> "Container":
        """Parses and verifies a container. Raises :class:`UserError` when damaged."""
        if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
            raise UserError(f"{name}: not a qft bitstream (wrong magic bytes)")
        if len(data) < len(MAGIC) + 9:
            raise UserError(f"{name}: truncated qft bitstream")
        version = data[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise UserError(f"{name}: qft bitstream format {version}, this qft reads format {FORMAT_VERSION}; use a matching qft")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise UserError(f"{name}: corrupted or truncated qft bitstream (checksum mismatch)")
        try:
            pos = len(MAGIC) + 1
            (hlen,) = struct.unpack_from("<I", body, pos)
            pos += 4
            header = json.loads(body[pos : pos + hlen].decode())
            pos += hlen
            (count,) = struct.unpack_from("<H", body, pos)
            pos += 2
            sections = []
            for _ in range(count):
                (n,) = struct.unpack_from("<I", body, pos)
                pos += 4
                if pos + n > len(body):
                    raise ValueError("section beyond end")
                sections.append(body[pos : pos + n])
                pos += n
            if pos != len(body) or not isinstance(header, dict):
                raise ValueError("trailing bytes")
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{name}: malformed qft bitstream ({exc})") from None
        return cls(header, sections)
