"""DCAE and CCA: official layouts (full size, on the meta device), tiny-width forward and
USQ coding round trips.

The layout fixtures are ``shared/layouts/{dcae,cca}.json`` beside the repository (as in CI)
or beside a folder above it (a git worktree); those tests are skipped without them.
"""

from __future__ import annotations

import json
import re

from pathlib import Path

import pytest
import torch

from test_tcm import train_step  # sibling test module: the training-step check of every family

from trellis import Quantizer

from qft.cli import main
from qft.codec import Codec
from qft.errors import UserError
from qft.models import (
    ARCHITECTURES,
    create_model,
    load_checkpoint,
    save_checkpoint,
    state_dict_of,
)
from qft.models.cca import TRAINING_ONLY_KEYS, release_slices
from qft.models.layers import WindowAttention

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = next(
    (f.parent / "shared" / "layouts" for f in [ROOT, *ROOT.parents] if (f.parent / "shared" / "layouts").is_dir()),
    ROOT.parent / "shared" / "layouts",
)

#: tiny widths, every parameter explicit (what infer_params reads back)
TINY = {
    "dcae": {
        "N": 32,
        "M": 40,
        "num_slices": 5,
        "z_dim": 16,
        "feature_dim": [16, 16, 16],
        "block_num": [1, 1, 2],
        "head_dim": [8, 8, 8, 8, 8, 8],
        "dict_num": 8,
        "dict_head_num": 1,
        "cc_dim": [16, 16],
    },
    "cca": {
        "M": 24,
        "slices": [2, 4, 6, 6, 6],
        "ae_dim": [8, 8, 16],
        "ae_layers": [1, 1, 1],
        "em_dim": 8,
        "em_layers": 1,
        "z_dim": 8,
        "cc_dim": [8, 8],
    },
}


def fixture(arch: str) -> dict:
    path = LAYOUTS / f"{arch}.json"
    if not path.is_file():
        pytest.skip(f"layout fixture {path} absent (no shared/layouts beside the repository or a folder above it)")
    return json.loads(path.read_text())


def meta_model(arch: str, **params) -> torch.nn.Module:
    """Full-size model without memory: parameters on the meta device."""
    with torch.device("meta"):
        return ARCHITECTURES[arch].build(params)


@pytest.fixture(scope="module")
def models():
    return {arch: create_model(arch, seed=0, **params) for arch, params in TINY.items()}


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("arch", TINY)
def test_layout_equals_official(arch):
    """Every key, in order, with the official shape and dtype, at the release settings;
    the release settings read back from the shapes."""
    layout = fixture(arch)
    state_dict = meta_model(arch).state_dict()
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]
    expected = [(k, shape, layout["key_dtypes"][k]) for k, shape in layout["keys"].items()]
    assert got == expected
    spec = ARCHITECTURES[arch]
    assert spec.resolve_params(spec.infer_params(state_dict)) == spec.resolve_params()
    others = [a.name for a in ARCHITECTURES.values() if a.is_candidate(set(state_dict))]
    assert others == [arch]


@pytest.mark.parametrize("arch", TINY)
def test_legacy_names_normalize(arch):
    """The fixture's legacy EntropyBottleneck names map onto qft's keys."""
    aliases = fixture(arch)["legacy_key_aliases"]
    state_dict = meta_model(arch).state_dict()
    assert aliases and set(aliases) <= set(state_dict)
    legacy = {aliases.get(k, k): v for k, v in state_dict.items()}
    assert list(state_dict_of(legacy)) == list(state_dict_of(state_dict))


def test_cca_training_only_keys():
    layout = fixture("cca")
    assert list(TRAINING_ONLY_KEYS) == layout["training_only_prefixes"]
    assert len(layout["training_only_keys"]) == 865
    assert all(k.startswith(TRAINING_ONLY_KEYS) for k in layout["training_only_keys"])
    assert not any(k.startswith(TRAINING_ONLY_KEYS) for k in meta_model("cca").state_dict())
    assert release_slices(320) == layout["slice_sizes"] == [8, 28, 56, 92, 136]


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", TINY)
def test_params_read_back(arch, models):
    assert ARCHITECTURES[arch].infer_params(models[arch].state_dict()) == TINY[arch]


@pytest.mark.parametrize("arch", TINY)
def test_from_state_dict(arch, models, image, tmp_path):
    """CompressAI's constructor from a qft checkpoint's complete state_dict."""
    path = tmp_path / "m.pth"
    save_checkpoint(path, models[arch], arch, TINY[arch])
    plain = ARCHITECTURES[arch].cls.from_state_dict(torch.load(path, weights_only=True)["state_dict"]).eval()
    with torch.no_grad():
        assert torch.equal(plain(image)["x_hat"], models[arch](image)["x_hat"])


def test_from_state_dict_needs_a_registered_architecture(models):
    """The shared constructor reads the parameters through the registry: a subclass that
    is not registered is told so, not built at wrong sizes."""

    class Unregistered(type(models["cca"])):
        pass

    with pytest.raises(TypeError, match="not a registered architecture"):
        Unregistered.from_state_dict(models["cca"].state_dict())


