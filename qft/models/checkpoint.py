"""Loading and saving model checkpoints of any registered architecture.

::

    file ─sha256─▶ torch.load(weights_only) ─▶ state_dict_of ─▶ arch given or detected
                                                   │                      │
      unwrap state_dict | network | model_state_dict | model       (N, M, …) from shapes
      strip module. / _orig_mod.  ·  legacy EB keys → matrices.i           │
      drop CDF tables  ·  floats → float32                                 ▼
                        LoadedCheckpoint ◀─ update(force=True) ◀─ build, check, load

Training-only modules (an auxiliary model of the loss, e.g. CCA's ``aux_entropymodel.*``)
are dropped by the explicit per-architecture list
:attr:`~qft.models.Architecture.training_only`, for the architecture tried; everything else
is checked strictly (``strict=False`` is never how a key goes missing).

Errors name what differs, in one line: a file that matches no architecture's key
signature names the closest architecture (fewest missing + unexpected key names) and its
first missing and unexpected keys; a tensor of the wrong shape names the key and both
shapes.

The CDF tables (``_quantized_cdf``, ``_offset``, ``_cdf_length``) and the
``GaussianConditional.scale_table`` are *derived* state: whatever the file holds (any
shape, stale after finetuning, or nothing) is dropped and rebuilt by
``update(force=True)``. Dropping them also sidesteps CompressAI's
``CompressionModel.load_state_dict``, which resizes these buffers from the incoming dict
and fails when they are absent; :func:`load_weights` loads through
``nn.Module.load_state_dict`` and does its own key and shape check instead.

Checkpoints written by qft (:func:`save_checkpoint`) are
``{"state_dict": ..., "arch": id, "params": {...}}`` of tensors and plain types, so they
load with ``weights_only=True``; the inner state_dict is complete (CDF tables included), so
plain CompressAI loads it with ``cls.from_state_dict``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import pickle
import pickletools
import re
import zipfile

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from torch import Tensor, nn

from qft.errors import UserError
from qft.files import atomic_write

from .registry import ARCHITECTURES, Architecture, forked_rng, get_architecture
from .zoo import base_of, resolve, shipped_entry

__all__ = [
    "LoadedCheckpoint",
    "WRAPPER_KEYS",
    "DERIVED_BUFFERS",
    "state_dict_of",
    "load_weights",
    "load_checkpoint",
    "save_checkpoint",
]

#: Keys under which training scripts store the state_dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "network", "model_state_dict", "model")

#: Buffer names rebuilt by ``update(force=True)``; dropped from every incoming state_dict.
DERIVED_BUFFERS = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")

#: Prefixes added by DataParallel/DistributedDataParallel and ``torch.compile``.
_PREFIXES = ("module.", "_orig_mod.")

#: Legacy EntropyBottleneck parameter names: ``_matrix0`` (CompressAI < 1.2.7) and
#: ``_matrices.0`` (ParameterList era, as renamed by ``compressai.zoo``) -> ``matrices.0``.
_LEGACY_EB = re.compile(r"(?:(?<=\.)|^)_(matrix|bias|factor|matrices\.|biases\.|factors\.)(\d+)$")
_EB_NAMES = {"matrix": "matrices", "bias": "biases", "factor": "factors"}

#: cheng2020's ``ResidualBlockWithStride.downsample`` (zoo weights) -> ``skip``; only at
#: ``g_a.<i>``, so that other models' own ``downsample`` modules are left alone.
_DOWNSAMPLE = re.compile(r"^(g_a\.\d+\.)downsample\.")


@dataclass
class LoadedCheckpoint:
    """A model loaded from a checkpoint file.

    Attributes:
        model: eval mode, float32, on the CPU, ``update(force=True)`` done.
        arch: registered architecture id.
        params: constructor parameters read from the shapes, e.g. ``{"N": 64, "M": 96}``.
        sha256: hex SHA-256 of the file's bytes.
        path: the file, as given.
        extra: non-tensor metadata stored beside the state_dict (e.g. ``"lambda"``),
            possibly ``{}``.
    """

    model: nn.Module
    arch: str
    params: dict
    sha256: str
    path: str
    extra: dict = field(default_factory=dict)


def _is_plain(value: Any) -> bool:
    """True for numbers, strings, None and lists/tuples/dicts of them (no tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _unwrap(obj: Any, name: str) -> tuple[Mapping[str, Any], dict]:
    """The state_dict inside ``obj`` and the plain metadata found beside it."""
    extra: dict = {}
    while isinstance(obj, Mapping):
        key = next(
            (k for k in WRAPPER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))),
            None,
        )
        if key is None:
            break
        extra.update({k: v for k, v in obj.items() if k != key and isinstance(k, str) and _is_plain(v)})
        obj = obj[key]
    if isinstance(obj, nn.Module):  # a whole pickled model (only with unsafe loading)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise UserError(f"{name} holds a {type(obj).__name__}, not a state_dict or a dict holding one")
    if not obj:
        raise UserError(f"{name} holds an empty state_dict")
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise UserError(
                f"{name} holds no state_dict: entry {k!r} is not a tensor "
                f"({type(v).__name__}); expected a state_dict, raw or under one of "
                f"{', '.join(WRAPPER_KEYS)}"
            )
    return obj, extra


