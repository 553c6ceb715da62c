"""MLIC++ (qft.models.mlicpp): forward shapes and gradients, the coding order of the
checkerboard halves (anchors at (row + col) odd), the local-context mask, an exact CPU
compress/decompress round trip, both weight generations, the parameter checks and
``qft init``.

A tiny model (N=8, M=16, 2 slices of 8 channels, narrow hidden widths) on 64×64 images
(y 4×4). The layouts at the released sizes are held by tests/test_layouts.py.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from test_tcm import image, train_step  # sibling test module: a seeded image, the training-step check
from torch import nn

from qft.cli import main
from qft.errors import UserError
from qft.models import ARCHITECTURES, create_model, load_checkpoint
from qft.models.layers import squeeze_checkerboard, unsqueeze_checkerboard
from qft.models.mlicpp import LocalContext, anchor_mask, half_parity

TINY = {
    "N": 8,
    "M": 16,
    "slice_num": 2,
    "generation": "2024-04",
    "ep_hidden": [16, 12, 8],
    "cc_hidden": [8, 8],
    "lrp_hidden": [8, 8],
}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)  # a tiny model: threads only contend
    return create_model("mlicpp", seed=0, **TINY)


def test_forward_shapes(model):
    out = train_step(model, image(64, 128))
    assert out["likelihoods"]["y"].shape == (1, 16, 4, 8)
    assert out["likelihoods"]["z"].shape == (1, 8, 1, 2)
    for module in (
        model.local_context[1].relative_position_table,
        model.global_intra_context[1].reprojection.weight,
        model.global_inter_context[1].skip.weight,
        model.channel_context[1].fushion[0].weight,
        model.lrp_anchor[0].lrp_transform[0].weight,
        model.lrp_nonanchor[1].lrp_transform[4].weight,
    ):
        assert module.grad is not None and module.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_checkerboard_halves():
    """Anchors at (row + col) odd; each half squeezed row by row in the official order."""
    mask = anchor_mask(3, 4)
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False], [False, True, False, True]]
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    a, n = half_parity(True), half_parity(False)
    assert squeeze_checkerboard(x, a).flatten().tolist() == [1, 3, 4, 6, 9, 11]
    assert squeeze_checkerboard(x, n).flatten().tolist() == [0, 2, 5, 7, 8, 10]
    halves = unsqueeze_checkerboard(squeeze_checkerboard(x, a), a) + unsqueeze_checkerboard(
        squeeze_checkerboard(x, n), n
    )
    assert torch.equal(halves, x)
    # numpy arrays: the same layout (the codec's steps gather and scatter with it)
    assert np.array_equal(squeeze_checkerboard(x.numpy(), a), squeeze_checkerboard(x, a).numpy())
    assert np.array_equal(
        unsqueeze_checkerboard(x.numpy()[..., ::2], n), unsqueeze_checkerboard(x[..., ::2], n).numpy()
    )


def test_local_context_mask_and_index():
    """Attention runs among the 25 cells of the window around each position: ``0`` only
    where both cells are anchors inside the map, ``−100`` elsewhere; the
    relative-position rows ``(Δrow + 4)·9 + Δcol + 4``."""
    lc = LocalContext(4)
    mask = lc.mask(4, 4, torch.device("cpu"))
    assert mask.shape == (16, 25, 25)
    # window around (0, 1): its centre (cell 12, an anchor) attends to itself and to the
    # anchor (1, 2) (cell 18), not to the non-anchor (1, 1) (cell 17) nor off the map
    row = mask[1, 12]
    assert row[12] == 0 and row[18] == 0 and row[17] == -100 and row[0] == -100
    # window around (0, 0): its centre is a non-anchor, so its row is all masked; its
    # anchor neighbours (0, 1) and (1, 0) (cells 13, 17) attend to each other
    assert (mask[0, 12] == -100).all() and mask[0, 13, 17] == 0
    assert int((mask == 0).sum()) == sum(int(w.sum()) ** 2 for w in lc.unfold(anchor_mask(4, 4).float()[None, None])[0])
    index = lc.relative_position_index
    assert index.dtype == torch.int64
    assert (index[0, 0], index[0, 24], index[24, 0], index[12, 13]) == (40, 0, 80, 39)


@pytest.mark.parametrize("h,w,batch", [(64, 64, 1), (64, 128, 2)])
def test_roundtrip_exact(model, h, w, batch):
    """The decoder reconstructs exactly what the encoder's (and eval forward's) rounding
    around μ gives, on the CPU, for every image of a batch."""
    x = torch.cat([image(h, w, seed=s) for s in range(batch)])
    with torch.no_grad():
        enc = model.compress(x)
        dec = model.decompress(enc["strings"], enc["shape"])
        expected = model(x)["x_hat"].clamp(0, 1)
    assert len(enc["strings"][0]) == batch and tuple(enc["shape"]) == (h // 64, w // 64)
    assert torch.equal(dec["x_hat"], expected)
    with torch.no_grad():
        assert model.compress(x)["strings"] == enc["strings"]  # deterministic


def test_compress_refuses(model):
    with pytest.raises(ValueError, match="multiples of 64"):
        model.compress(image(64, 96))
    with pytest.raises(ValueError, match="expected strings"):
        model.decompress([[b""], []], (1, 1))


class _Fixed(nn.Module):
    """Returns a fixed tensor, whatever its input (to feed chosen y and z to forward)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


