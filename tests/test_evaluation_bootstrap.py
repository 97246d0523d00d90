"""Sample-quality measures with uncertainty: bootstrap interval of a Frechet distance, proxy KID."""
import numpy as np
import pytest

import evaluation


def _stats(dim: int) -> dict:
    return {"mu": np.zeros(dim), "sigma": np.eye(dim)}


def test_bootstrap_interval_covers_a_known_distance_and_shrinks_with_samples():
    """Features ~ N(m, I) against N(0, I): the Frechet distance is |m|^2 = 1."""
    rng = np.random.default_rng(0)
    dim, shift = 4, np.array([1.0, 0, 0, 0])
    widths = []
    for n in (200, 3200):
        features = rng.standard_normal((n, dim)) + shift
        result = evaluation.frechet_distance_bootstrap(features, _stats(dim), 200, seed=1)
        assert result["samples"] == n
        assert result["low"] <= result["value"] <= result["high"]
        assert result["low"] < 1.0 < result["high"] + 0.05
        widths.append(result["high"] - result["low"])
    assert widths[1] < widths[0] / 2.5  # about 1 / sqrt(16) = 1/4


def test_trace_with_a_fixed_root_equals_the_tf_gan_trace():
    """The bootstrap's eigenvalue form of Tr((s1 s2)^(1/2)) equals the SVD form used for the
    reported value, for full-rank and rank-deficient s1 alike."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((40, 12)), rng.standard_normal((7, 12))
    sigma2 = np.cov(a, rowvar=False)
    root2 = evaluation.symmetric_matrix_sqrt(sigma2)
    for sigma1 in (np.cov(rng.standard_normal((30, 12)) * 2, rowvar=False), b.T @ b):
        assert evaluation.trace_sqrt_product_with_root(sigma1, root2) == pytest.approx(
            evaluation.trace_sqrt_product(sigma1, sigma2), rel=1e-7)


def test_bootstrap_is_seeded_and_checks_its_input():
    features = np.random.default_rng(0).standard_normal((50, 3))
    a = evaluation.frechet_distance_bootstrap(features, _stats(3), 50, seed=3)
    assert a == evaluation.frechet_distance_bootstrap(features, _stats(3), 50, seed=3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluation.frechet_distance_bootstrap(features[:1], _stats(3))
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        evaluation.frechet_distance_bootstrap(features, _stats(3), level=1.0)


def test_proxy_quality_of_data_against_itself():
    """Two halves of one image distribution: proxy KID within a few standard errors of 0, while
    a colour-shifted copy is far in both FID (disjoint intervals) and KID."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, size=(800, 1, 1, 3))
    images = np.clip(base + rng.integers(0, 56, size=(800, 8, 8, 3)), 0, 255).astype(np.uint8)
    reference = evaluation.proxy_features(images[:400])
    mu, sigma = evaluation.gaussian_statistics(reference)
    stats = {"mu": mu, "sigma": sigma, "proxy_version": evaluation.PROXY_VERSION}
    same = evaluation.proxy_quality(images[400:], stats, reference, num_resamples=20,
                                    kid_block_size=100)
    assert abs(same["kid"]["value"]) < 4 * same["kid"]["std_error"]
    shifted = np.clip(images[400:].astype(int) + 60, 0, 255).astype(np.uint8)
    far = evaluation.proxy_quality(shifted, stats, reference, num_resamples=20,
                                   kid_block_size=100)
    assert far["fid"]["low"] > same["fid"]["high"]
    assert far["kid"]["value"] > same["kid"]["value"] + 10 * far["kid"]["std_error"]


def test_low_rank_frechet_distance_equals_the_full_one():
    """Fewer samples than dimensions: the n x n eigenvalue form equals the d x d one."""
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((300, 48)) @ rng.standard_normal((48, 48)) * 0.3
    mu, sigma = evaluation.gaussian_statistics(reference)
    root = evaluation.symmetric_matrix_sqrt(sigma)
    for n in (5, 20, 47):
        features = rng.standard_normal((n, 48)) @ rng.standard_normal((48, 48)) * 0.3 + 0.2
        full = evaluation.frechet_distance(*evaluation.gaussian_statistics(features), mu, sigma)
        low = evaluation.low_rank_frechet_distance(features, mu, sigma, features @ root)
        assert low == pytest.approx(full, rel=1e-7)


def test_interval_with_fewer_samples_than_dimensions_contains_the_estimate():
    """n < d: a bootstrap resample's FID is biased far above the estimate (its covariance has
    ~63 % of the rank), so the basic interval falls below the estimate; "auto" takes the
    half-sample one, centred on it, whose width is that of the spread of FID over independent
    sample sets, on the wide side."""
    rng = np.random.default_rng(0)
    dim, n = 64, 40
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)

    def draw(count: int) -> np.ndarray:
        return rng.standard_normal((count, dim)) @ mixing

    stats = dict(zip(("mu", "sigma"), evaluation.gaussian_statistics(draw(4000))))
    features = draw(n)
    basic = evaluation.frechet_distance_bootstrap(features, stats, 200, interval="basic")
    auto = evaluation.frechet_distance_bootstrap(features, stats, 200)
    assert basic["interval"] == "basic" and basic["high"] < basic["value"]
    assert auto["interval"] == "half-sample" and auto["low"] < auto["value"] < auto["high"]
    assert auto["high"] - auto["value"] == pytest.approx(auto["value"] - auto["low"])
    spread = np.std([evaluation.frechet_distance_from_activations(draw(n), draw(4000))
                     for _ in range(30)], ddof=1)
    half_width = (auto["high"] - auto["low"]) / 2
    assert 1.96 * spread < half_width < 2.5 * 1.96 * spread
    # The bootstrap's spread would be several times too wide.
    assert basic["high"] - basic["low"] > 2 * (auto["high"] - auto["low"])
    # n >= d keeps the basic interval (the committed proxy numbers).
    assert evaluation.frechet_distance_bootstrap(draw(80), stats, 20)["interval"] == "basic"
    with pytest.raises(ValueError, match="interval must be one of"):
        evaluation.frechet_distance_bootstrap(features, stats, 20, interval="percentile")