def _strip_prefixes(keys: list[str]) -> list[str]:
    """Remove ``module.``/``_orig_mod.`` prefixes shared by all keys, in any nesting."""
    while True:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            return keys
        keys = [k[len(prefix) :] for k in keys]


def _rename(key: str) -> str:
    """Legacy key -> CompressAI 1.2.8 key."""
    key = _DOWNSAMPLE.sub(r"\1skip.", key)

    def eb(m: re.Match) -> str:
        legacy = m.group(1).rstrip(".")
        return f"{_EB_NAMES.get(legacy, legacy)}.{m.group(2)}"

    return _LEGACY_EB.sub(eb, key)


def _normalize(raw: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Prefixes stripped, legacy keys renamed, derived buffers dropped, floats to float32."""
    out: dict[str, Tensor] = {}
    for key, value in zip(_strip_prefixes([str(k) for k in raw]), raw.values()):
        key = _rename(key)
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        if key in out:
            raise UserError(f"{name} holds key {key!r} twice (once under a legacy name)")
        out[key] = value.float() if value.is_floating_point() else value
    return out


def state_dict_of(obj: Any, *, name: str = "checkpoint") -> dict[str, Tensor]:
    """The model state_dict held by a loaded checkpoint object, in CompressAI 1.2.8 form.

    - unwraps ``obj["state_dict"]``, ``["network"]``, ``["model_state_dict"]`` or
      ``["model"]`` (repeatedly: a training dict may nest them), or a whole ``nn.Module``;
    - strips the ``module.`` (DataParallel) and ``_orig_mod.`` (``torch.compile``) prefixes
      when every key carries them;
    - renames legacy EntropyBottleneck keys (``_matrix0``, ``_biases.0``, …) to
      ``matrices.0``, ``biases.0``, … and cheng2020's ``g_a.<i>.downsample`` to ``skip``;
    - drops the derived buffers :data:`DERIVED_BUFFERS` (rebuilt by ``update(force=True)``);
    - casts floating-point tensors (fp16, bf16, fp64) to float32.

    Load the result with :func:`load_weights`: CompressAI's ``load_state_dict`` expects the
    CDF buffers.

    Args:
        obj: what ``torch.load`` returned.
        name: how to name the checkpoint in error messages (its path).

    Raises:
        UserError: ``obj`` holds no state_dict.
    """
    return _normalize(_unwrap(obj, name)[0], name)


def _first(keys: list[str]) -> str:
    return repr(keys[0]) + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def _layout(model: nn.Module) -> tuple[dict[str, torch.Size], frozenset[str]]:
    """The shapes of ``model``'s state_dict (derived buffers left out) and which of its
    keys are buffers."""
    expected = {k: v.shape for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS}
    return expected, frozenset(k for k, _ in model.named_buffers())


@functools.cache
def _default_layout(arch: str) -> tuple[dict[str, torch.Size], frozenset[str]]:
    """:func:`_layout` of architecture ``arch`` at its default parameters (built once)."""
    with forked_rng():
        return _layout(get_architecture(arch).build())


def _key_problems(
    expected: Mapping[str, torch.Size], buffers: frozenset[str], state_dict: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing, unexpected, and present-with-another-shape keys of ``state_dict``.

    Parameters must all be present; buffers other than the derived ones are constants of
    the constructor (GDN bounds, context masks, lower bounds) and may be absent, in which
    case the model keeps its own values.
    """
    missing = [k for k in expected if k not in state_dict and k not in buffers]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k]]
    return missing, unexpected, mismatched


