"""Compatibility surface of the original `utils` module, and command-line error plumbing.

The original names stay importable from here, each with its one home elsewhere:
- atomic file writes and image grids live in `files` (`atomic_write`, `atomic_torch_save`,
  `atomic_numpy_save`, `atomic_write_text`, `make_image_grid`, `save_image_grid`);
- the checkpoint format and its errors live in `models.checkpoints` (`save_checkpoint`,
  `restore_checkpoint`, `load_model_weights`, `check_state_dict`, `load_state_dict_strict`,
  `unwrap_model`, `CheckpointError`, `CorruptCheckpointError`, `StateDictMismatchError`).
Library code imports those homes; only entry scripts and notebooks need this module.
"""
from __future__ import annotations

import logging
import os

from files import (  # noqa: F401  (re-exported)
    atomic_numpy_save,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    make_image_grid,
    save_image_grid,
)
from models.checkpoints import (  # noqa: F401  (re-exported)
    _KEYS_SHOWN,
    _WRAPPER_PREFIX,
    CheckpointError,
    CorruptCheckpointError,
    StateDictMismatchError,
    _with_prefix,
    _without_prefix,
    check_state_dict,
    load_model_weights,
    load_state_dict_strict,
    restore_checkpoint,
    save_checkpoint,
    unwrap_model,
)

# --------------------------------------------------------------------------------------------
# Entry scripts: bad input is one sentence and a non-zero exit, never a traceback.

class UsageError(ValueError):
    """Bad command-line input."""


class ReportableError(RuntimeError):
    """A failure that is not a bug, reported to the user as one sentence (e.g. a diverged run)."""


USER_ERRORS = (ValueError, KeyError, FileNotFoundError, ReportableError)


def run_entry_point(body, *args, **kwargs) -> None:
    """Run an entry script's `body(*args, **kwargs)`. A user error (ValueError, KeyError,
    FileNotFoundError, ReportableError, checkpoint errors included) becomes `error: <sentence>`
    on stderr and exit status 1; SUBSPACE_DEBUG=1 shows the traceback instead. Under torchrun
    only rank 0 logs progress; the other ranks log warnings and errors."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger().setLevel(logging.WARNING)
    try:
        body(*args, **kwargs)
    except USER_ERRORS as error:
        if os.environ.get("SUBSPACE_DEBUG"):
            raise
        message = error.args[0] if error.args else repr(error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
