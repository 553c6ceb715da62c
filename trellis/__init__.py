"""trellis: the quantization engine of qft (NumPy, Numba and SciPy only — never torch).

* :mod:`trellis.machines` — VVC 4-state and ECM 8-state dependent-quantization machines.
* :mod:`trellis.tables` — scale table, decision cells, 16-bit coding tables, table rates.
* :mod:`trellis.kernels` — Numba kernels; :mod:`trellis.reference` — their NumPy twins.
* :mod:`trellis.quantize` — the :class:`Quantizer` API (USQ, RDOQ, TCQ-4, TCQ-8).
* :mod:`trellis.rans` — rANS coder (CompressAI-compatible streams) with a state-driven
  row selector, so TCQ indices decode at Numba speed.
* :mod:`trellis.hardware` — the machine a measurement ran on.
* ``python -m trellis.bench`` — throughput benchmark (JSON).
"""

from trellis.machines import MACHINES, StateMachine, machine
from trellis.quantize import MAX_PLAIN_ROWS, METHODS, RESETS, Quantizer, QuantizeResult, scale_rows
from trellis.tables import NUM_SCALES, PLAIN_CLASS, SCALE_TABLE, RateTable, rate_table

__all__ = [
    "MACHINES",
    "MAX_PLAIN_ROWS",
    "METHODS",
    "NUM_SCALES",
    "PLAIN_CLASS",
    "RESETS",
    "SCALE_TABLE",
    "Quantizer",
    "QuantizeResult",
    "RateTable",
    "StateMachine",
    "machine",
    "rate_table",
    "scale_rows",
]