def _describe(missing: list[str], unexpected: list[str]) -> list[str]:
    problems = []
    if missing:
        problems.append(f"missing key {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected key {_first(unexpected)}")
    return problems


def _differences(model: nn.Module, state_dict: Mapping[str, Tensor], *, shapes: bool = True) -> tuple[int, str]:
    """How ``state_dict`` fails to fit ``model``: the number of differing keys and, in a
    few words, the first missing and unexpected keys and the first shape mismatch, naming
    the key and both shapes (``(0, "")`` if it fits; shapes are not compared when
    ``shapes`` is false). Buffers may be absent (:func:`_key_problems`).
    """
    expected, buffers = _layout(model)
    missing, unexpected, mismatched = _key_problems(expected, buffers, state_dict)
    if not shapes:
        mismatched = []
    problems = _describe(missing, unexpected)
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        problems.append(f"{k!r} has shape {tuple(state_dict[k].shape)}, the model {tuple(expected[k])}{more}")
    return len(missing) + len(unexpected) + len(mismatched), ", ".join(problems)


def load_weights(model: nn.Module, obj: Any, *, name: str = "checkpoint", arch: str | None = None) -> nn.Module:
    """Load the state_dict held by ``obj`` into ``model`` and rebuild its CDF tables.

    ``obj`` is anything :func:`state_dict_of` accepts (a loaded checkpoint, a state_dict of
    any layout, or its output). With ``arch``, the keys of that architecture's
    :attr:`~qft.models.Architecture.training_only` modules are dropped first. Every
    parameter of ``model`` must be present with its shape and no key may be left over;
    absent constant buffers keep the model's values. Then ``update(force=True)``.

    Raises:
        UserError: the state_dict does not fit the model; the message names the first
            missing and unexpected keys and the first shape mismatch.
    """
    state_dict = state_dict_of(obj, name=name)
    if arch is not None:
        state_dict = get_architecture(arch).drop_training_only(state_dict)
    count, problems = _differences(model, state_dict)
    if count:
        raise UserError(f"{name} does not fit the model: {problems}")
    _load(model, state_dict)
    return model


