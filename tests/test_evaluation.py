"""FID, Inception score, KID (vs closed forms, and vs TF-GAN when installed), the proxy FID,
statistics files and the statistics command line."""
from __future__ import annotations

import importlib.util
import itertools
import logging
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import scipy.linalg
import torch
from script_runner import run_python

import datasets
import evaluation

ROOT = Path(__file__).resolve().parents[1]
HAS_TFGAN = importlib.util.find_spec("tensorflow_gan") is not None
HAS_HUB = importlib.util.find_spec("tensorflow_hub") is not None
tf_only = pytest.mark.skipif(not HAS_TFGAN, reason="tensorflow_gan is not installed")


def make_config(dataset="BUILTIN", image_size=32, **data):
    return ml_collections.ConfigDict({
        "data": {"dataset": dataset, "image_size": image_size, "num_channels": 3,
                 "centered": False, "random_flip": False, "root": None, **data},
        "training": {"batch_size": 8}, "eval": {"batch_size": 64}, "seed": 0})


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --------------------------------------------------------------------------------------------
# FID.

def test_fid_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((50, 6))
    assert abs(evaluation.frechet_distance_from_activations(acts, acts)) < 1e-9
    mu, sigma = rng.standard_normal(6), random_spd(rng, 6)
    assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fid_of_gaussians_equals_closed_form():
    rng = np.random.default_rng(1)
    # Commuting (diagonal) covariances: |m1 - m2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    m1, m2 = rng.standard_normal(4), rng.standard_normal(4)
    s1, s2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert np.isclose(evaluation.frechet_distance(m1, np.diag(s1), m2, np.diag(s2)), expected,
                      rtol=1e-10)
    # General covariances: Tr(S1 + S2 - 2 sqrtm(S1 S2)).
    c1, c2 = random_spd(rng, 5), random_spd(rng, 5)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = (np.sum((m1 - m2) ** 2) + np.trace(c1 + c2)
                - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)
    assert np.isclose(evaluation.frechet_distance(m1, c1, m2, c2), expected, rtol=1e-8)


def test_fid_from_activations_uses_unbiased_covariance():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((30, 3)), rng.standard_normal((40, 3)) * 2 + 1
    expected = evaluation.frechet_distance(a.mean(0), np.cov(a.T, ddof=1),
                                           b.mean(0), np.cov(b.T, ddof=1))
    assert np.isclose(evaluation.frechet_distance_from_activations(a, b), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="Mismatched statistics"):
        evaluation.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------------------------
# Inception score.

def test_inception_score_of_uniform_logits_is_one():
    assert np.isclose(evaluation.inception_score_from_logits(np.zeros((20, 1008))), 1.0)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_inception_score_of_distinct_one_hot_logits_is_number_of_classes(num_splits):
    logits = np.tile(200.0 * np.eye(10), (4, 1))  # 40 confident predictions, 10 classes evenly
    assert np.isclose(evaluation.inception_score_from_logits(logits, num_splits), 10.0,
                      rtol=1e-9)


def test_inception_score_of_two_classes_closed_form():
    # p(y|x) one-hot on class 0 for 3 samples, class 1 for 1: exp(H(p(y))) = exp(-sum q log q).
    logits = np.array([[50.0, 0], [50, 0], [50, 0], [0, 50]])
    q = np.array([0.75, 0.25])
    assert np.isclose(evaluation.inception_score_from_logits(logits),
                      np.exp(-np.sum(q * np.log(q))), rtol=1e-9)


# --------------------------------------------------------------------------------------------
# KID.

