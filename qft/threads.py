"""CPU threads of torch and of the trellis's Numba kernels: one home for the reset.

Numba's parallel kernels run on the OpenMP threading layer, whose process-wide thread
count torch's CPU kernels share: the first parallel Numba call sets it to Numba's own
count, so a ``torch.set_num_threads`` made before it does not hold afterwards — the
decoder passes that follow run on another number of threads (slower on a shared machine)
and their float summation order, hence their last bits, can change. :func:`set_threads`
sets both counts; called again after a Numba kernel, it restores torch's.
"""

from __future__ import annotations

__all__ = ["set_threads"]


def set_threads(n: int, *, numba: bool = True) -> None:
    """Use ``n`` CPU threads in torch and (``numba``) in the Numba kernels, at most the
    threads Numba started with.

    ``numba=False`` leaves Numba's count as it is and restores torch's only: what a caller
    does after a Numba kernel when the kernels should keep all their threads.
    """
    import torch

    if numba:
        import numba as nb

        nb.set_num_threads(max(1, min(n, nb.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(n)