def _load(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a checked :func:`state_dict_of` dict, then rebuild the CDF tables."""
    # nn.Module's loader, not CompressAI's: the incoming dict holds no CDF buffers
    nn.Module.load_state_dict(model, state_dict, strict=False)
    model.update(force=True)


@dataclass
class _Fit:
    """How a state_dict fits one architecture."""

    arch: str
    model: nn.Module | None  # built at the parameters read from the shapes, if it fits
    params: dict
    count: int  # differing keys, 0 if it fits
    problems: str  # what differs, in a few words
    state_dict: dict[str, Tensor]  # what is loaded: training-only keys dropped


def _fit(arch: Architecture, state_dict: Mapping[str, Tensor]) -> _Fit:
    """Build ``arch`` at the parameters read from ``state_dict`` and compare (after
    dropping the architecture's training-only keys)."""
    state_dict = arch.drop_training_only(state_dict)
    try:
        params = arch.resolve_params(arch.infer_params(state_dict))
    except (KeyError, IndexError):
        # Parameters unreadable: compare the key names with those of the default model.
        count, problems = _name_differences(arch, state_dict)
        return _Fit(
            arch.name,
            None,
            {},
            max(count, 1),
            problems or "parameters cannot be read from the shapes",
            state_dict,
        )
    except UserError as exc:
        return _Fit(
            arch.name,
            None,
            {},
            len(state_dict),
            f"parameters read from the shapes are invalid ({exc})",
            state_dict,
        )
    with forked_rng():
        model = arch.build(params)
    count, problems = _differences(model, state_dict)
    return _Fit(arch.name, model if count == 0 else None, params, count, problems, state_dict)


def _name_differences(arch: Architecture, state_dict: Mapping[str, Tensor]) -> tuple[int, str]:
    """How the key names of ``state_dict`` (training-only keys dropped) differ from those
    of ``arch`` at its default parameters: the number of missing and unexpected keys and
    the first of each, in a few words."""
    expected, buffers = _default_layout(arch.name)
    missing, unexpected, _ = _key_problems(expected, buffers, arch.drop_training_only(state_dict))
    return len(missing) + len(unexpected), ", ".join(_describe(missing, unexpected))


def _select(state_dict: Mapping[str, Tensor], arch: str | None, name: str) -> _Fit:
    """The architecture of ``state_dict``, given (checked) or detected, with a model built
    for it.

    Detection: the candidates are the architectures whose key signature the state_dict
    matches; each is built at the parameters read from the shapes and compared, key names
    and shapes. Exactly one must fit.
    """
    if arch is not None:
        fit = _fit(get_architecture(arch), state_dict)
        if fit.model is None:
            raise UserError(f"{name} is not a {arch} checkpoint: {fit.problems}")
        return fit
    keys = set(state_dict)
    candidates = [a for a in ARCHITECTURES.values() if a.is_candidate(keys)]
    if not candidates:
        scores = [(_name_differences(a, state_dict), a.name) for a in ARCHITECTURES.values()]
        (_, problems), closest = min(scores, key=lambda s: s[0][0])
        raise UserError(
            f"{name} matches no registered architecture; the closest is {closest}: {problems} "
            "(`qft models` lists the architectures; --arch ID compares with another)"
        )
    fits = sorted((_fit(a, state_dict) for a in candidates), key=lambda f: f.count)
    exact = [f for f in fits if f.model is not None]
    if len(exact) == 1:
        return exact[0]
    if exact:
        raise UserError(f"{name}: ambiguous architecture, fits {', '.join(f.arch for f in exact)}; pass --arch")
    if len(fits) == 1:
        raise UserError(f"{name} looks like a {fits[0].arch} checkpoint but is not one: {fits[0].problems}")
    closest = "; ".join(f"{f.arch} ({f.problems})" for f in fits)
    raise UserError(
        f"{name}: ambiguous architecture, fits none of the candidates exactly, closest first: {closest}; pass --arch"
    )


#: First bytes of torch's zip format and of a (legacy torch) pickle.
_MAGIC = (b"PK\x03\x04", b"\x80")
#: Globals of tensors and plain containers in a torch pickle (the first other one is named).
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def _pickle_globals(data: bytes) -> list[str] | None:
    """The globals (``module.name``) a torch checkpoint's pickle refers to, read with
    :mod:`pickletools` (nothing is imported or executed); ``None`` when the pickle does
    not parse (a damaged file). Zip format: ``*/data.pkl``; legacy format: its first four
    pickles (magic, protocol, system info, the object)."""
    try:
        if data.startswith(b"PK\x03\x04"):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
                streams, count = io.BytesIO(z.read(pkl)), 1
        else:
            streams, count = io.BytesIO(data), 4
        names, strings = [], []
        for _ in range(count):
            for op, arg, _ in pickletools.genops(streams):
                if op.name == "GLOBAL":
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        return names
    except Exception:  # any parse failure (zip, pickle opcodes, missing member) is damage
        return None


def _read(path: Path, unsafe_load: bool) -> tuple[Any, str]:
    """``torch.load`` the file (CPU, ``weights_only`` unless ``unsafe_load``) and hash it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a directory, not a file") from None
    except OSError as exc:
        raise UserError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    if not data:
        raise UserError(f"checkpoint {path} is empty")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError:
        # weights-only loading refuses a global it does not allow with this type, and a
        # damaged pickle with the same type: a pickle that parses names Python objects
        names = _pickle_globals(data)
        if names is None and data.startswith(_MAGIC):
            raise UserError(f"checkpoint {path} is truncated or corrupt (UnpicklingError)") from None
        if names is None:
            raise UserError(f"{path} is not a PyTorch checkpoint") from None
        foreign = [n for n in names if not n.startswith(_PLAIN_GLOBALS)] or names or ["?"]
        raise UserError(
            f"{path} holds Python objects, not only tensors (e.g. {foreign[0]}), refused by safe "
            "loading; if you trust the file, pass --unsafe-load"
        ) from None
    except Exception as exc:  # torch.load raises many types: classify by content
        if data.startswith(_MAGIC):
            raise UserError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})") from None
        raise UserError(f"{path} is not a PyTorch checkpoint") from None
    return obj, sha256


def _complete_delta(path: Path, delta: dict[str, Tensor], extra: dict, unsafe_load: bool) -> dict[str, Tensor]:
    """The full state_dict of a delta checkpoint (:mod:`qft.models.zoo`): its base's,
    with the delta's tensors in place."""
    base_path = base_of(path, str(extra["delta_of"]))
    obj, base_sha = _read(base_path, unsafe_load)
    if base_sha != extra.get("base_sha256"):
        raise UserError(
            f"{path} was finetuned from another {base_path.name} "
            f"(SHA-256 {str(extra.get('base_sha256'))[:12]}…, found {base_sha[:12]}…)"
        )
    base = _normalize(_unwrap(obj, str(base_path))[0], str(base_path))
    unknown = sorted(set(delta) - set(base))
    if unknown:
        raise UserError(f"{path}: tensor {_first(unknown)} is not in its base {base_path.name}")
    return {**base, **delta}


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, *, unsafe_load: bool = False) -> LoadedCheckpoint:
    """Load a model checkpoint of any registered architecture, in any common layout.

    Args:
        path: the file (``torch.save`` output: zip or legacy format), or the name of a
            shipped model (:mod:`qft.models.zoo`); a finetuned delta is completed from
            its base.
        arch: registered id; ``None`` detects it from the key signature and shapes.
        unsafe_load: allow arbitrary pickled Python objects (``weights_only=False``). Only
            for trusted files: unpickling can execute code.

    Returns:
        the model (eval, CPU, float32, ``update(force=True)`` done), its id and parameters,
        the file's SHA-256 and the plain metadata beside the state_dict (a shipped base
        model, a bare state_dict, gets its manifest ``lambda`` there).

    Raises:
        UserError: missing, empty, truncated or non-checkpoint file; pickle payload refused;
            no state_dict inside; unknown architecture; state_dict not of ``arch`` (the
            message names the first missing and unexpected keys); architecture not
            detectable (the message lists the candidates).
    """
    name = str(path)
    if arch is not None:
        get_architecture(arch)  # unknown id: fail before reading the file
    path = resolve(path)
    obj, sha256 = _read(path, unsafe_load)
    raw, extra = _unwrap(obj, name)
    entry = shipped_entry(path)
    if entry is not None and "lambda" not in extra:  # shipped bases are plain state_dicts
        extra["lambda"] = entry["lambda"]
    state_dict = _normalize(raw, name)
    if "delta_of" in extra:
        state_dict = _complete_delta(path, state_dict, extra, unsafe_load)
    fit = _select(state_dict, arch, name)
    _load(fit.model, fit.state_dict)
    return LoadedCheckpoint(
        model=fit.model.eval(),
        arch=fit.arch,
        params=fit.params,
        sha256=sha256,
        path=name,
        extra=extra,
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    arch: str,
    params: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
    force: bool = False,
) -> str:
    """Write ``{"state_dict", "arch", "params", **extra}`` atomically; return its SHA-256.

    The state_dict is the model's (after ``update(force=True)``, so CompressAI's
    ``from_state_dict`` loads it), moved to the CPU. ``extra`` must hold plain values
    (numbers, strings, lists, dicts) so the file loads with ``weights_only=True``.

    Raises:
        UserError: ``path`` exists and ``force`` is false; ``arch`` unknown.
    """
    get_architecture(arch)
    extra = dict(extra or {})
    if not _is_plain(extra) or set(extra) & {"state_dict", "arch", "params"}:
        raise ValueError("extra must hold plain values under keys other than state_dict, arch, params")
    path = Path(path)
    if path.exists() and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    model.update(force=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {"state_dict": state_dict, "arch": arch, "params": dict(params), **extra}
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()
