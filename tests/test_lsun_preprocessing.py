"""LSUN and CelebA-HQ preprocessing: the original's operations in the original's order.

Original (score_sde `datasets.py`, subspace-diffusion fork): LSUN images are cropped to their
central square, resized to 256 with antialiased bicubic interpolation and cast back to uint8
(TF's truncating, wrapping cast), then pooled to the subspace size; at 128 px the short side is
resized (antialiased bilinear, in float) and the centre cropped. CelebA-HQ records are scaled to
[0, 1] and pooled. The NumPy/PIL forms are checked everywhere against closed forms; the TF forms
against them when TensorFlow is installed (`make test-tf`).
"""
import importlib.util

import ml_collections
import numpy as np
import pytest
import torch

import datasets

HAS_TF = importlib.util.find_spec("tensorflow") is not None
tf_only = pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed (make test-tf)")


def test_tf_cast_truncates_and_wraps():
    # Values of TF's own documentation of the overflow (bicubic overshoot cast to uint8).
    values = np.array([-22.500004, -21.32353, 52.526054, 201.29752, 276.32355, 277.50006, 0.99,
                       255.99])
    assert datasets.tf_cast_to_uint8(values).tolist() == [234, 235, 52, 201, 20, 21, 0, 255]


def _ramp(height, width, slope=3.0, start=10.0):
    """uint8 HWC image whose value grows linearly with the column: start + slope * column."""
    row = start + slope * np.arange(width)
    return np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=-1).astype(np.uint8)


def test_lsun_crop_resize_crops_the_centre_then_resizes_bicubic():
    # 24 x 41: the central square is columns 8..31 ((41 - 24) // 2 = 8); shrinking it by 2 puts
    # output column j at crop column 2 j + 0.5. Cubic interpolation reproduces a linear ramp, so
    # away from the borders the value is 10 + 3 (8.5 + 2 j) = 35.5 + 6 j, truncated to 35 + 6 j.
    image = _ramp(24, 41)
    out = datasets.lsun_crop_resize(image, 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.uint8
    interior = range(2, 10)
    assert all(np.all(out[:, j] == 35 + 6 * j) for j in interior)
    # The rows are all alike, as the image is.
    assert np.all(out == out[:1])


def test_lsun_crop_resize_keeps_the_wrapped_overshoot():
    # A hard edge overshoots below 0 and above 255 with the bicubic kernel; the original's cast
    # wraps those values around instead of clipping them.
    image = np.zeros((16, 16, 3), np.uint8)
    image[:, 8:] = 255
    out = datasets.lsun_crop_resize(image, 8)
    from PIL import Image

    resized = datasets._pil_resize(image, 8, 8, Image.BICUBIC)
    assert resized.min() < -1 and resized.max() > 256
    np.testing.assert_array_equal(out, datasets.tf_cast_to_uint8(resized))
    assert not np.array_equal(out, np.clip(np.trunc(resized), 0, 255).astype(np.uint8))


def test_lsun_128_resizes_the_short_side_then_crops():
    # 24 x 40 -> 12 x 20 (antialiased bilinear reproduces the ramp away from the borders), then
    # the central 12 columns 4..15: output column j sits at input column 2 (4 + j) + 0.5.
    image = _ramp(24, 40)
    out = datasets.lsun_resize_small_crop(image, 12)
    assert out.shape == (12, 12, 3) and out.dtype == np.float32
    for j in range(1, 11):
        expected = (10 + 3 * (2 * (4 + j) + 0.5)) / 255
        assert np.allclose(out[:, j], expected, atol=1e-5), j


def _lsun_config(size, **data):
    return ml_collections.ConfigDict({"data": {"dataset": "LSUN", "image_size": size,
                                               "category": "church_outdoor", **data}})


def test_lsun_128_path_is_the_original_unless_asked():
    assert datasets.lsun_resizes_short_side(_lsun_config(128))
    assert not datasets.lsun_resizes_short_side(_lsun_config(128, lsun_128_subspace=True))
    assert not datasets.lsun_resizes_short_side(_lsun_config(256))
    assert not datasets.lsun_resizes_short_side(_lsun_config(64))


def test_celebahq_batches_are_the_originals_pooled_images():
    # The fork: convert_image_dtype (x / 255), then avg_pool(k) * k for 256 / size = k.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    transform = datasets.BatchTransform(image_size=4, random_flip=False,
                                        uniform_dequantization=False)
    batch = transform(images, None, torch.Generator().manual_seed(0))["image"]
    pooled = (images / 255.0).reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)) * 4
    np.testing.assert_allclose(batch.permute(0, 2, 3, 1).numpy(), pooled, atol=1e-6)


@tf_only
def test_tf_lsun_ops_are_the_original_ops_and_match_the_numpy_forms():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (37, 52, 3), dtype=np.uint8)
    image[:, 20:] = np.clip(image[:, 20:].astype(int) + 120, 0, 255)  # edges that overshoot
    ours = datasets._tfds_native_op(tf, "LSUN")(tf.constant(image)).numpy()
    # The original crop_resize, written out.
    crop = image[:, (52 - 37) // 2:(52 + 37) // 2]
    original = tf.cast(tf.image.resize(crop, size=(256, 256), antialias=True,
                                       method=tf.image.ResizeMethod.BICUBIC), tf.uint8).numpy()
    np.testing.assert_array_equal(ours, original)
    numpy_form = datasets.lsun_crop_resize(image, 256)
    distance = np.abs(ours.astype(int) - numpy_form.astype(int))
    distance = np.minimum(distance, 256 - distance)  # a wrapped value is one level away
    assert distance.max() <= 1 and np.mean(distance == 0) > 0.99

    small = datasets._tfds_native_op(tf, "LSUN", 128)(tf.constant(image)).numpy()
    np.testing.assert_allclose(small, datasets.lsun_resize_small_crop(image, 128), atol=1e-4)
