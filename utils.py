"""Compatibility surface of the original `utils` module, for code written against the original.

The original names stay importable from here, each with its one home elsewhere:
- atomic file writes and image grids live in `files` (`atomic_write`, `atomic_torch_save`,
  `atomic_numpy_save`, `atomic_write_text`, `make_image_grid`, `save_image_grid`);
- the checkpoint format and its errors live in `models.checkpoints` (`save_checkpoint`,
  `restore_checkpoint`, `load_model_weights`, `check_state_dict`, `load_state_dict_strict`,
  `unwrap_model`, `CheckpointError`, `CorruptCheckpointError`, `StateDictMismatchError`);
- the entry scripts' error path lives in `cli` (`UsageError`, `run_entry_point`, `USER_ERRORS`)
  and `ReportableError` in `errors`.
Nothing in this repository imports this module except the test that checks these names.
"""
from __future__ import annotations

from cli import USER_ERRORS, ReportableError, UsageError, run_entry_point  # noqa: F401
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
