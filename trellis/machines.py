"""Dependent-quantization state machines (VVC 4-state and ECM 8-state).

Both machines are driven by the packed transition constants of the JVET ECM reference
software (``g_stateTransTab`` in ``Rom.cpp``)::

    next(s, k) = (TABLE >> (4 * (2 * s + (k & 1)))) & 15

With ECM numbering the quantizer used in state ``s`` is ``s & 1``: even states use
``Q0`` (reconstruction levels ``2kΔ``), odd states ``Q1`` (levels ``(2k - sgn k)Δ``).
The 4-state machine is the VVC trellis with states 1 and 2 swapped (VVC numbers its
quantizer ``s >> 1`` and packs its table in the constant 32040).

Transitions depend only on the parity of the transmitted index ``k`` (``k & 1``, two's
complement, so ``-3 & 1 == 1``), never on the reconstruction value. Every chain starts in
state 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["StateMachine", "MACHINES", "ECM_TRANSITIONS", "VVC_TRANSITIONS", "machine"]

#: ECM ``g_stateTransTab`` for 4 and 8 states.
ECM_TRANSITIONS = {4: 587280912, 8: 6274468666787591456}

#: VVC's packed 4-state table: ``next = (32040 >> ((s << 2) + ((k & 1) << 1))) & 3``.
VVC_TRANSITIONS = 32040


@dataclass(frozen=True)
class StateMachine:
    """A dependent-quantization state machine.

    Attributes:
        num_states: number of states S (4 or 8).
        next_state: ``int64[S, 2]``; ``next_state[s, k & 1]`` is the successor of ``s``.
        quantizer: ``int64[S]``; the quantizer class (0 for Q0, 1 for Q1) used in state s.
    """

    num_states: int
    next_state: np.ndarray
    quantizer: np.ndarray

    @classmethod
    def from_packed(cls, num_states: int, table: int) -> StateMachine:
        """Unpacks an ECM-style transition constant (4 bits per successor)."""
        nxt = np.array(
            [[(table >> (4 * (2 * s + p))) & 15 for p in (0, 1)] for s in range(num_states)],
            dtype=np.int64,
        )
        if nxt.max() >= num_states:
            raise ValueError(f"table {table} does not describe a {num_states}-state machine")
        return cls(num_states, nxt, np.arange(num_states, dtype=np.int64) & 1)

    @property
    def predecessors(self) -> np.ndarray:
        """``int64[S, 2, 2]``: the two branches ``(s, parity)`` entering each state.

        Ordered by ``(s, parity)``, the order in which a forward (add-compare-select) pass
        meets them; ties between the two are resolved in favour of the first.
        """
        pred = np.empty((self.num_states, 2, 2), dtype=np.int64)
        for t in range(self.num_states):
            branches = [(s, p) for s in range(self.num_states) for p in (0, 1) if self.next_state[s, p] == t]
            if len(branches) != 2:
                raise ValueError(f"state {t} has {len(branches)} incoming branches, expected 2")
            pred[t] = branches
        return pred

    def states_of(self, indices: np.ndarray) -> np.ndarray:
        """States in which each index of one chain is coded (start state 0).

        Args:
            indices: 1-D integer array, the transmitted indices of one chain in coding order.

        Returns:
            ``uint8`` array of the same length; element i is the state *before* index i.
        """
        states = np.empty(len(indices), dtype=np.uint8)
        s = 0
        for i, k in enumerate(np.asarray(indices, dtype=np.int64)):
            states[i] = s
            s = self.next_state[s, k & 1]
        return states


#: The two machines qft offers, by number of states.
MACHINES = {s: StateMachine.from_packed(s, t) for s, t in ECM_TRANSITIONS.items()}


def machine(num_states: int) -> StateMachine:
    """Returns the 4-state (VVC) or 8-state (ECM) machine."""
    try:
        return MACHINES[num_states]
    except KeyError:
        raise ValueError(f"num_states must be 4 or 8, got {num_states!r}") from None
