"""vqtok.metrics: PSNR/SSIM against scikit-image, Frechet distance and KID against closed forms and brute force,
the Inception feature pipeline, LPIPS loading."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vqtok.data import build_dataset
from vqtok.metrics import (
    InceptionFeatures,
    feature_statistics,
    fid_from_features,
    file_sha256,
    frechet_distance,
    inception_weights_path,
    kid,
    load_lpips,
    psnr,
    ssim,
)
from vqtok.metrics import lpips as lpips_module
from vqtok.backbones.inception import INPUT_RANGE, inception_input, resize_tf_bilinear


def image_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Real photo crops and degraded copies (noise, a shift, a blur): (4, 3, 48, 48) each."""
    g = torch.Generator().manual_seed(0)
    x = torch.stack([build_dataset("photos", "val", size=48, length=4)[i][0] for i in range(4)])
    y = x.clone()
    y[0] = (y[0] + 0.05 * torch.randn(y[0].shape, generator=g)).clamp(0, 1)
    y[1] = torch.roll(y[1], shifts=2, dims=2)
    y[2] = torch.nn.functional.avg_pool2d(y[2:3], 3, 1, 1)[0]
    y[3] = torch.rand(y[3].shape, generator=g)
    return x, y


# -- PSNR / SSIM ----------------------------------------------------------------------------------------------------
def test_psnr_and_ssim_match_scikit_image():
    x, y = image_pairs()
    ours_psnr, ours_ssim = psnr(x, y), ssim(x, y)
    for i in range(4):
        a, b = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
        assert float(ours_psnr[i]) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-4)
        reference = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=1.0, channel_axis=2)
        assert float(ours_ssim[i]) == pytest.approx(reference, abs=1e-4)
    assert 0.2 < float(ours_ssim[0]) < 0.99 and float(ours_ssim[3]) < 0.1  # the cases really differ


def test_identical_images_score_perfectly():
    x, _ = image_pairs()
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(psnr(x, x, mse_floor=1e-10), torch.full((4,), 100.0, dtype=torch.float64))
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))


def test_image_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))


# -- Frechet distance and KID ---------------------------------------------------------------------------------------
def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))  # 5 + (1 + 1 + 4) = 11
    assert expected == pytest.approx(11.0)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(11.0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(8), b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    root = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * root)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n", [30, 200])  # fewer features than dimensions (nuclear-norm path), and more
def test_fid_from_features_equals_frechet_distance_of_the_statistics(n):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 64))
    y = 1.5 * rng.standard_normal((n + 7, 64)) + 0.3
    assert fid_from_features(x, y) == pytest.approx(frechet_distance(*feature_statistics(x), *feature_statistics(y)),
                                                     rel=1e-6)
    assert fid_from_features(x, x) == pytest.approx(0.0, abs=1e-9)  # a set against itself


