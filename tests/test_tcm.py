"""TCM (qft.models.tcm): forward shapes, the window attention at sizes the official model
cannot run, an exact compress/decompress round trip, the codec and ``qft init``.

A tiny model (N=32, M=20: 2.3 M weights) on 64×64 images: y is 4×4 and z 1×1, smaller
than the attention windows (8 and 4), so every window attention runs padded and masked.
The layout at the released sizes is held by tests/test_layouts.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from trellis import Quantizer

from qft.cli import main
from qft.codec import Codec
from qft.errors import UserError
from qft.models import ARCHITECTURES, create_model, load_checkpoint
from qft.models.layers import WindowAttention
from qft.models.tcm import NUM_SLICES, TCM

TINY = {"N": 32, "M": 20, "Z": 8, "attn_dim": 16, "cc_dims": [16, 8]}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)  # a tiny model: threads only contend
    return create_model("tcm", seed=0, **TINY)


def image(h=64, w=64, batch=1, seed=0):
    """``batch`` uniform random RGB images ``(batch, 3, h, w)`` in [0, 1), seeded."""
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_decode(model, x):
    """What the decoder must reconstruct: the slices rounded around their μ, in order,
    each refined by its LRP before the next slice reads it (public steps only)."""
    y = model.g_a(x)
    z = model.h_a(y)
    z_hat = model.entropy_bottleneck.decompress(model.entropy_bottleneck.compress(z), z.shape[-2:])
    context = model.hyper_context(z_hat)
    slices = []
    for i, y_slice in enumerate(y.chunk(NUM_SLICES, 1)):
        mu, _, support = model.slice_parameters(i, context, slices)
        slices.append(model.slice_reconstruction(i, support, torch.round(y_slice - mu) + mu))
    return model.g_s(torch.cat(slices, 1)).clamp_(0, 1)


def train_step(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """One training-mode forward pass of ``x`` and the backward pass of a rate + distortion
    loss (every latent's bits plus ``x̂``'s energy); checks that x̂ has ``x``'s shape and
    every likelihood lies in (0, 1], and returns the forward pass's dict. The gradients stay
    on the parameters for the caller to check (and zero); the model is left in eval mode."""
    model.train()
    try:
        out = model(x)
    finally:
        model.eval()
    assert out["x_hat"].shape == x.shape
    assert all(((v > 0) & (v <= 1)).all() for v in out["likelihoods"].values())
    loss = out["x_hat"].square().mean() + sum(-v.log2().sum() for v in out["likelihoods"].values())
    loss.backward()
    return out


def test_forward_shapes(model):
    out = train_step(model, image(64, 128))
    assert out["likelihoods"]["y"].shape == (1, 20, 4, 8)
    assert out["likelihoods"]["z"].shape == (1, 8, 1, 2)
    assert model.lrp_transforms[4][0].weight.grad is not None
    assert model.atten_scale[0][0].non_local_block.block_2.msa.relative_position_params.grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("hw, batch", [((64, 64), 1), ((64, 192), 2)])
def test_roundtrip_exact(model, hw, batch):
    x = image(*hw, batch=batch)
    with torch.no_grad():
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
    y_strings, z_strings = enc["strings"]
    assert len(y_strings) == len(z_strings) == batch
    assert tuple(enc["shape"]) == (hw[0] // 64, hw[1] // 64)
    assert torch.equal(dec["x_hat"], reference_decode(model, x))
    if batch > 1:  # each image's string is the one it gets alone
        with torch.no_grad():
            assert model.compress(x[1:])["strings"][0][0] == y_strings[1]


def test_codec_usq(model):
    """Through qft's codec and container at a size the official model cannot run (every
    quantizer: tests/test_slice_coding.py)."""
    codec = Codec(model, "tcm", ARCHITECTURES["tcm"].entropy)
    x = image(48, 80, seed=1)  # padded to 64×128 by the codec
    out = codec.compress(x, Quantizer("usq"))
    x_hat = codec.decompress(out["bitstream"])["x_hat"]
    assert x_hat.shape == x.shape


@torch.no_grad()
def dense_attention(attn, x):
    """Window attention computed directly among the map's real positions: a query sees the
    keys of its (shifted) window, and of its region of a window that wraps around the
    edge (Swin), with the bias of their relative position in the window."""
    _, H, W, C = x.shape
    w, heads, hd = attn.window, attn.heads, attn.head_dim
    s = w // 2 if attn.shifted else 0
    Hp, Wp = H + (-H % w), W + (-W % w)
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    i, j = (rows - s) % Hp, (cols - s) % Wp  # where the shift puts each position
    sees = (i[:, None] // w == i[None] // w) & (j[:, None] // w == j[None] // w)
    if s:
        wrapped_i, wrapped_j = i >= Hp - s, j >= Wp - s
        sees &= (wrapped_i[:, None] == wrapped_i[None]) & (wrapped_j[:, None] == wrapped_j[None])
    di = (i % w)[:, None] - (i % w)[None] + w - 1
    dj = (j % w)[:, None] - (j % w)[None] + w - 1
    q, k, v = attn.embedding_layer(x.reshape(H * W, C)).reshape(H * W, 3, heads, hd).unbind(1)
    sim = torch.einsum("phc,qhc->hpq", q, k) * hd**-0.5 + attn.relative_position_params[:, di, dj]
    out = torch.einsum("hpq,qhc->phc", sim.masked_fill(~sees, float("-inf")).softmax(-1), v)
    return attn.linear(out.reshape(H * W, C)).reshape(1, H, W, C)


@pytest.mark.parametrize(
    "window, shifted, size",
    [(8, False, (8, 16)), (4, True, (8, 12)), (8, False, (5, 7)), (4, True, (6, 6)), (8, True, (3, 10))],
)
def test_window_attention(window, shifted, size):
    """Equal to the direct computation: on multiples of the window (the official model's
    sizes) and, padded and masked, on any other size."""
    torch.manual_seed(0)
    attn = WindowAttention(dim=8, head_dim=4, window=window, shifted=shifted)
    x = torch.randn(1, *size, 8)
    with torch.no_grad():
        got = attn(x)
    assert got.shape == x.shape
    assert torch.allclose(got, dense_attention(attn, x), atol=1e-5)


def test_params():
    arch = ARCHITECTURES["tcm"]
    assert arch.resolve_params() == {"N": 128, "M": 320, "Z": 192, "attn_dim": 128, "cc_dims": [224, 128]}
    assert arch.resolve_params({"N": 32, "M": 40}) == {"N": 32, "M": 40, "Z": 24, "attn_dim": 16, "cc_dims": [28, 16]}
    for params, message in [
        ({"N": 48}, "N must be a multiple of 32"),
        ({"M": 322}, "M must be a multiple of 5"),
        ({"M": 50}, "Z follows from M only when M is a multiple of 40"),
        ({"M": 40, "attn_dim": 20}, "attn_dim must be a positive multiple of 16"),
        ({"M": 40, "cc_dims": [8]}, "cc_dims must be 2 positive integers"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            arch.resolve_params(params)


def test_init_small(tmp_path, capsys):
    path = tmp_path / "tcm.pth"
    assert main(["init", "--arch", "tcm", "--N", "32", "--M", "40", "-o", str(path)]) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(path)
    assert ckpt.arch == "tcm"
    assert ckpt.params == {"N": 32, "M": 40, "Z": 24, "attn_dim": 16, "cc_dims": [28, 16]}
    weights = sum(p.numel() for p in ckpt.model.parameters())
    assert math.isclose(weights, 2.87e6, rel_tol=0.01)


def test_from_state_dict(model):
    """CompressAI's way: a complete state_dict (CDF tables included) makes the model."""
    again = TCM.from_state_dict(model.state_dict()).eval()
    x = image(seed=2)
    with torch.no_grad():
        assert torch.equal(again(x)["x_hat"], model(x)["x_hat"])
        enc = model.compress(x)
        assert again.compress(x)["strings"] == enc["strings"]
