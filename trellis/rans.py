"""rANS coder for the latent indices, bit-compatible with CompressAI's ``RansEncoder``.

The **probability model** is a set of table rows (:class:`trellis.tables.RateTable`:
``cdf``, ``cdf_length``, ``offset``) and a **row selector**: a small finite-state machine
that picks the row of each symbol from its scale row and the current context state, and
moves to the next state by the parity of the decoded index. USQ and RDOQ use the trivial
one-state selector; TCQ the 4- or 8-state machine, its quantizer class choosing the
``Q0`` or ``Q1`` rows. The **coder** only ever sees rows and symbols.

Stream format (identical to CompressAI 1.2.8 ``compressai.ans``): 64-bit rANS state,
32-bit renormalisation, 16-bit precision, words written little-endian; a symbol outside its
row is coded as the row's tail symbol followed by 4-bit bypass symbols (the count of
nibbles, in chunks of 15, then the nibbles of ``raw = -2v - 1`` below the row or
``raw = 2(v - max)`` above it). Streams produced here decode with CompressAI's
``RansDecoder.decode_with_indexes`` and vice versa (tested).

Decoding runs chain by chain (state 0 at the start of each chain), so for TCQ the state
machine is tracked inside the decoding loop at Numba speed; TCQ's plain elements (scale
rows below ``plain_rows``) take the plain class's row and leave the state as it is. A
corrupted stream (reads past its end, an impossible escape, a final state or position that
does not match) raises :class:`CorruptStreamError`; it never hangs or crashes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from numba import njit

__all__ = ["CorruptStreamError", "StreamDecoder", "encode", "decode"]

_PRECISION = 16
_BYPASS = 4
_MAX_BYPASS = (1 << _BYPASS) - 1
_RANS_L = np.uint64(1 << 31)
# Decoder status codes.
_OK, _ERR_EOF, _ERR_ESCAPE, _ERR_END = 0, 1, 2, 3
_MESSAGES = {
    _ERR_EOF: "the stream ends too early",
    _ERR_ESCAPE: "an escape code is out of range",
    _ERR_END: "the stream does not end where its last symbol does, or its seal does not match (another header?)",
}


class CorruptStreamError(ValueError):
    """A stream cannot be decoded: it is corrupted or truncated."""


@njit(cache=True, nogil=True)
def _encode(symbols, rows, cdf, cdf_length, offset, x0):  # pragma: no cover
    n = symbols.shape[0]
    # Upper bound on the number of words: one per coded symbol + the final state.
    count = 2
    for i in range(n):
        r = rows[i]
        v = symbols[i] - offset[r]
        mx = cdf_length[r] - 2
        count += 1
        if v < 0 or v >= mx:
            raw = -2 * v - 1 if v < 0 else 2 * (v - mx)
            nb = 0
            while (raw >> (_BYPASS * nb)) != 0:
                nb += 1
            count += nb // _MAX_BYPASS + 1 + nb
    out = np.empty(count, dtype=np.uint32)
    ptr = count
    x = x0
    for i in range(n - 1, -1, -1):
        r = rows[i]
        v = symbols[i] - offset[r]
        mx = cdf_length[r] - 2
        if v < 0 or v >= mx:
            raw = -2 * v - 1 if v < 0 else 2 * (v - mx)
            nb = 0
            while (raw >> (_BYPASS * nb)) != 0:
                nb += 1
            # Forward order: tail symbol, n in chunks of 15, then the nibbles; push reversed.
            for j in range(nb - 1, -1, -1):
                x, ptr = _put_bits(x, out, ptr, (raw >> (j * _BYPASS)) & _MAX_BYPASS)
            x, ptr = _put_bits(x, out, ptr, nb % _MAX_BYPASS)
            for _ in range(nb // _MAX_BYPASS):
                x, ptr = _put_bits(x, out, ptr, _MAX_BYPASS)
            v = mx
        start = np.uint64(cdf[r, v])
        freq = np.uint64(cdf[r, v + 1] - cdf[r, v])
        x_max = ((_RANS_L >> np.uint64(_PRECISION)) << np.uint64(32)) * freq
        if x >= x_max:
            ptr -= 1
            out[ptr] = np.uint32(x & np.uint64(0xFFFFFFFF))
            x >>= np.uint64(32)
        x = ((x // freq) << np.uint64(_PRECISION)) + (x % freq) + start
    out[ptr - 2] = np.uint32(x & np.uint64(0xFFFFFFFF))
    out[ptr - 1] = np.uint32(x >> np.uint64(32))
    return out[ptr - 2 :]


@njit(cache=True, nogil=True, inline="always")
def _put_bits(x, out, ptr, val):  # pragma: no cover
    freq = np.uint64(1 << (_PRECISION - _BYPASS))
    x_max = ((_RANS_L >> np.uint64(_PRECISION)) << np.uint64(32)) * freq
    if x >= x_max:
        ptr -= 1
        out[ptr] = np.uint32(x & np.uint64(0xFFFFFFFF))
        x >>= np.uint64(32)
    return (x << np.uint64(_BYPASS)) | np.uint64(val), ptr


@njit(cache=True, nogil=True, inline="always")
def _get_bits(x, words, ptr):  # pragma: no cover
    """Returns (value, x, ptr, ok)."""
    val = np.int64(x & np.uint64(_MAX_BYPASS))
    x >>= np.uint64(_BYPASS)
    if x < _RANS_L:
        if ptr >= words.shape[0]:
            return val, x, ptr, False
        x = (x << np.uint64(32)) | np.uint64(words[ptr])
        ptr += 1
    return val, x, ptr, True


@njit(cache=True, nogil=True)
def _decode(
    words,
    x,
    ptr,
    scale_rows,
    chain_length,
    next_state,
    state_class,
    num_scales,
    cdf,
    cdf_length,
    offset,
    plain_rows,
    plain_class,
    out,
):  # pragma: no cover
    """Decodes ``out.size`` symbols from coder state ``x`` at word ``ptr``; returns
    ``(status, x, ptr)``."""
    n = scale_rows.shape[0]
    mask = np.uint64((1 << _PRECISION) - 1)
    s = 0
    for i in range(n):
        if i % chain_length == 0:
            s = 0
        plain = scale_rows[i] < plain_rows
        r = (plain_class if plain else state_class[s]) * num_scales + scale_rows[i]
        length = cdf_length[r]
        cum = np.int64(x & mask)
        lo = 0  # binary search: last position with cdf <= cum
        hi = length - 1
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if cdf[r, mid] <= cum:
                lo = mid
            else:
                hi = mid
        start = np.uint64(cdf[r, lo])
        freq = np.uint64(cdf[r, lo + 1]) - start
        x = freq * (x >> np.uint64(_PRECISION)) + (x & mask) - start
        if x < _RANS_L:
            if ptr >= words.shape[0]:
                return _ERR_EOF, x, ptr
            x = (x << np.uint64(32)) | np.uint64(words[ptr])
            ptr += 1
        v = np.int64(lo)
        mx = length - 2
        if v == mx:
            val, x, ptr, ok = _get_bits(x, words, ptr)
            if not ok:
                return _ERR_EOF, x, ptr
            nb = val
            while val == _MAX_BYPASS:
                val, x, ptr, ok = _get_bits(x, words, ptr)
                if not ok:
                    return _ERR_EOF, x, ptr
                nb += val
                if nb > 8:
                    return _ERR_ESCAPE, x, ptr
            if nb > 8:  # raw values of int32 indices fit in 32 bits: at most 8 nibbles
                return _ERR_ESCAPE, x, ptr
            raw = np.int64(0)
            for j in range(nb):
                val, x, ptr, ok = _get_bits(x, words, ptr)
                if not ok:
                    return _ERR_EOF, x, ptr
                raw |= val << (j * _BYPASS)
            v = raw >> 1
            v = -v - 1 if raw & 1 else v + mx
        k = v + offset[r]
        out[i] = k
        if not plain:
            s = next_state[s, k & 1]
    return _OK, x, ptr


def _initial_state(seal: int) -> np.uint64:
    if not 0 <= seal < 1 << 32:
        raise ValueError(f"seal must be a 32-bit unsigned integer, got {seal!r}")
    return np.uint64(int(_RANS_L) + seal)


def encode(
    symbols: np.ndarray, rows: np.ndarray, cdf: np.ndarray, cdf_length: np.ndarray, offset: np.ndarray, seal: int = 0
) -> bytes:
    """Codes ``symbols[i]`` with table row ``rows[i]`` (flat arrays, in decoding order).

    ``seal``: a 32-bit value the stream carries in the coder's initial state (``L + seal``
    instead of CompressAI's ``L``; 0: CompressAI's stream), which :func:`decode` checks:
    a stream can be bound to data sent elsewhere (a header) and to its own symbols (a
    checksum of them: the final-state check alone misses changes of bypass bits, which
    rANS passes through without mixing them into the state), at no cost in size.
    CompressAI's decoder ignores the final state and decodes sealed streams too.
    """
    symbols = np.ascontiguousarray(symbols, dtype=np.int64).reshape(-1)
    rows = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
    if symbols.shape != rows.shape:
        raise ValueError(f"symbols ({symbols.size}) and rows ({rows.size}) differ in size")
    return _encode(symbols, rows, cdf, cdf_length, offset, _initial_state(seal)).astype("<u4").tobytes()


class StreamDecoder:
    """Decodes one stream in segments, each with its own table rows and chain layout.

    A latent coded in several steps (channel slices, checkerboard halves) is one stream,
    as in the official implementations, but the decoder learns the scale rows of a step
    only after decoding the earlier ones. :meth:`decode` continues where the previous
    segment stopped; :meth:`finish` checks that the stream ends exactly there, in the
    encoder's sealed state. :func:`decode` is the one-segment case.

    Args:
        data: the stream (:func:`encode`'s output).
        name: the stream's name in error messages.

    Raises:
        CorruptStreamError: (from any method) a damaged or truncated stream.
    """

    def __init__(self, data: bytes, name: str = "y stream"):
        self.name = name
        if len(data) % 4:
            raise CorruptStreamError(f"{name}: length is not a multiple of 4 bytes (truncated?)")
        self._words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        if self._words.size < 2:
            raise CorruptStreamError(f"{name}: {_MESSAGES[_ERR_EOF]}")
        self._x = np.uint64(self._words[0]) | (np.uint64(self._words[1]) << np.uint64(32))
        self._ptr = 2
        self._symbols: list[np.ndarray] = []

    def decode(
        self,
        scale_rows: np.ndarray,
        chain_length: int,
        next_state: np.ndarray,
        state_class: np.ndarray,
        num_scales: int,
        cdf: np.ndarray,
        cdf_length: np.ndarray,
        offset: np.ndarray,
        plain_rows: int = 0,
        plain_class: int = 0,
    ) -> np.ndarray:
        """The next ``scale_rows.size`` symbols (``int32``, flat); arguments as :func:`decode`'s."""
        scale_rows = np.ascontiguousarray(scale_rows, dtype=np.int64).reshape(-1)
        out = np.empty(scale_rows.size, dtype=np.int32)
        status, self._x, self._ptr = _decode(
            self._words,
            self._x,
            self._ptr,
            scale_rows,
            max(int(chain_length), 1),
            next_state,
            state_class,
            num_scales,
            cdf,
            cdf_length,
            offset,
            int(plain_rows),
            int(plain_class),
            out,
        )
        if status != _OK:
            raise CorruptStreamError(f"{self.name}: {_MESSAGES[status]}")
        self._symbols.append(out)
        return out

    def finish(self, seal: int | Callable[[np.ndarray], int] = 0) -> None:
        """Checks that the stream ends after the last decoded symbol, in the state sealed
        with ``seal`` (:func:`encode`), or the function of all decoded symbols (in
        decoding order) that gives it."""
        if callable(seal):
            seal = seal(np.concatenate(self._symbols) if self._symbols else np.zeros(0, np.int32))
        if self._ptr != self._words.size or self._x != _initial_state(seal):
            raise CorruptStreamError(f"{self.name}: {_MESSAGES[_ERR_END]}")


def decode(
    data: bytes,
    scale_rows: np.ndarray,
    chain_length: int,
    next_state: np.ndarray,
    state_class: np.ndarray,
    num_scales: int,
    cdf: np.ndarray,
    cdf_length: np.ndarray,
    offset: np.ndarray,
    name: str = "y stream",
    seal: int | Callable[[np.ndarray], int] = 0,
    plain_rows: int = 0,
    plain_class: int = 0,
) -> np.ndarray:
    """Decodes one symbol per entry of ``scale_rows`` (flat, decoding order): a whole
    stream in one segment (:class:`StreamDecoder`).

    Args:
        data: the stream.
        scale_rows: scale row (0…63) of each symbol.
        chain_length: the selector's state returns to 0 every ``chain_length`` symbols.
        next_state: ``int64[S, 2]`` successor by index parity (``[[0, 0]]`` for USQ).
        state_class: ``int64[S]`` row class of each state (``[0]`` for USQ).
        num_scales: rows per class (64).
        cdf, cdf_length, offset: the table rows.
        name: the stream's name in error messages.
        seal: the encoder's seal (:func:`encode`), or the function of the decoded symbols
            that gives it; the stream must end in that state.
        plain_rows, plain_class: symbols of scale rows below ``plain_rows`` are coded in
            class ``plain_class`` and leave the selector's state unchanged (TCQ's plain
            elements, :attr:`trellis.Quantizer.plain_rows`); 0: none.

    Returns:
        ``int32`` symbols. Raises :class:`CorruptStreamError` for a damaged stream.
    """
    dec = StreamDecoder(data, name)
    out = dec.decode(
        scale_rows, chain_length, next_state, state_class, num_scales, cdf, cdf_length, offset, plain_rows, plain_class
    )
    dec.finish(seal)
    return out
