"""Shared pieces of the analysis command lines (absl flags are defined only when run as main)."""
from __future__ import annotations

import cli
from cli import UsageError, run_entry_point

# The analyses' command lines report bad input as every entry script does.
run = run_entry_point


def parse_sizes(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, e.g. '16,8' (`cli.parse_sizes` as a list)."""
    return list(cli.parse_sizes(text, flag))


def check_full_size(config) -> None:
    """The analyses need images at the dataset's native size, not subspace coordinates."""
    import datasets

    native = datasets.native_image_size(config)
    if int(config.data.image_size) != native:
        raise UsageError(
            f"config.data.image_size is {config.data.image_size} but the dataset's images are "
            f"{native}x{native}: the analyses need the full-size images, so set "
            f"--config.data.image_size {native}.")