def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with k = (x.y/d + 1)^3, written as the double sums of Binkowski et al. (2018)."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_brute_force_estimator():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
    mean, std = kid(x, y, subsets=3, subset_size=12)  # every subset is the whole set
    assert mean == pytest.approx(brute_force_mmd2(x, y), rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    assert kid(x, y, subsets=20, subset_size=6, seed=5) == kid(x, y, subsets=20, subset_size=6, seed=5)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same, same_std = kid(x, y, subsets=50, subset_size=200)
    shifted, shifted_std = kid(x, y + 0.5, subsets=50, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.5 and shifted > 5 * shifted_std and shifted > 50 * abs(same)


# -- Inception ------------------------------------------------------------------------------------------------------
def test_resize_follows_tf_legacy_bilinear():
    """Reference: TF-1 resize_bilinear(align_corners=False, half_pixel_centers=False): src = dst * in / out."""
    x = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = resize_tf_bilinear(x, 11)[0, 0]

    def taps(out_size: int, in_size: int) -> list[tuple[int, int, float]]:
        result = []
        for j in range(out_size):
            s = j * in_size / out_size
            i0 = int(np.floor(s))
            result.append((i0, min(i0 + 1, in_size - 1), s - i0))
        return result

    image = x[0, 0].numpy()
    reference = np.zeros((11, 11))
    for r, (y0, y1, fy) in enumerate(taps(11, 5)):
        for c, (x0, x1, fx) in enumerate(taps(11, 7)):
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            reference[r, c] = top * (1 - fy) + bottom * fy
    assert np.allclose(out.numpy(), reference, atol=1e-12)


def test_inception_input_is_quantised_to_8_bits_then_scaled_like_tf():
    """x in [0, 1] -> 8-bit level p = round(255 x) -> TF's (p - 128) / 128, i.e. [-1, 127/128 = 0.9921875].
    Inputs sit 0.3 or 0.45 of a level off the 8-bit grid (either side): unrounded, they would land 0.3/128 = 2.3e-3
    or more from the right value, >1000x the float32 error of the pipeline."""
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (1, 3, 299, 299), generator=g).double()  # 299 x 299: no resize
    choice = torch.randint(0, 4, levels.shape, generator=g)
    offsets = torch.tensor([-0.45, -0.3, 0.3, 0.45], dtype=torch.float64)[choice]  # never on the grid nor at .5
    x = ((levels + offsets) / 255).clamp(0, 1).float()  # level 0 - 0.45 clamps to 0, 255 + 0.45 to 1: same level
    prepared = inception_input(x)
    assert prepared.shape == (1, 3, 299, 299) and prepared.dtype == torch.float32
    torch.testing.assert_close(prepared.double(), (levels - 128) / 128, rtol=0, atol=1e-6)
    assert INPUT_RANGE == (-1.0, 127 / 128)
    # smaller images: quantised first, then resized (TF-1 legacy bilinear), then scaled
    small_levels = torch.randint(0, 256, (2, 3, 5, 7), generator=g).double()
    small = ((small_levels + 0.3) / 255).float()
    expected = (resize_tf_bilinear(small_levels / 255) * 255 - 128) / 128
    torch.testing.assert_close(inception_input(small).double(), expected, rtol=0, atol=1e-5)


def test_inception_weights_are_found_and_each_file_hashed_once(tmp_path, monkeypatch):
    path = inception_weights_path()
    assert path.name == "default_1.pt" and path.stat().st_size > 80_000_000
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    # count the hash computations (not the calls): file_sha256 caches per (resolved path, mtime, size)
    real_sha256, computed = hashlib.sha256, []
    monkeypatch.setattr(hashlib, "sha256", lambda *a, **k: computed.append(1) or real_sha256(*a, **k))
    weights = tmp_path / "weights.pt"  # a path no earlier test has hashed
    weights.write_bytes(b"inception" * 1000)
    expected = real_sha256(b"inception" * 1000).hexdigest()
    (tmp_path / "sub").mkdir()
    assert file_sha256(weights) == expected and file_sha256(tmp_path / "sub" / ".." / "weights.pt") == expected
    assert len(computed) == 1, f"{len(computed)} hash computations for one file: the cache did not hold"  # two loads
    weights.write_bytes(b"other weights")  # a new size (and mtime): the cached digest no longer applies
    assert file_sha256(weights) == real_sha256(b"other weights").hexdigest()
    assert len(computed) == 2, "a changed file must be hashed again"


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


@pytest.mark.slow
def test_inception_features_are_deterministic_and_batch_independent(inception):
    x, y = image_pairs()
    features = inception(x, batch_size=4)
    assert features.shape == (4, 2048) and features.dtype == torch.float32
    assert float(features.min()) >= 0.0  # pool3 after ReLU
    assert torch.equal(inception(x[:2], batch_size=2), inception(x[:2], batch_size=2))
    assert torch.allclose(features[:2], inception(x[:2], batch_size=1), atol=1e-4)
    degraded = inception(y)
    both = torch.cat([features, degraded])
    assert fid_from_features(both, both) == pytest.approx(0.0, abs=1e-6)  # a set against itself
    assert fid_from_features(features, degraded) > 1.0



@pytest.mark.slow
def test_eager_inception_computes_the_torchscript_graphs_features(inception):
    """The eager network (batch norm folded, channels-last, vqtok's pools) against the shipped TorchScript graph it
    was built from, on natural-looking and noise images: the same pool3 features to float32 round-off."""
    from vqtok.backbones.inception import _load_torchscript

    x, y = image_pairs()
    images = torch.cat([x, y, torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))])
    prepared = inception_input(images)
    script = _load_torchscript(str(inception.weights.resolve()), "cpu")
    with torch.no_grad():
        expected = script(prepared).double()
        got = inception.network(prepared).double()
    assert got.shape == expected.shape == (len(images), 2048)
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, f"eager features differ from the graph's by {float(error):.2e} of their scale"

# -- LPIPS ----------------------------------------------------------------------------------------------------------
def test_lpips_is_none_with_one_notice_when_weights_are_absent(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("VQTOK_LPIPS_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(lpips_module, "_notified", [])
    with caplog.at_level(logging.WARNING, logger="vqtok.metrics"):
        assert load_lpips(None) is None
        assert load_lpips(None) is None
    assert caplog.text.count("LPIPS-VGG weights not found") == 1
    with pytest.raises(FileNotFoundError, match="not found"):
        load_lpips(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="vgg16"):
        load_lpips(tmp_path)  # exists, but holds no weights


def test_lpips_loads_weight_files_from_a_folder(tmp_path):
    from vqtok.models.perceptual import LPIPS

    torch.manual_seed(0)
    reference = LPIPS()
    torch.save({f"features.{k}": v for k, v in reference.features.state_dict().items()},
               tmp_path / "vgg16-397923af.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight.abs() for i, lin in enumerate(reference.lins)},
               tmp_path / "vgg.pth")
    model = load_lpips(tmp_path)
    assert isinstance(model, LPIPS) and "vgg.pth" in model.describe()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = x.flip(-1)
    assert torch.allclose(model.distance(x, x), torch.zeros(2), atol=1e-7)
    assert (model.distance(x, y) > 0).all()
    assert torch.allclose(model.distance(x, y), model.distance(y, x), rtol=1e-5)
    assert load_lpips(tmp_path / "vgg.pth") is not None  # a file names its folder