def kid_by_definition(real, fake):
    """Unbiased MMD^2 of one block, by explicit sums over pairs."""
    d = real.shape[1]

    def k(x, y):
        return (x @ y / d + 1) ** 3

    m, n = len(real), len(fake)
    rr = sum(k(real[i], real[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    gg = sum(k(fake[i], fake[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    rg = sum(k(x, y) for x in real for y in fake) / (m * n)
    return rr + gg - 2 * rg


def test_kid_hand_computed_case():
    # k(x, y) = (xy + 1)^3 in one dimension: rr = k(0,1) = 1, gg = k(1,2) = 27,
    # rg = (1 + 1 + 8 + 27) / 4, so KID = 1 + 27 - 2 * 9.25 = 9.5.
    value, std = evaluation.kernel_distance_from_activations([[0.0], [1.0]], [[1.0], [2.0]],
                                                             return_std=True)
    assert np.isclose(value, 9.5) and np.isnan(std)


def test_kid_blocks_follow_tfgan_partition():
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((10, 4)), rng.standard_normal((7, 4)) + 0.5
    assert np.isclose(evaluation.kernel_distance_from_activations(real, fake),
                      kid_by_definition(real, fake), rtol=1e-12)
    # ceil(10 / 4) = 3 blocks: real sizes 3, 3, 4 and fake sizes 2, 2, 3 (larger blocks last).
    estimates = [kid_by_definition(real[a:b], fake[c:e])
                 for (a, b), (c, e) in zip([(0, 3), (3, 6), (6, 10)], [(0, 2), (2, 4), (4, 7)])]
    value, std = evaluation.kernel_distance_from_activations(real, fake, max_block_size=4,
                                                             return_std=True)
    assert np.isclose(value, np.mean(estimates), rtol=1e-12)
    assert np.isclose(std, np.std(estimates, ddof=1) / np.sqrt(3), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples per block"):
        evaluation.kernel_distance_from_activations(real, fake[:3], max_block_size=4)


@tf_only
def test_metrics_equal_tfgan():
    import tensorflow as tf
    import tensorflow_gan as tfgan

    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 16))
    fake = rng.standard_normal((260, 16)) * 1.3 + 0.2
    fid_tf = tfgan.eval.frechet_classifier_distance_from_activations(real, fake).numpy()
    assert np.isclose(evaluation.frechet_distance_from_activations(real, fake), fid_tf,
                      rtol=1e-8)
    logits = rng.standard_normal((100, 12)) * 3
    is_tf = tfgan.eval.classifier_score_from_logits(logits).numpy()
    assert np.isclose(evaluation.inception_score_from_logits(logits), is_tf, rtol=1e-10)
    kid_tf, std_tf = tfgan.eval.kernel_classifier_distance_and_std_from_activations(
        tf.constant(real), tf.constant(fake), max_block_size=64)
    kid, std = evaluation.kernel_distance_from_activations(real, fake, max_block_size=64,
                                                           return_std=True)
    assert np.isclose(kid, kid_tf.numpy(), rtol=1e-8) and np.isclose(std, std_tf.numpy(),
                                                                     rtol=1e-8)
    # float32 activations, as the original run_lib passed them.
    kid32 = tfgan.eval.kernel_classifier_distance_from_activations(
        tf.constant(real, tf.float32), tf.constant(fake, tf.float32)).numpy()
    assert np.isclose(evaluation.kernel_distance_from_activations(real, fake), kid32,
                      rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Images and the Inception wrapper.

def test_uint8_and_float_images_round_trip():
    u8 = np.random.default_rng(5).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    x = evaluation.to_float_nchw(u8)
    assert x.shape == (3, 3, 4, 4)
    assert np.array_equal(evaluation.to_uint8_nhwc(x), u8)
    assert evaluation.to_uint8_nhwc(u8) is u8
    with pytest.raises(ValueError, match="NCHW with 1 or 3 channels"):
        evaluation.to_uint8_nhwc(np.zeros((2, 4, 4, 3), np.float32))


def test_inception_unavailable_returns_none_with_one_logged_sentence(caplog, tmp_path):
    with caplog.at_level(logging.WARNING, logger="evaluation"):
        model = evaluation.get_inception_model(path=tmp_path / "no_such_module")
    assert model is None
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("Inception metrics skipped:")


@tf_only
def test_run_inception_feeds_scaled_nhwc_batches():
    import tensorflow as tf

    seen = []

    def fake_inception(x):  # stands in for the TF-Hub module, which cannot be downloaded here
        seen.append((tuple(x.shape), float(tf.reduce_min(x)), float(tf.reduce_max(x))))
        return {"pool_3": tf.reduce_mean(x, axis=(1, 2))[:, None, None, :],
                "logits": tf.reduce_max(x, axis=(1, 2))}

    images = np.zeros((5, 8, 8, 3), np.uint8)
    images[:, 0, 0] = 255
    out = evaluation.run_inception(images, fake_inception, batch_size=2)
    assert [s[0] for s in seen] == [(2, 8, 8, 3), (2, 8, 8, 3), (1, 8, 8, 3)]
    assert all(lo == -1.0 and hi == 1.0 for _, lo, hi in seen)
    assert out["pool_3"].shape == (5, 3) and out["logits"].shape == (5, 3)
    assert np.allclose(out["pool_3"], (1 - 63) / 64)
    # Metrics from those features; too few samples for KID's blocks give NaN, not an error.
    images = np.random.default_rng(9).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    data_pools = np.random.default_rng(10).standard_normal((3100, 3)).astype(np.float32)
    metrics = evaluation.inception_metrics(images, {"pool_3": data_pools}, fake_inception)
    features = evaluation.run_inception(images, fake_inception)
    assert np.isclose(metrics["fid"],
                      evaluation.frechet_distance_from_activations(data_pools, features["pool_3"]))
    assert np.isclose(metrics["inception_score"],
                      evaluation.inception_score_from_logits(features["logits"]))
    assert np.isnan(metrics["kid"])


# --------------------------------------------------------------------------------------------
# Proxy FID and statistics files.

def test_proxy_features_are_fixed_and_layout_independent():
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = evaluation.proxy_features(images)
    assert features.shape == (6, evaluation.PROXY_DIM) and features.dtype == np.float64
    assert np.array_equal(features, evaluation.proxy_features(images.clone()))
    u8 = evaluation.to_uint8_nhwc(images)
    assert np.allclose(evaluation.proxy_features(u8),
                       evaluation.proxy_features(evaluation.to_float_nchw(u8)))
    # Other sizes are resized to 32x32; grayscale is repeated to RGB.
    assert evaluation.proxy_features(torch.rand(2, 1, 16, 16)).shape == (2,
                                                                        evaluation.PROXY_DIM)


def test_proxy_statistics_streaming_equals_batch():
    images = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    acc = evaluation.ProxyStatistics()
    for chunk in images.split(7):
        acc.update(chunk)
    mu, sigma = acc.result()
    ref_mu, ref_sigma = evaluation.gaussian_statistics(evaluation.proxy_features(images))
    assert np.allclose(mu, ref_mu) and np.allclose(sigma, ref_sigma, atol=1e-10)
    stats = {"mu": mu, "sigma": sigma, "proxy_version": evaluation.PROXY_VERSION}
    assert abs(evaluation.proxy_fid(images, stats)) < 1e-6


def test_builtin_proxy_stats_file_is_current_and_separates_data_from_noise():
    stats = evaluation.load_dataset_stats(make_config(), "proxy")
    arrays = datasets.builtin_arrays()
    acc = evaluation.ProxyStatistics()
    acc.update(arrays["train_images"])
    mu, sigma = acc.result()
    assert int(stats["num_images"]) == len(arrays["train_images"])
    # Recomputed with the current code (float32 convolutions: thread counts differ at 1e-7).
    assert np.allclose(stats["mu"], mu, rtol=1e-5, atol=1e-5)
    assert np.allclose(stats["sigma"], sigma, rtol=1e-5, atol=1e-5)
    rng = np.random.default_rng(0)
    held_out = arrays["test_images"][rng.choice(len(arrays["test_images"]), 64, replace=False)]
    data_fid = evaluation.proxy_fid(held_out, stats)
    noise_fid = evaluation.proxy_fid(torch.rand(64, 3, 32, 32), stats)
    assert 0 < data_fid < noise_fid / 10


def test_stats_filenames_follow_the_original():
    assert evaluation.stats_filename(make_config("CIFAR10")) == "cifar10_stats.npz"
    assert evaluation.stats_filename(make_config("CIFAR10", 16)) == "cifar10_16_stats.npz"
    assert evaluation.stats_filename(make_config("CELEBA", 64)) == "celeba_stats.npz"
    lsun = make_config("LSUN", 256, category="church_outdoor")
    assert evaluation.stats_filename(lsun) == "lsun_church_outdoor_256_stats.npz"
    assert evaluation.stats_filename(make_config(), "proxy") == "builtin_proxy_stats.npz"
    with pytest.raises(ValueError, match="features must be one of 'inception', "):
        evaluation.stats_filename(make_config(), "clip")


def test_evaluate_samples_falls_back_and_never_raises_for_missing_stats(tmp_path, caplog):
    samples = np.random.default_rng(6).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    config = make_config()
    with pytest.raises(FileNotFoundError, match="compute_dataset_stats.py"):
        evaluation.load_dataset_stats(config, stats_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="evaluation"):
        assert evaluation.evaluate_samples(samples, config, stats_dir=tmp_path) is None
    stats = {"mu": np.zeros(evaluation.PROXY_DIM), "sigma": np.eye(evaluation.PROXY_DIM),
             "proxy_version": np.int64(evaluation.PROXY_VERSION)}
    np.savez(tmp_path / "builtin_proxy_stats.npz", **stats)
    np.savez(tmp_path / "builtin_stats.npz", pool_3=np.zeros((4, 2048), np.float32))
    metrics = evaluation.evaluate_samples(samples, config, stats_dir=tmp_path)
    assert set(metrics) == {"proxy_fid"}
    assert np.isclose(metrics["proxy_fid"], evaluation.proxy_fid(samples, stats))


def test_compute_stats_on_a_numpy_dataset(tmp_path):
    from compute_dataset_stats import compute_stats

    images = np.random.default_rng(7).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "tiny.npy", images)
    config = make_config("NUMPY", 8, root=str(tmp_path / "tiny.npy"), test_fraction=0.25)
    config.eval.batch_size = 4
    stats = compute_stats(config, "train", "proxy", max_images=7, progress=False)
    assert int(stats["num_images"]) == 7
    # The statistics see ordinary 8x8 images in [0, 1] (block means), not D^k coordinates.
    train_ds = datasets.get_dataset(config, evaluation=True)[0]
    seen = torch.cat([b["image"] for b in itertools.islice(iter(train_ds), 2)])[:7] / 2
    mu, sigma = evaluation.gaussian_statistics(evaluation.proxy_features(seen))
    assert np.allclose(stats["mu"], mu) and np.allclose(stats["sigma"], sigma, atol=1e-10)


def test_compute_dataset_stats_command_line(tmp_path):
    images = np.random.default_rng(8).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "tiny.npy", images)
    config_file = tmp_path / "tiny_config.py"
    config_file.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'data': {'dataset': 'NUMPY', 'image_size': 8, "
        f"'num_channels': 3, 'centered': False, 'random_flip': True, 'test_fraction': 0.3, "
        f"'root': '{tmp_path / 'tiny.npy'}'}}, 'training': {{'batch_size': 4}}, "
        "'eval': {'batch_size': 4}, 'seed': 0})\n")
    out = tmp_path / "stats" / "tiny_proxy_stats.npz"
    command = ["compute_dataset_stats.py", f"--config={config_file}",
               "--features=proxy", "--split=test", f"--out={out}", "--noprogress"]
    result = run_python(command, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    with np.load(out) as stats:
        assert int(stats["num_images"]) == 3 and stats["mu"].shape == (evaluation.PROXY_DIM,)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny_proxy_stats.npz"]
    bad = run_python(command[:-2] + ["--split=train", "--max_images=1", "--noprogress"],
                     cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "--max_images must be at least 2" in bad.stderr
