"""The C allocator's thresholds for tensors of large images: one home for the setting.

torch's CPU tensors come from the C library's ``malloc``. glibc serves a request above its
mmap threshold with a fresh ``mmap`` and returns it to the system when freed; the
threshold adapts to the largest block freed so far (up to 32 MiB), and free memory at the
top of the heap is returned above the trim threshold. The decoder target's tile loop
(:func:`qft.codec.latent.target_direction`) allocates and frees the same tens of MiB a few
hundred times per image; how often those blocks go back to the system and are faulted in
again then depends on the image's history in the process: on a 12 MP image 11.6 M page
faults and 28 s of system time per 59 s of user time, against 2.4 M and 5 s on a 6 MP one —
time per pixel 30–50 % higher for the larger image. Fixed thresholds (glibc's own upper
value of the adaptive one, 32 MiB, and a trim threshold of 256 MiB) take the faults out
(0.3 M, 0.7 s of system time; peak memory not higher), so time grows linearly with pixels
(``benchmarks/codec_scaling.py``; docs/design.md, "Scaling").

:func:`tune_allocator` sets them once per process; :class:`qft.codec.Codec` calls it. The
user's own settings win: nothing is changed when ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` is set, and outside glibc nothing is done.
"""

from __future__ import annotations

import ctypes
import os

from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "USER_SETTINGS", "tune_allocator"]

#: Requests of at least this size are mmapped (glibc's upper value of its adaptive threshold).
MMAP_THRESHOLD = 32 << 20
#: Free memory at the top of the heap beyond this is returned to the system.
TRIM_THRESHOLD = 256 << 20
#: ``mallopt`` parameter numbers (glibc's ``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: environment variables through which a user sets these thresholds themselves
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

#: None until the first attempt; then whether the thresholds are set
_tuned: bool | None = None


def tune_allocator(environ: Mapping[str, str] | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds (:data:`MMAP_THRESHOLD`,
    :data:`TRIM_THRESHOLD`) for the rest of the process, once.

    Args:
        environ: the environment to consult for the user's own settings
            (:data:`USER_SETTINGS`; default ``os.environ``).

    Returns:
        True when the thresholds are set (now or by an earlier call); False when the user
        set their own, or the C library is not glibc (nothing changed).
    """
    global _tuned
    if _tuned is not None:  # one attempt per process: the C library does not change
        return _tuned
    if any(k in (os.environ if environ is None else environ) for k in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols the process has loaded, the C library's among them
    except (OSError, TypeError):  # TypeError: Windows has no handle for the process itself
        libc = None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc only
        _tuned = False
        return _tuned
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _tuned
