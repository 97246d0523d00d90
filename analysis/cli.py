"""Shared pieces of the analysis command lines (absl flags are defined only when run as main)."""
from __future__ import annotations

from subspace_lib import parse_int_list
from utils import UsageError, run_entry_point

# The analyses' command lines report bad input as every entry script does.
run = run_entry_point


def parse_sizes(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, e.g. '16,8'."""
    sizes = list(parse_int_list(text, flag.lstrip("-")))
    if any(s <= 0 for s in sizes):
        raise UsageError(f"{flag} '{text}' must list positive sizes, e.g. 16,8.")
    return sizes


def check_full_size(config) -> None:
    """The analyses need images at the dataset's native size, not subspace coordinates."""
    import datasets

    native = datasets.native_image_size(config)
    if int(config.data.image_size) != native:
        raise UsageError(
            f"config.data.image_size is {config.data.image_size} but the dataset's images are "
            f"{native}x{native}: the analyses need the full-size images, so set "
            f"--config.data.image_size {native}.")
