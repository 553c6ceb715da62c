"""Decoder sensitivity (issue 9): the two estimators agree, ignored channels, determinism,
image inputs, and the weight normalisation."""

import numpy as np
import pytest
import torch

from PIL import Image
from scipy.stats import spearmanr

from qft.models import create_model
from qft.sensitivity import decoder_sensitivity, normalise_weights

M = 16
IGNORED = 5  # the decoder's first layer ignores this channel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine an OpenMP barrier per op
    can make them 100× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """A tiny mbt2018-mean whose decoder gains differ by 2⁴ across channels (ratio 256 in
    ``s``) and ignores one channel; large latents (``g_a`` gain) so that ŷ is not all μ."""
    m = create_model("mbt2018-mean", N=16, M=M, seed=0)
    with torch.no_grad():
        m.g_a[-1].weight.mul_(30.0)
        w = m.g_s[0].weight  # ConvTranspose2d: (in = M, out = N, 5, 5)
        w.mul_((2.0 ** (torch.arange(M) / (M / 4))).view(M, 1, 1, 1))
        w[IGNORED] = 0
    m.update(force=True)
    return m.eval()


def smooth_images() -> list[np.ndarray]:
    """Two smooth random 64 × 64 RGB images (as natural images: most energy at low
    frequencies): 8 × 8 noise of seed 0, upsampled bicubically."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(2):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(np.asarray(Image.fromarray(small).resize((64, 64), Image.BICUBIC)))
    return out


@pytest.fixture(scope="module")
def images():
    return smooth_images()


@pytest.fixture(scope="module")
def exact(model, images):
    return decoder_sensitivity(model, images, method="exact", probes=8, progress=False)


def test_vjp_agrees_with_exact(model, images, exact):
    vjp = decoder_sensitivity(model, images, method="vjp", probes=64, progress=False)
    assert vjp.shape == exact.shape == (M,) and vjp.dtype == exact.dtype == np.float64
    live = np.arange(M) != IGNORED
    assert spearmanr(vjp[live], exact[live])[0] > 0.95
    # same quantity: the linearisation is accurate at Δ = 1; noise of both estimates ≈ 5 %
    # (largest deviation over seeds 0–3: 16 %)
    np.testing.assert_allclose(vjp[live], exact[live], rtol=0.3)
    assert abs(np.median(vjp[live] / exact[live]) - 1) < 0.1


def test_ignored_channel(model, images, exact):
    vjp = decoder_sensitivity(model, images, method="vjp", probes=4, progress=False)
    for s in (exact, vjp):
        assert (s >= 0).all()
        assert s[IGNORED] < 1e-6 * np.delete(s, IGNORED).min()


def test_exact_scales_with_step_as_linearised(model, images, exact):
    """In the linear regime ``s`` does not depend on the noise amplitude (same seed: the
    same noise pattern, scaled, so only the decoder's nonlinearity differs)."""
    small = decoder_sensitivity(model, images, method="exact", probes=8, step=0.25, progress=False)
    live = np.arange(M) != IGNORED
    np.testing.assert_allclose(small[live], exact[live], rtol=0.15)


def test_deterministic(model, images):
    for method in ("vjp", "exact"):
        a = decoder_sensitivity(model, images[:1], method=method, probes=1, seed=3, progress=False)
        b = decoder_sensitivity(model, images[:1], method=method, probes=1, seed=3, progress=False)
        c = decoder_sensitivity(model, images[:1], method=method, probes=1, seed=4, progress=False)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)


def test_paths_crop_and_mode(model, images, tmp_path):
    big = np.concatenate([images[0], images[1]], axis=1)  # 64 × 128
    path = tmp_path / "x.png"
    Image.fromarray(big).save(path)
    model.train()
    try:
        from_path = decoder_sensitivity(model, [path], probes=2, crop=64, progress=False)
        assert model.training  # the flag is restored
    finally:
        model.eval()
    centre = big[:, 32:96]
    from_array = decoder_sensitivity(model, [centre], probes=2, crop=64, progress=False)
    assert np.array_equal(from_path, from_array)


def test_bad_arguments(model, images):
    with pytest.raises(ValueError, match="method"):
        decoder_sensitivity(model, images, method="hutchinson")
    with pytest.raises(ValueError, match="crop"):
        decoder_sensitivity(model, images, crop=100)
    with pytest.raises(ValueError, match="probes"):
        decoder_sensitivity(model, images, probes=0)
    with pytest.raises(ValueError, match="uint8"):
        decoder_sensitivity(model, [images[0].astype(np.float32)])
    with pytest.raises(ValueError, match="no images"):
        decoder_sensitivity(model, [])
    with pytest.raises(ValueError, match="step-wise coded"):
        decoder_sensitivity(create_model("mbt2018", N=16, M=16, seed=0), images)


def test_normalise_weights():
    s = np.array([4.0, 1.0, 2.0, 1e-9, 1.0])
    w = normalise_weights(s)
    assert w.dtype == np.float64 and w.shape == s.shape
    assert np.isfinite(w).all() and (w > 0).all()
    assert w.mean() == pytest.approx(1.0)
    assert w[3] == pytest.approx(1e-3 * w.mean(), rel=0.01)  # floored
    assert w[0] / w[1] == pytest.approx(4.0)  # proportional above the floor
    rates = np.array([1.0, 0.0, 2.0, 0.0, 1.0])
    wr = normalise_weights(s, rates)
    assert np.dot(wr, rates) / rates.sum() == pytest.approx(1.0)
    assert wr[0] / wr[2] == pytest.approx(2.0)
    # scale invariance
    np.testing.assert_allclose(normalise_weights(7 * s, rates), wr)
    for bad in ([], [0.0, 0.0], [1.0, np.nan], [1.0, -1.0], [[1.0]]):
        with pytest.raises(ValueError):
            normalise_weights(bad)
    with pytest.raises(ValueError):
        normalise_weights(s, rates[:3])
    with pytest.raises(ValueError):
        normalise_weights(s, np.zeros(5))
    with pytest.raises(ValueError):
        normalise_weights(np.array([0.0, 1.0]), np.array([1.0, 0.0]))  # rate only where s = 0