@pytest.mark.parametrize("arch", TINY)
def test_forward_shapes_and_gradients(arch, image):
    model = create_model(arch, seed=1, **TINY[arch])
    M, z_dim = TINY[arch]["M"], TINY[arch]["z_dim"]
    out = train_step(model, image)
    assert out["likelihoods"]["y"].shape == (1, M, 4, 4)
    assert out["likelihoods"]["z"].shape == (1, z_dim, 1, 1)
    for part in (model.g_a, model.h_a, model.lrp_transforms, model.g_s):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("arch", TINY)
def test_round_trip(arch, models, image):
    """compress/decompress (USQ): a second decoder with the same weights decodes the same
    image; the reconstruction is the forward pass's (up to float rounding of the
    straight-through estimator); the stream costs about the estimated rate."""
    model = models[arch]
    with torch.no_grad():
        enc = model.compress(image)
        dec = model.decompress(enc["strings"], enc["shape"])["x_hat"]
        again = create_model(arch, seed=0, **TINY[arch]).decompress(enc["strings"], enc["shape"])["x_hat"]
        out = model(image)
    assert tuple(enc["shape"]) == (1, 1) and len(enc["strings"][0]) == len(enc["strings"][1]) == 1
    assert torch.equal(dec, again)
    torch.testing.assert_close(dec, out["x_hat"].clamp(0, 1), rtol=0, atol=1e-5)
    estimated = float(sum(-torch.log2(v).sum() for v in out["likelihoods"].values()))
    real = 8 * sum(len(s) for group in enc["strings"] for s in group)
    assert estimated < real < estimated + 8 * 16


@pytest.mark.parametrize("arch", TINY)
def test_codec_usq(arch, models):
    """Through qft's codec (padding, container): any size (every quantizer:
    tests/test_slice_coding.py)."""
    x = torch.rand(1, 3, 40, 70, generator=torch.Generator().manual_seed(2))
    codec = Codec(models[arch], arch, ARCHITECTURES[arch].entropy)
    out = codec.compress(x, Quantizer("usq"))
    assert codec.decompress(out["bitstream"])["x_hat"].shape == x.shape


def test_window_attention_on_a_map_smaller_than_its_window():
    """A 3×5 map in one 8×8 window (where the official code fails): plain attention over
    the 15 real positions with the relative position bias, the padding never attended."""
    torch.manual_seed(0)
    attention = WindowAttention(dim=16, head_dim=8, window=8, shifted=False)
    x = torch.randn(1, 3, 5, 16)
    with torch.no_grad():
        got = attention(x)
        rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        bias = attention.relative_position_params[:, rows[:, None] - rows[None] + 7, cols[:, None] - cols[None] + 7]
        q, k, v = attention.embedding_layer(x.reshape(15, 16)).reshape(15, 6, 8).permute(1, 0, 2).chunk(3)
        probs = torch.softmax(q @ k.transpose(1, 2) / 8**0.5 + bias, dim=-1)
        expected = attention.linear((probs @ v).permute(1, 0, 2).reshape(15, 16)).reshape(1, 3, 5, 16)
    torch.testing.assert_close(got, expected)


def test_coding_guards(image):
    model = ARCHITECTURES["cca"].build(TINY["cca"]).eval()
    with pytest.raises(ValueError, match=r"run update\(force=True\) first"):
        model.compress(image)
    model.update(force=True)
    with pytest.raises(ValueError, match="multiples of 64"):
        model.compress(image[..., :48])


@pytest.mark.parametrize(
    "arch, params, message",
    [
        ("dcae", {"M": 42}, "M=42 is not a multiple of num_slices=5"),
        ("dcae", {"N": 48}, "N=48 is not a multiple of 32"),
        ("dcae", {"feature_dim": [96, 144]}, "feature_dim must be 3 positive integers"),
        ("dcae", {"head_dim": [8, 16, 32, 32, 16, 7]}, "stage width 96 is not a multiple of its head width 7"),
        ("cca", {"slices": [8, 8]}, "slices [8, 8] sum to 16, not M=320"),
        ("cca", {"M": 8}, "leave a slice empty; give slices"),
        ("cca", {"em_layers": 0}, "em_layers must be a positive integer"),
    ],
)
def test_parameter_errors(arch, params, message):
    with pytest.raises(UserError, match=re.escape(message)):
        ARCHITECTURES[arch].resolve_params(params)


def test_init_cli(tmp_path, capsys, models, image):
    """``qft init --set`` writes a tiny model that loads back (architecture detected)."""
    path = tmp_path / "cca.pth"
    sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY["cca"].items()]
    assert main(["init", "--arch", "cca", *sets, "-o", str(path)]) == 0
    ckpt = load_checkpoint(path)
    assert (ckpt.arch, ckpt.params) == ("cca", TINY["cca"])
    with torch.no_grad():
        assert torch.equal(ckpt.model(image)["x_hat"], models["cca"](image)["x_hat"])
    capsys.readouterr()
    assert main(["init", "--arch", "cca", "--set", "ae_dim", "-o", str(tmp_path / "x.pth")]) == 2
    assert "--set takes NAME=VALUE" in capsys.readouterr().err
