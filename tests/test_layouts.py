"""Registered architectures against the official state_dict layouts in ``shared/layouts``.

Each fixture (``<id>.json``) lists every state_dict key of an official implementation at
its released settings, with shape and dtype, and the layout of its release checkpoints
(top-level keys, legacy EntropyBottleneck names, training-only keys). For every fixture
in :data:`FIXTURES`:

- the model built at the parameters read from the fixture's shapes has exactly its keys,
  shapes and dtypes (CPU build: CompressAI's GDN creates its constant buffers with the
  legacy ``torch.Tensor`` constructor, which ignores a meta default device, so a meta
  build is impossible; one build per fixture costs 0.3–1.6 s);
- a synthetic release checkpoint (training dict, ``module.`` prefix, legacy names, the
  training-only keys), written from the fixture alone, loads strictly with the
  architecture detected and its parameters read back.

A new family adds one line to :data:`FIXTURES`. The fixtures live beside the repository
(``../shared/layouts``, as in CI, or beside any folder above it); without them the tests
are skipped and say why.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re

from pathlib import Path

import pytest
import torch

from qft.errors import UserError
from qft.models import ARCHITECTURES, DERIVED_BUFFERS, get_architecture, load_checkpoint

#: fixture id (``shared/layouts/<id>.json``) -> registered architecture id
FIXTURES = {
    "tcm-n64": "tcm",
    "tcm-n128": "tcm",
    "elic2022-official": "elic2022-official",
    "elic2022-chandelier": "elic2022-chandelier",
    "dcae": "dcae",
    "cca": "cca",
    "mlicpp": "mlicpp",
    "mlicpp-old": "mlicpp",
}

#: top-level keys of a training checkpoint when the fixture names none (CompressAI's
#: examples/train.py, which the official training scripts follow)
TRAINING_DICT = ("epoch", "state_dict", "loss", "optimizer", "aux_optimizer", "lr_scheduler")


def _layouts_dir() -> Path | None:
    """``shared/layouts`` beside the repository root or beside a folder above it (a git
    worktree may sit one level deeper than the checkout CI has)."""
    root = Path(__file__).resolve().parents[1]
    for folder in [root, *root.parents]:
        candidate = folder.parent / "shared" / "layouts"
        if candidate.is_dir():
            return candidate
    return None


LAYOUTS_DIR = _layouts_dir()


def fixture_of(fixture_id: str) -> dict:
    if LAYOUTS_DIR is None:
        pytest.skip("official layouts not found: no shared/layouts beside the repository or a folder above it")
    path = LAYOUTS_DIR / f"{fixture_id}.json"
    if not path.is_file():
        pytest.skip(f"official layout {path} not found")
    return json.loads(path.read_text())


def shapes_of(fixture: dict) -> dict[str, torch.Tensor]:
    """Zero tensors of the fixture's shapes and dtypes, as cheap expanded views."""
    return {
        k: torch.zeros(1, dtype=getattr(torch, fixture["key_dtypes"][k])).expand(shape)
        for k, shape in fixture["keys"].items()
    }


def infer(arch_id: str, fixture: dict) -> dict:
    arch = get_architecture(arch_id)
    return arch.resolve_params(arch.infer_params(shapes_of(fixture)))


def differences(state_dict: dict[str, torch.Tensor], fixture: dict, *, derived_shapes: bool = True) -> list[str]:
    """What differs between ``state_dict`` and the fixture: keys either side, shapes,
    dtypes (shapes of the derived CDF buffers only when ``derived_shapes``)."""
    expected = fixture["keys"]
    out = [f"missing {k}" for k in expected if k not in state_dict]
    out += [f"unexpected {k}" for k in state_dict if k not in expected]
    for k, v in state_dict.items():
        if k not in expected:
            continue
        derived = k.rsplit(".", 1)[-1] in DERIVED_BUFFERS
        if list(v.shape) != expected[k] and (derived_shapes or not derived):
            out.append(f"{k}: shape {list(v.shape)}, official {expected[k]}")
        if str(v.dtype).removeprefix("torch.") != fixture["key_dtypes"][k]:
            out.append(f"{k}: dtype {v.dtype}, official {fixture['key_dtypes'][k]}")
    return out