@torch.no_grad()
def likelihoods_of(model, y, z):
    """y-likelihoods of ``forward`` (eval: plain rounding) for the given ``y`` and ``z``."""
    g_a, h_a = model.g_a, model.h_a
    model.g_a, model.h_a = _Fixed(y), _Fixed(z)
    try:
        return model(image())["likelihoods"]["y"]
    finally:
        model.g_a, model.h_a = g_a, h_a


def test_coding_order(model):
    """The likelihood of a latent depends only on latents coded before it: slices in
    order, anchors ((row + col) odd) before non-anchors, the latents of one half coded
    in parallel."""
    gen = torch.Generator().manual_seed(3)
    y = 3 * torch.randn(1, 16, 4, 4, generator=gen)
    z = torch.randn(1, 8, 1, 1, generator=gen)
    base = likelihoods_of(model, y, z)
    anchors = anchor_mask(4, 4)

    def changed(channel, row, col):
        y2 = y.clone()
        y2[0, channel, row, col] += 7.3
        return (likelihoods_of(model, y2, z) != base)[0]

    # a slice-0 anchor: no other slice-0 anchor moves; non-anchors of slice 0 and slice 1 do
    diff = changed(2, 0, 1)
    others = diff[:8].clone()
    others[2, 0, 1] = False
    assert not (others & anchors).any()
    assert (others & ~anchors).any() and diff[8:].any()
    # a slice-0 non-anchor: no other latent of slice 0 moves; slice 1 does (through ŷ_0)
    diff = changed(2, 1, 1)
    others = diff[:8].clone()
    others[2, 1, 1] = False
    assert not others.any() and diff[8:].any()
    # a slice-1 latent: slice 0 is untouched
    assert not changed(12, 2, 2)[:8].any()


def test_generations():
    """The 2023-09 weights: a 4-conv LRP ramp and g_s opening with a skip conv; the
    generation is read back from the shapes."""
    old = create_model("mlicpp", seed=0, **{**TINY, "generation": "2023-09"})
    sd = old.state_dict()
    assert "lrp_anchor.1.lrp_transform.6.weight" in sd and "g_s.synthesis_transform.0.skip.weight" in sd
    # M + 2 slices of 8 = 32 channels in, ramped by quarters of (32 - 8) towards 8
    assert [sd[f"lrp_anchor.1.lrp_transform.{k}.weight"].shape[0] for k in (0, 2, 4, 6)] == [26, 20, 14, 8]
    params = ARCHITECTURES["mlicpp"].infer_params(sd)
    assert params["generation"] == "2023-09" and "lrp_hidden" not in params
    new_params = ARCHITECTURES["mlicpp"].infer_params(create_model("mlicpp", seed=0, **TINY).state_dict())
    assert new_params == TINY
    with torch.no_grad():
        assert old(image())["x_hat"].shape == (1, 3, 64, 64)


def test_params():
    arch = ARCHITECTURES["mlicpp"]
    assert arch.resolve_params() == {
        "N": 192,
        "M": 320,
        "slice_num": 10,
        "generation": "2024-04",
        "ep_hidden": [320, 256, 128],
        "cc_hidden": [192, 128],
        "lrp_hidden": [224, 128],
    }
    for params, message in [
        ({"M": 321}, "M must split into slice_num equal slices of an even width"),
        ({"M": 30}, "M must split into slice_num equal slices of an even width"),
        ({"generation": "2025"}, "generation must be one of 2024-04, 2023-09"),
        ({"ep_hidden": [8, 8]}, "ep_hidden must be 3 positive integers"),
        ({"slice_num": 0}, "slice_num must be a positive integer"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            arch.resolve_params(params)


def test_init_small(tmp_path, capsys):
    path = tmp_path / "mlicpp.pth"
    argv = ["init", "--arch", "mlicpp", "--N", "8", "--M", "16", "-o", str(path)]
    for item in ("slice_num=2", "ep_hidden=16,12,8", "cc_hidden=8,8", "lrp_hidden=8,8"):
        argv += ["--set", item]
    assert main(argv) == 0
    capsys.readouterr()
    ckpt = load_checkpoint(path)
    assert (ckpt.arch, ckpt.params) == ("mlicpp", TINY)
    with torch.no_grad():
        assert ckpt.model(image())["x_hat"].shape == (1, 3, 64, 64)
