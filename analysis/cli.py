"""Shared pieces of the analysis command lines (absl flags are defined only when run as main)."""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad command-line input."""


def parse_sizes(text: str, flag: str) -> list[int]:
    """Comma-separated positive integers, e.g. '16,8'."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(
            f"{flag} '{text}' is not a comma-separated list of sizes, e.g. 16,8.") from None
    if not sizes or any(s <= 0 for s in sizes):
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


def run(body: Callable[[], None]) -> None:
    """Run `body`, turning bad input into one line on stderr and exit status 1.

    Set SUBSPACE_DEBUG=1 to see the traceback instead.
    """
    from utils import CheckpointError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        body()
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as error:
        if os.environ.get("SUBSPACE_DEBUG"):
            raise
        message = error.args[0] if error.args else repr(error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
