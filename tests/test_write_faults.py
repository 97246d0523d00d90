"""A write that fails (disk full, no permission) stops the run with one sentence naming the file
and saying what is safe: a checkpoint write leaves the last complete checkpoint loadable, a
sample write leaves the finished rounds, which a rerun keeps."""
import errno
import gc
import io
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run_lib import _config as tiny_config

import cli
import files
import run_lib
from models.checkpoints import restore_checkpoint
from sample_rounds import Round, RoundSampler


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
    assert str(meta) in err[0]
    monkeypatch.undo()
    # Every checkpoint on disk is the complete one from before, and no temporary is left.
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.pth")} == before
    assert not list(tmp_path.rglob("*.tmp"))
    state = run_lib.create_train_state(_config(1), torch.device("cpu"))
    assert int(restore_checkpoint(meta, state, "cpu")["step"]) == 2


def test_disk_full_before_the_first_checkpoint_does_not_claim_an_earlier_one(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(SystemExit) as exit_:
        cli.run_entry_point(run_lib.train, _config(1), tmp_path, progress=False)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "the disk is full" in err[0] and "no complete checkpoint had been written yet" in err[0]
    assert "intact" not in err[0]
    assert not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------
# A disk that fills up while sample files are written (files.atomic_write underneath).


class _FillingFile(io.FileIO):
    """A file on a disk with `room` bytes left: a write past it fails with ENOSPC, as the
    kernel's would."""

    room = 0

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > _FillingFile.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        _FillingFile.room -= size
        return super().write(data)


def _disk_fills_for(monkeypatch, full: Callable[[str], bool], room: int = 100) -> None:
    """Writes through `files.atomic_write` to a destination whose name `full(name)` accepts
    find only `room` bytes of space; other files are written normally."""
    names: dict[int, str] = {}
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        names[fd] = Path(path).name  # .NAME.<random>.tmp
        return fd, path

    def fdopen(fd, mode="r", *args, **kwargs):
        name = names.pop(fd, "")
        if not (name and full(name.split(".")[1] + "." + name.split(".")[2])):
            return real_fdopen(fd, mode, *args, **kwargs)
        _FillingFile.room = room
        raw = _FillingFile(fd, "w", closefd=True)
        buffered = io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(files.os, "fdopen", fdopen)


SETTINGS = {"command": "test", "seed": 3, "batch": 2}


def _sample(folder: Path, calls: list[int]):
    def draw(r: int, size: int) -> Round:
        calls.append(r)
        return Round(torch.randint(0, 256, (size, 2, 2, 3), dtype=torch.uint8).numpy())

    sampler = RoundSampler(folder, 6, 2, lambda r: 3 + r, SETTINGS,
                           output=folder.with_name(f"{folder.name}.npy"), image_shape=(2, 2, 3))
    return sampler.run(draw).samples


def _one_line_error(monkeypatch, capsys, body) -> str:
    # What Python prints as "Exception ignored in ..." (e.g. a half-written zip archive that
    # fails to close when it is collected), which pytest would otherwise swallow.
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with pytest.raises(SystemExit) as exit_:
        cli.run_entry_point(body)
    assert exit_.value.code == 1
    del exit_  # its exception chain holds the frames of the failed write
    gc.collect()
    assert not ignored, [(u.exc_value, u.object) for u in ignored]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_disk_full_while_sampling_names_the_file_and_keeps_the_finished_rounds(
        tmp_path, monkeypatch, capsys):
    expected = _sample(tmp_path / "whole", [])
    folder = tmp_path / "run"
    _disk_fills_for(monkeypatch, lambda name: name == "samples_1.npz")
    line = _one_line_error(monkeypatch, capsys, lambda: _sample(folder, []))
    assert line == (f"error: Cannot write {folder / 'samples_1.npz'}: the disk is full; the 1 "
                    f"rounds already in {folder} are complete and safe, so free space (or fix "
                    "the folder) and run the same command again to go on from there.")
    assert sorted(p.name for p in folder.iterdir()) == ["samples_0.npz"]
    monkeypatch.undo()
    calls = []
    np.testing.assert_array_equal(_sample(folder, calls), expected)
    assert calls == [1, 2]


def test_disk_full_writing_the_final_sample_file_keeps_every_round(
        tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    _disk_fills_for(monkeypatch, lambda name: name == "run.npy", room=150)
    line = _one_line_error(monkeypatch, capsys, lambda: _sample(folder, []))
    assert line == (f"error: Cannot write {tmp_path / 'run.npy'}: the disk is full; all 3 "
                    f"rounds are complete and safe in {folder} (nothing is drawn again), so "
                    "free space (or fix the folder) and run the same command again to go on "
                    "from there.")
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "run.npy").exists()
    monkeypatch.undo()
    calls = []
    samples = _sample(folder, calls)
    assert calls == [] and len(samples) == 6
    np.testing.assert_array_equal(np.load(tmp_path / "run.npy"), samples)
