"""A checkpoint write that fails (disk full, no permission) stops training with one sentence and
leaves the last complete checkpoint loadable."""
import errno

import pytest
import torch
from test_run_lib import _config as tiny_config

import cli
import run_lib
from models.checkpoints import restore_checkpoint


def _config(n_iters: int):
    config = tiny_config()
    config.training.n_iters = n_iters
    config.training.snapshot_freq = 1
    config.training.snapshot_sampling = False
    return config


def _failing_save(error: BaseException):
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)  # the bytes reach the temporary file ...
        raise error  # ... then the disk fills up before the write completes

    return save


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 896"),
     "the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
])
def test_failed_checkpoint_write_is_one_sentence_and_keeps_last_checkpoint(
        tmp_path, monkeypatch, capsys, error, reason):
    run_lib.train(_config(1), tmp_path, progress=False)
    meta = tmp_path / "checkpoints-meta" / "checkpoint.pth"
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.pth")}
    monkeypatch.setattr(torch, "save", _failing_save(error))
    with pytest.raises(SystemExit) as exit_:
        cli.run_entry_point(run_lib.train, _config(3), tmp_path, progress=False)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: Cannot write checkpoint {tmp_path / 'checkpoints'}")
    assert reason in err[0] and "last complete checkpoint is intact" in err[0]
    monkeypatch.undo()
    # Every checkpoint on disk is the complete one from before, and no temporary is left.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.pth")} == before
    assert not list(tmp_path.rglob("*.tmp"))
    state = run_lib.create_train_state(_config(1), torch.device("cpu"))
    assert int(restore_checkpoint(meta, state, "cpu")["step"]) == 2
