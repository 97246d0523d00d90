"""`evaluation.proxy_fid_bootstrap`: the proxy FID with its basic bootstrap interval."""
import numpy as np
import pytest

import evaluation


def _stats_and_images():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    mu, sigma = evaluation.gaussian_statistics(evaluation.proxy_features(reference))
    stats = {"mu": mu, "sigma": sigma, "proxy_version": evaluation.PROXY_VERSION}
    images = np.clip(rng.normal(128, 40, (30, 8, 8, 3)), 0, 255).astype(np.uint8)
    return stats, images


def test_bootstrap_interval_brackets_the_proxy_fid_and_is_seeded():
    stats, images = _stats_and_images()
    result = evaluation.proxy_fid_bootstrap(images, stats, num_resamples=16, seed=1)
    assert result["value"] == pytest.approx(evaluation.proxy_fid(images, stats), rel=1e-12)
    assert result["low"] < result["high"]
    # Resampling rows adds spread to the covariance, so most draws sit above the point value;
    # the interval still reaches below it for these data.
    assert result["low"] <= result["value"] * 1.05
    assert evaluation.proxy_fid_bootstrap(images, stats, num_resamples=16, seed=1) == result
    assert evaluation.proxy_fid_bootstrap(images, stats, num_resamples=16, seed=2) != result
    narrow = evaluation.proxy_fid_bootstrap(images, stats, num_resamples=16, level=0.5, seed=1)
    assert result["low"] <= narrow["low"] <= narrow["high"] <= result["high"]


def test_bootstrap_rejects_bad_level_and_too_few_images():
    stats, images = _stats_and_images()
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\); got 1.5"):
        evaluation.proxy_fid_bootstrap(images, stats, level=1.5)
    with pytest.raises(ValueError, match="at least 2 samples; got 1"):
        evaluation.proxy_fid_bootstrap(images[:1], stats)
