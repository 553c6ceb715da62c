"""``qft models``: list the registered architectures, or the shipped checkpoints.

::

    qft models            # table: id, entropy model, CompressAI class, default parameters
    qft models --shipped  # the checkpoints every ``-m`` takes by name: λ, what was trained, size
    qft models --json     # either as a JSON list
"""

from __future__ import annotations

import argparse
import json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shipped",
        action="store_true",
        help="list the shipped checkpoints (usable by name wherever -m takes a file)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def _value(v: object) -> str:
    return "auto" if v is None else str(v).replace(" ", "")


def _print_table(table: list[tuple[str, ...]]) -> None:
    """Left-aligned columns; the last one unpadded."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


def _trained(entry: dict) -> str:
    """What a manifest entry is: a reference model, or its finetuning (stage by stage)."""
    from qft.models.zoo import is_finetuned

    if not is_finetuned(entry):  # a continued model counts the steps of the files it replaced
        return f"reference model, {entry.get('total_steps', entry['steps']):,} training steps"
    stages = entry.get("stages", [entry])
    done = ", then ".join(
        f"{st['steps']} steps " + ("noise proxy" if st["control"] else f"on {st['quantizer']['method']} latents")
        for st in stages
    )
    return f"{entry['parts']} finetuned: {done} (from {entry['finetuned_from']})"


def _shipped(as_json: bool) -> int:
    from qft.models.zoo import shipped

    rows = [
        {
            "name": e["name"],
            "arch": e["arch"],
            "lambda": e["lambda"],
            "trained": _trained(e),
            "bytes": e["bytes"],
        }
        for e in shipped()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("name", "arch", "λ", "MB", "what")]
    table += [(r["name"], r["arch"], f"{r['lambda']:g}", f"{r['bytes'] / 1e6:.2f}", r["trained"]) for r in rows]
    _print_table(table)
    return 0


def run(args: argparse.Namespace) -> int:
    from qft.models import ARCHITECTURES

    if args.shipped:
        return _shipped(args.json)
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
    _print_table(table)
    return 0
