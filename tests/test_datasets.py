"""Data scalers and the dataset backends (built-in, NumPy, image folder, TFDS when installed)."""
from __future__ import annotations

import importlib.util
import itertools
import os
from unittest import mock

import ml_collections
import numpy as np
import pytest
import torch

import datasets
from subspace_lib import downsample, project, upsample

HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None


def make_config(dataset="BUILTIN", image_size=32, *, root=None, train_batch=8, eval_batch=16,
                seed=0, random_flip=False, centered=False, num_channels=3, **data):
    return ml_collections.ConfigDict({
        "data": {"dataset": dataset, "image_size": image_size, "num_channels": num_channels,
                 "centered": centered, "random_flip": random_flip, "root": root, **data},
        "training": {"batch_size": train_batch},
        "eval": {"batch_size": eval_batch},
        "seed": seed,
    })


def tiny_images(n=10, size=8, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def as_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------------------------
# Scalers.

@pytest.mark.parametrize("centered, expected", [(True, [-1.0, 0.0, 1.0]), (False, [0, 0.5, 1])])
def test_scaler_and_inverse(centered, expected):
    config = make_config(centered=centered)
    scaler = datasets.get_data_scaler(config)
    inverse = datasets.get_data_inverse_scaler(config)
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(scaler(x), torch.tensor(expected))
    y = torch.rand(2, 3, 4, 4)
    assert torch.allclose(inverse(scaler(y)), y, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The built-in dataset.

def test_builtin_shapes_range_and_size():
    train_ds, eval_ds, info = datasets.get_dataset(make_config(), evaluation=True)
    arrays = datasets.builtin_arrays()
    assert 2000 <= len(arrays["train_images"]) <= 10000
    assert len(arrays["test_images"]) >= 200
    assert info.native_size == 32
    batch = next(iter(train_ds))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    # One evaluation pass covers every test crop exactly once (the last batch is partial).
    images = torch.cat([b["image"] for b in eval_ds])
    assert len(images) == len(arrays["test_images"])
    assert len(eval_ds) == -(-len(images) // 16)
    expected = as_nchw(arrays["test_images"]).flatten(1)
    assert torch.equal(images.flatten(1).sort(0).values, expected.sort(0).values)


def test_builtin_train_and_test_regions_do_not_overlap():
    arrays = datasets.builtin_arrays()
    for photo in range(len(datasets.BUILTIN_PHOTOS)):
        train = arrays["train_boxes"][arrays["train_labels"] == photo]
        test = arrays["test_boxes"][arrays["test_labels"] == photo]
        assert len(train) > 0
        if len(test):
            # Every test footprint lies right of every training footprint.
            assert test[:, 1].min() >= train[:, 3].max()


def test_builtin_crops_are_area_downscaled_photo_regions():
    import skimage.data

    arrays = datasets.builtin_arrays()
    for index in (0, len(arrays["test_images"]) // 2, len(arrays["test_images"]) - 1):
        photo = getattr(skimage.data, datasets.BUILTIN_PHOTOS[arrays["test_labels"][index]])()
        top, left, bottom, right = arrays["test_boxes"][index]
        factor = (bottom - top) // 32
        region = photo[top:bottom, left:right, :3].astype(np.float64)
        expected = np.round(region.reshape(32, factor, 32, factor, 3).mean(axis=(1, 3)))
        assert np.array_equal(arrays["test_images"][index], expected.astype(np.uint8))


def test_builtin_is_cached_and_read_only():
    assert datasets.builtin_arrays() is datasets.builtin_arrays()
    with pytest.raises(ValueError):
        datasets.builtin_arrays()["train_images"][0, 0, 0, 0] = 1


def first_batches(config, n=3, **kwargs):
    train_ds, _, _ = datasets.get_dataset(config, **kwargs)
    return list(itertools.islice(iter(train_ds), n))


def test_seeded_shuffling_is_reproducible_and_seed_dependent():
    same = [first_batches(make_config(seed=3)) for _ in range(2)]
    for a, b in zip(*same):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # Re-iterating the same dataset object restarts the same sequence.
    train_ds, _, _ = datasets.get_dataset(make_config(seed=3))
    assert torch.equal(next(iter(train_ds))["image"], same[0][0]["image"])
    other = first_batches(make_config(seed=4))
    assert not torch.equal(other[0]["image"], same[0][0]["image"])


def numpy_config(tmp_path, images, labels=None, **kwargs):
    path = tmp_path / "tiny.npz"
    np.savez(path, images=images, labels=np.arange(len(images)) if labels is None else labels)
    return make_config("NUMPY", images.shape[1], root=str(path), **kwargs)


def test_training_repeats_forever_and_reshuffles_each_epoch(tmp_path):
    images = tiny_images(10)
    config = numpy_config(tmp_path, images, train_batch=3, test_fraction=0.2)
    train_ds, _, local = datasets.get_dataset(config)
    assert len(local.train) == 8
    labels = torch.cat([b["label"] for b in itertools.islice(iter(train_ds), 16)])  # 6 epochs
    epochs = labels.reshape(6, 8)
    for epoch in epochs:  # every epoch holds each training image once
        assert sorted(epoch.tolist()) == sorted(local.train.indices.tolist())
    assert len({tuple(e.tolist()) for e in epochs}) > 1
    with pytest.raises(TypeError):
        len(train_ds)


def test_random_flips(tmp_path):
    images = tiny_images(12)
    config = numpy_config(tmp_path, images, random_flip=True, train_batch=100, test_fraction=0.5)
    batch = next(iter(datasets.get_dataset(config)[0]))
    originals = as_nchw(images)[batch["label"]]
    flipped = torch.tensor([torch.equal(x, o.flip(-1)) for x, o in zip(batch["image"], originals)])
    kept = torch.tensor([torch.equal(x, o) for x, o in zip(batch["image"], originals)])
    assert torch.all(flipped | kept) and flipped.any() and kept.any()
    # Evaluation never flips.
    eval_batch = next(iter(datasets.get_dataset(config, evaluation=True)[0]))
    assert torch.equal(eval_batch["image"], as_nchw(images)[eval_batch["label"]])


@pytest.mark.parametrize("size", [16, 8])
def test_subspace_sizes_are_orthonormal_downsampling(size):
    k = {16: 1, 8: 2}[size]
    full = first_batches(make_config(image_size=32, random_flip=True, seed=1), n=2)
    small = first_batches(make_config(image_size=size, random_flip=True, seed=1), n=2)
    for f, s in zip(full, small):
        assert s["image"].shape == (8, 3, size, size)
        assert torch.allclose(s["image"], downsample(f["image"], k), atol=1e-6)
        assert s["image"].max() <= 2**k
        # D^k x are coordinates of the projection: |U D x| = |D x| and U D x = block means.
        lifted = upsample(s["image"], k)
        assert torch.allclose(lifted.norm(), s["image"].norm(), rtol=1e-5)
        assert torch.allclose(lifted, project(f["image"], k), atol=1e-6)
        block = 2**k
        means = f["image"].unfold(2, block, block).unfold(3, block, block).mean(dim=(-1, -2))
        assert torch.allclose(lifted[..., ::block, ::block], means, atol=1e-6)


def test_uniform_dequantization(tmp_path):
    images = tiny_images(8)
    config = numpy_config(tmp_path, images, test_fraction=0.5, eval_batch=8)
    _, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
    batch = next(iter(eval_ds))
    levels = as_nchw(images)[batch["label"]] * 255
    offsets = batch["image"] * 256 - levels
    assert offsets.min() >= 0 and offsets.max() < 1 and offsets.std() > 0.2
    again = next(iter(datasets.get_dataset(config, uniform_dequantization=True,
                                           evaluation=True)[1]))
    assert torch.equal(batch["image"], again["image"])


def test_dequantized_subspace_batch_is_downsampled_dequantized_image(tmp_path):
    images = tiny_images(8)
    full = numpy_config(tmp_path, images, test_fraction=0.5, seed=5)
    small = make_config("NUMPY", 4, root=full.data.root, test_fraction=0.5, seed=5)
    a = next(iter(datasets.get_dataset(full, uniform_dequantization=True)[0]))
    b = next(iter(datasets.get_dataset(small, uniform_dequantization=True)[0]))
    assert torch.allclose(b["image"], downsample(a["image"], 1), atol=1e-6)


# --------------------------------------------------------------------------------------------
# NumPy and image-folder backends.

def test_numpy_npy_split_is_deterministic_and_disjoint(tmp_path):
    images = tiny_images(20)
    np.save(tmp_path / "faces.npy", images)
    config = make_config("NUMPY", 8, root=str(tmp_path / "faces.npy"), test_fraction=0.25,
                         eval_batch=64)
    train_ds, eval_ds, local = datasets.get_dataset(config, evaluation=True)
    train = torch.cat([b["image"] for b in train_ds])
    test = torch.cat([b["image"] for b in eval_ds])
    assert (len(train), len(test)) == (15, 5) and "label" not in next(iter(eval_ds))
    assert set(local.train.indices) | set(local.test.indices) == set(range(20))
    assert not set(local.train.indices) & set(local.test.indices)
    expected = as_nchw(images[local.test.indices]).flatten(1).sort(0).values
    assert torch.equal(test.flatten(1).sort(0).values, expected)
    # The split does not depend on the run seed.
    config.seed = 99
    assert np.array_equal(datasets.get_dataset(config)[2].test.indices, local.test.indices)
    assert datasets.dataset_name(config) == "faces"


def test_numpy_separate_train_and_test_files(tmp_path):
    np.save(tmp_path / "train.npy", tiny_images(6, seed=1))
    np.save(tmp_path / "test.npy", tiny_images(3, seed=2))
    config = make_config("NUMPY", 8, root=str(tmp_path), eval_batch=10)
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    assert len(next(iter(train_ds))["image"]) == 6
    test = next(iter(eval_ds))["image"]
    assert torch.equal(test.flatten(1).sort(0).values,
                       as_nchw(tiny_images(3, seed=2)).flatten(1).sort(0).values)


def test_folder_backend_reads_pngs(tmp_path):
    from PIL import Image

    images = tiny_images(6)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"img_{i}.png")
    config = make_config("FOLDER", 4, root=str(tmp_path), test_fraction=0.5, eval_batch=10)
    train_ds, eval_ds, local = datasets.get_dataset(config, evaluation=True)
    assert local.native_size == 8
    batch = next(iter(eval_ds))["image"]
    files = [int(p.stem.split("_")[1]) for p in local.test.files]
    expected = downsample(as_nchw(images[files]), 1)
    assert torch.allclose(batch.flatten(1).sort(0).values, expected.flatten(1).sort(0).values,
                          atol=1e-6)


def test_folder_grayscale(tmp_path):
    from PIL import Image

    for i, image in enumerate(tiny_images(4, channels=1)):
        Image.fromarray(image[..., 0]).save(tmp_path / f"{i}.png")
    config = make_config("FOLDER", 8, root=str(tmp_path), num_channels=1, test_fraction=0.5)
    assert next(iter(datasets.get_dataset(config)[0]))["image"].shape == (8, 1, 8, 8)


# --------------------------------------------------------------------------------------------
# Errors.

def test_folder_rejects_non_square_or_mixed_sizes(tmp_path):
    from PIL import Image

    Image.fromarray(tiny_images(1)[0]).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="b.png is 6x8 but the FOLDER backend needs square"):
        datasets.get_dataset(make_config("FOLDER", 8, root=str(tmp_path)))
    os.remove(tmp_path / "b.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="square images of one size"):
        datasets.get_dataset(make_config("FOLDER", 8, root=str(tmp_path)))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'IMAGENET'.*choose one of"):
        datasets.get_dataset(make_config("IMAGENET"))
    with pytest.raises(ValueError, match="config.data.root, which is not set"):
        datasets.get_dataset(make_config("NUMPY"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.get_dataset(make_config("FOLDER", root=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="No image files"):
        datasets.get_dataset(make_config("FOLDER", root=str(tmp_path)))
    for size in (24, 64):
        with pytest.raises(ValueError, match=f"image_size {size} is not the native size 32.*"
                                             "choose one of 32, 16, 8, 4, 2, 1"):
            datasets.get_dataset(make_config(image_size=size))
    np.save(tmp_path / "float.npy", np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="needs uint8 images"):
        datasets.get_dataset(make_config("NUMPY", 8, root=str(tmp_path / "float.npy")))
    with pytest.raises(ValueError, match="Batch size must be positive"):
        datasets.get_dataset(make_config(train_batch=0))


@pytest.mark.skipif(HAS_TFDS, reason="tensorflow_datasets is installed")
def test_tfds_dataset_without_tensorflow_says_how_to_install():
    with pytest.raises(ModuleNotFoundError, match="requirements-tf.txt"):
        datasets.get_dataset(make_config("CIFAR10"))


# --------------------------------------------------------------------------------------------
# TensorFlow Datasets (only when installed; never downloads).

tfds_only = pytest.mark.skipif(not HAS_TFDS, reason="tensorflow_datasets is not installed")


@tfds_only
def test_tfds_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    config = make_config("CIFAR10", tfds_data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared.*tfds build cifar10"):
        datasets.get_dataset(config)


@tfds_only
@pytest.mark.parametrize("name, native", [("CIFAR10", 32), ("CELEBA", 64)])
def test_tfds_mock_data(name, native):
    import tensorflow_datasets as tfds

    config = make_config(name, native // 2, eval_batch=4, random_flip=True)
    with tfds.testing.mock_data(num_examples=8), \
            mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True):
        train_ds, eval_ds, builder = datasets.get_dataset(config, evaluation=True)
        batches = list(eval_ds)
    assert isinstance(builder, tfds.core.DatasetBuilder)
    assert sum(len(b["image"]) for b in batches) == 8
    image = batches[0]["image"]
    assert image.shape == (4, 3, native // 2, native // 2) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 2
    assert ("label" in batches[0]) == (name == "CIFAR10")


def write_fake_cifar(folder, train_per_file=4, test_count=6):
    """CIFAR-10 binary files: records of 1 label byte + 3072 image bytes (CHW)."""
    rng = np.random.default_rng(0)
    base = folder / "cifar-10-batches-bin"
    base.mkdir(parents=True)
    (base / "batches.meta.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    written = {}
    for name, count in [(f"data_batch_{i}.bin", train_per_file) for i in range(1, 6)] + [
            ("test_batch.bin", test_count)]:
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(count, -1)], axis=1)
        (base / name).write_bytes(records.tobytes())
        written[name] = (labels, images)
    return written


@tfds_only
def test_tfds_cifar10_prepared_offline_from_fake_files(tmp_path):
    import tensorflow_datasets as tfds

    written = write_fake_cifar(tmp_path / "download")
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           return_value=str(tmp_path / "download")):
        tfds.builder("cifar10", data_dir=str(tmp_path / "data")).download_and_prepare()
    config = make_config("CIFAR10", 16, eval_batch=4, tfds_data_dir=str(tmp_path / "data"))
    _, eval_ds, builder = datasets.get_dataset(config, evaluation=True)
    assert builder.is_prepared()
    batches = list(eval_ds)
    images = torch.cat([b["image"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    test_labels, test_images = written["test_batch.bin"]
    expected = downsample(torch.from_numpy(test_images).float() / 255.0, 1)
    order = [int(np.flatnonzero(np.isclose(expected.flatten(1).sum(1), s, atol=1e-3))[0])
             for s in images.flatten(1).sum(1).tolist()]
    assert sorted(order) == list(range(len(test_images)))
    assert torch.allclose(images, expected[order], atol=1e-6)
    assert torch.equal(labels, torch.from_numpy(test_labels.astype(np.int64))[order])
    # The training iterator repeats forever with full batches.
    train_ds = datasets.get_dataset(config)[0]
    assert all(len(b["image"]) == 8 for b in itertools.islice(iter(train_ds), 5))


@tfds_only
def test_tfrecords_celebahq_format(tmp_path):
    import tensorflow as tf

    images = tiny_images(6, size=8)
    path = tmp_path / "celebahq-r03.tfrecords"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in images:  # stored CHW with its shape, as the CelebA-HQ/FFHQ files
            chw = np.ascontiguousarray(image.transpose(2, 0, 1))
            feature = {
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=chw.shape)),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[chw.tobytes()]))}
            writer.write(tf.train.Example(
                features=tf.train.Features(feature=feature)).SerializeToString())
    config = make_config("CelebAHQ", 4, eval_batch=6, tfrecords_path=str(path))
    assert datasets.native_image_size(config) == 8
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    batch = next(iter(eval_ds))["image"]
    expected = downsample(as_nchw(images), 1)
    assert torch.allclose(batch.flatten(1).sort(0).values, expected.flatten(1).sort(0).values,
                          atol=1e-6)
    config.data.tfrecords_path = str(tmp_path / "missing.tfrecords")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        datasets.get_dataset(config)
