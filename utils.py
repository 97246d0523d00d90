"""Checkpoints, atomic file writes and image grids.

Every file the project writes goes through `atomic_write`: the content is written to a temporary
file in the destination folder and renamed over the destination, so an interrupted run never
leaves a half-written output behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)` through `atomic_write`."""
    import torch

    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_numpy_save(path: str | os.PathLike, **arrays) -> None:
    """Save arrays atomically: one array as `.npy` when the name ends so, else an `.npz`."""
    import numpy as np

    path = Path(path)
    with atomic_write(path, "wb") as handle:
        if path.suffix == ".npy":
            if len(arrays) != 1:
                raise ValueError(f"A .npy file holds one array; got {len(arrays)} for {path}.")
            np.save(handle, next(iter(arrays.values())))
        else:
            np.savez_compressed(handle, **arrays)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)
