"""Import directions (docs/architecture.md): every module under qft/ and trellis/ is parsed
(ast, nothing imported) and each of its imports — at the top or inside a function — is
checked against the layers, lowest first::

    trellis → qft.{errors,files,threads} → qft.models → qft.codec → qft.settings
    → qft.{eval,train,finetune,sensitivity} → qft.commands → qft.cli, qft.__main__

A module may import its own layer and the layers below, never one above; trellis never
imports torch; nothing outside qft/commands imports qft.commands; nothing imports the
benchmark scripts (nor ``trellis.bench``); no module imports another package's private (``_name``) module or name.
"""

from __future__ import annotations

import ast

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package (first two dotted parts under qft, first under trellis) -> layer, lowest first
LAYERS = {
    "trellis": 0,
    "qft.errors": 1,
    "qft.files": 1,
    "qft.threads": 1,
    "qft.allocator": 1,
    "qft.models": 2,
    "qft.codec": 3,
    "qft.settings": 4,
    "qft.eval": 5,
    "qft.train": 5,
    "qft.finetune": 5,
    "qft.sensitivity": 5,
    "qft.api": 6,  # the Python face of the commands (qft/api.py)
    "qft.commands": 6,
    "qft.cli": 7,
    "qft.__main__": 7,
    "qft": 7,  # qft/__init__.py
}
#: scripts run with ``python -m``, which no module imports
SCRIPTS = ("trellis.bench",)


def package_of(module: str) -> str:
    """``qft.codec.latent`` -> ``qft.codec``; ``trellis.rans`` -> ``trellis``; ``qft`` -> ``qft``."""
    parts = module.split(".")
    if parts[0] == "trellis":
        return "trellis"
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str], int]]:
    """``(imported module, imported names, line)`` of every import in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """What breaks the import rules in one module's source."""
    found = []
    own = package_of(module)
    layer = LAYERS.get(own)
    assert layer is not None, f"{module}: package {own} has no layer; add it to LAYERS and docs/architecture.md"
    for target, names, line in imports(ast.parse(source), module, is_package):
        where = f"{module}:{line} imports {target}"
        top = target.split(".")[0]
        if top == "benchmarks" or target in SCRIPTS or any(f"{target}.{n}" in SCRIPTS for n in names):
            found.append(f"{where}: the library imports no benchmark script")
        if own == "trellis" and top == "torch":
            found.append(f"{where}: trellis never imports torch")
        if top not in ("qft", "trellis"):
            continue
        other = package_of(target)
        if other == "qft.commands" and own != "qft.commands":
            found.append(f"{where}: only qft/commands imports qft.commands")
        if other in LAYERS and LAYERS[other] > layer:
            found.append(f"{where}: {own} (layer {layer}) imports the higher {other} (layer {LAYERS[other]})")
        if other != own:
            private = [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            private += [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{where}: private name(s) {private} of another package")
    return found


def sources():
    for folder in ("qft", "trellis"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield module_name(path), path


@pytest.mark.parametrize("module,path", list(sources()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_follow_the_layers(module, path):
    assert violations(module, path.read_text(), path.name == "__init__.py") == []


@pytest.mark.parametrize(
    "module,source,expected",
    [
        ("qft.codec.codec", "from qft.eval.report import x", "imports the higher qft.eval"),
        ("qft.models.zoo", "def f():\n    import qft.settings", "imports the higher qft.settings"),
        ("qft.finetune.loop", "from qft.commands._options import quantizer_from_args", "only qft/commands"),
        ("qft.eval.report", "from qft.train.loop import _Log", "private name(s) ['_Log']"),
        ("qft.eval.report", "from trellis._costs import cost", "private name(s) ['_costs']"),
        ("qft.eval.report", "from benchmarks.codec_speed import run", "no benchmark script"),
        ("qft.eval.report", "from trellis.bench import machine_info", "no benchmark script"),
        ("qft.eval.report", "from trellis import bench", "no benchmark script"),
        ("trellis.kernels", "import torch", "trellis never imports torch"),
        ("qft.models.zoo", "from ..codec import Codec", "imports the higher qft.codec"),
    ],
)
def test_the_checker_finds_each_kind_of_violation(module, source, expected):
    found = violations(module, source)
    assert any(expected in v for v in found), found


def test_the_checker_allows_the_rules():
    assert violations("qft.finetune.loop", "from qft.train.scaffold import RunLog\nfrom qft.codec import Codec") == []
    assert violations("qft.commands.eval", "from qft.commands._options import add_quantizer_arguments") == []
    assert violations("qft.models", "from .registry import _private", is_package=True) == []
