"""``qft models``: list the registered architectures.

::

    qft models            # table: id, entropy model, CompressAI class, default parameters
    qft models --json     # the same as a JSON list
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list instead of a table"
    )


def _value(v: object) -> str:
    return "auto" if v is None else str(v).replace(" ", "")


def run(args: argparse.Namespace) -> int:
    from qft.models import ARCHITECTURES

    rows = [
        {
            "id": a.name,
            "entropy": a.entropy,
            "class": f"{a.cls.__module__}.{a.cls.__qualname__}",
            "defaults": dict(a.defaults),
            "description": a.description,
        }
        for a in ARCHITECTURES.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("id", "entropy", "class", "parameters (defaults)", "description")]
    for r in rows:
        params = " ".join(f"{k}={_value(v)}" for k, v in r["defaults"].items())
        table.append(
            (
                r["id"],
                r["entropy"],
                r["class"].rsplit(".", 1)[-1],
                params,
                r["description"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0