def release_checkpoint(fixture: dict, state_dict: dict[str, torch.Tensor] | None = None) -> dict:
    """A training checkpoint as the official scripts write it: the fixture's top-level
    keys, DataParallel's ``module.`` prefix, the legacy EntropyBottleneck names, and the
    training-only keys."""
    sd = dict(shapes_of(fixture) if state_dict is None else state_dict)
    legacy = fixture.get("legacy_key_aliases", {})
    assert legacy, "the fixture names legacy EntropyBottleneck keys"
    sd = {legacy.get(k, k): v for k, v in sd.items()}
    for k, shape in fixture.get("training_only_keys", {}).items():
        sd[k] = torch.zeros(1).expand(shape)
    sd = {f"module.{k}": v for k, v in sd.items()}
    adam = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
        "param_groups": [{"lr": 1e-4, "params": [0]}],
    }
    values = {
        "epoch": 41,
        "state_dict": sd,
        "loss": torch.tensor(0.73),
        "optimizer": adam,
        "aux_optimizer": adam,
        "lr_scheduler": {"milestones": collections.Counter([40, 45]), "last_epoch": 41, "gamma": 0.1},
    }
    keys = fixture.get("checkpoint_top_level_keys") or TRAINING_DICT
    return {k: values[k] for k in keys}


def test_fixture_architectures_registered():
    assert set(FIXTURES.values()) <= set(ARCHITECTURES)


@pytest.mark.parametrize("fixture_id", FIXTURES)
def test_layout(fixture_id):
    """The model built at the parameters read from the fixture's shapes has exactly the
    official keys, shapes and dtypes."""
    fixture = fixture_of(fixture_id)
    params = infer(FIXTURES[fixture_id], fixture)
    with torch.no_grad():
        model = get_architecture(FIXTURES[fixture_id]).build(params, seed=0)
    assert differences(model.state_dict(), fixture) == []
    for key, value in fixture["constructor_kwargs"].items():
        if key in params and value is not None:
            assert params[key] == value, key


@pytest.mark.parametrize("fixture_id", FIXTURES)
def test_release_checkpoint(fixture_id, tmp_path):
    """A release checkpoint loads strictly, its architecture detected, parameters read."""
    fixture = fixture_of(fixture_id)
    path = tmp_path / f"{fixture_id}.pth"
    torch.save(release_checkpoint(fixture), path)
    ckpt = load_checkpoint(path)
    assert ckpt.arch == FIXTURES[fixture_id]
    assert ckpt.params == infer(FIXTURES[fixture_id], fixture)
    assert ckpt.extra["epoch"] == 41
    assert differences(ckpt.model.state_dict(), fixture, derived_shapes=False) == []


class TestStrict:
    """The rules every family loads by, on the smallest release layout (TCM, N=64)."""

    FIXTURE = "tcm-n64"

    def _load(self, tmp_path, edit, arch=None):
        fixture = fixture_of(self.FIXTURE)
        sd = edit(shapes_of(fixture))
        torch.save(release_checkpoint(fixture, sd), tmp_path / "c.pth")
        return load_checkpoint(tmp_path / "c.pth", arch)

    def test_missing_key(self, tmp_path):
        def edit(sd):
            del sd["lrp_transforms.3.2.weight"]
            return sd

        with pytest.raises(
            UserError,
            match=r"^\S+ looks like a tcm checkpoint but is not one: missing key "
            r"'lrp_transforms.3.2.weight'$",
        ):
            self._load(tmp_path, edit)

    def test_wrong_shape_names_key_and_shapes(self, tmp_path):
        def edit(sd):
            sd["cc_scale_transforms.1.4.weight"] = torch.zeros(65, 128, 3, 3)
            return sd

        with pytest.raises(
            UserError,
            match=re.escape("'cc_scale_transforms.1.4.weight' has shape (65, 128, 3, 3), the model (64, 128, 3, 3)"),
        ):
            self._load(tmp_path, edit, "tcm")

    def test_unlisted_extra_key_refused(self, tmp_path):
        """Keys beyond the architecture's own are an error unless listed as training-only."""

        def edit(sd):
            sd["aux_entropymodel.y_entropy_bottleneck.quantiles"] = torch.zeros(4, 1, 3)
            return sd

        with pytest.raises(UserError, match=r"unexpected key 'aux_entropymodel.y_entropy_bottleneck.quantiles'$"):
            self._load(tmp_path, edit)

    def test_training_only_keys_dropped(self, tmp_path, monkeypatch):
        """The explicit per-architecture list drops exactly the keys under its prefixes."""
        listed = dataclasses.replace(ARCHITECTURES["tcm"], training_only=("aux_entropymodel.",))
        monkeypatch.setitem(ARCHITECTURES, "tcm", listed)

        def edit(sd):
            sd["aux_entropymodel.y_entropy_bottleneck.quantiles"] = torch.zeros(4, 1, 3)
            return sd

        assert self._load(tmp_path, edit).arch == "tcm"

        def edit_also_missing(sd):
            del sd["g_s.3.conv.bias"]
            return edit(sd)

        with pytest.raises(UserError, match=r"missing key 'g_s.3.conv.bias'$"):
            self._load(tmp_path, edit_also_missing)

    def test_training_only_prefixes_whole_modules(self):
        from qft.models import register_architecture

        with pytest.raises(ValueError, match='must end in "."'):
            register_architecture(dataclasses.replace(ARCHITECTURES["tcm"], name="x", training_only=("aux",)))
