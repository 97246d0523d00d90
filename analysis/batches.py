"""Image batches from any dataset the analyses accept (the one home of that conversion)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


def as_image_batch(batch) -> torch.Tensor:
    """A batch as a float tensor [B, C, H, W]: accepts tensors, arrays and {"image": ...} dicts."""
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(
                f"Dataset batches that are dicts need an 'image' entry; got keys {sorted(batch)}.")
        batch = batch["image"]
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise ValueError(
            f"Dataset batches must be tensors, arrays or {{'image': ...}} dicts; got "
            f"{type(batch).__name__}.")
    if batch.dim() != 4:
        raise ValueError(
            f"Image batches must have shape [B, C, H, W]; got shape {tuple(batch.shape)}.")
    if not batch.is_floating_point():
        raise ValueError(
            f"Image batches must be floating point with pixels in [0, 1]; got {batch.dtype}.")
    return batch


# Slack for pixels that went through float arithmetic (dequantization, dtype conversion).
_RANGE_SLACK = 1e-5


def image_batches(dataset: Iterable, max_images: int | None = None) -> Iterator[torch.Tensor]:
    """Iterate over the [B, C, H, W] batches of `dataset`, stopping after `max_images` images,
    checking that pixels lie in [0, 1]."""
    if max_images is not None and max_images <= 0:
        raise ValueError(f"max_images must be positive; got {max_images}.")
    seen = 0
    for batch in dataset:
        images = as_image_batch(batch)
        low, high = float(images.min()), float(images.max())
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise ValueError(
                f"Images must have pixels in [0, 1] (got values in [{low:.3g}, {high:.3g}]): "
                "give the dataset at its full size, not subspace coordinates or scaled data.")
        if max_images is not None:
            images = images[: max_images - seen]
        if images.shape[0] == 0:
            continue
        seen += images.shape[0]
        yield images
        if max_images is not None and seen >= max_images:
            return
