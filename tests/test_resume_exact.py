"""Bit-identical resume: training killed with SIGKILL at several steps, once inside a checkpoint
write, and resumed each time ends with the parameters, EMA and optimizer state of an
uninterrupted run, bit for bit; in one process and in two under torchrun (gloo).

Run as a script, this file is `main.py` with a kill point (for the tests' subprocesses):
RESUME_KILL="step:K" kills the process (SIGKILL) inside training step K, after the gradients
and before the optimizer step; RESUME_KILL="write:NAME:K" kills it halfway through writing the
checkpoint file NAME that holds step K (half the bytes in the temporary file, not yet renamed).
A suffix "@R" kills rank R (default 0) only.
"""
import io
import logging
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from script_runner import start_python, worker_environment

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = "configs/builtin/subvp_ddpmpp_small.py"
N_ITERS = 9  # steps 0..9
# A tiny DDPM++ on 10 images of 16x16 (batches straddle epochs) at 8x8, with every random
# stream of training in use: shuffling, flips, dequantization noise, dropout, times and noise.
OVERRIDES = {
    "data.dataset": "NUMPY",
    "data.image_size": 8,
    "data.uniform_dequantization": True,
    "data.random_flip": True,
    "model.nf": 8,
    "model.dropout": 0.1,
    "model.memory_format": "contiguous",
    "model.num_scales": 4,
    "training.batch_size": 4,
    "training.n_iters": N_ITERS,
    "training.snapshot_freq": 4,
    "training.snapshot_freq_for_preemption": 2,
    "training.eval_freq": 3,
    "training.log_freq": 1,
    "optim.warmup": 3,
    "optim.lr": 1e-3,
    "eval.batch_size": 4,
}


def _write_images(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8))
    return path


def _start(workdir: Path, images: Path, kill: str = "", processes: int = 1):
    """Start this file as `main.py --mode train` with the kill point `kill` on one process, or
    on `processes` under torchrun."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", RESUME_KILL=kill)
    flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.root": images}.items()]
    command = [str(Path(__file__).resolve()), f"--config={CONFIG_FILE}", "--mode=train",
               f"--workdir={workdir}", "--progress=false", *flags]
    # The output goes to a file: a pipe nobody reads while another run is awaited could fill.
    log = workdir.parent / f"{workdir.name}-{len(list(workdir.parent.glob('*.log')))}.log"
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", *command]
        env = worker_environment(env)
    process = start_python(command, cwd=ROOT, log=log, env=env)
    process.log = log
    return process


def _finish(process) -> tuple[int, str]:
    """Wait for `process`; its return code and output."""
    process.wait(timeout=300)
    return process.returncode, process.log.read_text()


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_identical(a, b, where: str = "checkpoint") -> None:
    """Every tensor equal (torch.equal, same dtype), every other value equal, same structure."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), \
            f"{where}: differs by {(a.double() - b.double()).abs().max().item():.3g}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _meta(workdir: Path) -> Path:
    return workdir / "checkpoints-meta" / "checkpoint.pth"


def _compare_with_reference(reference: Path, killed: Path) -> None:
    """The killed and resumed run's checkpoints equal the uninterrupted run's, bit for bit."""
    assert not list(killed.rglob("*.tmp"))
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (killed / "checkpoints").iterdir()) == [
        "checkpoint_1.pth", "checkpoint_2.pth"]
    final = _load(_meta(reference))
    assert final["step"] == N_ITERS + 1
    start = _load(reference / "checkpoints" / "checkpoint_1.pth")  # step 4, for contrast
    assert not torch.equal(start["model"]["module.all_modules.0.weight"],
                           final["model"]["module.all_modules.0.weight"])
    _assert_identical(final, _load(_meta(killed)), "checkpoints-meta/checkpoint.pth")
    for name in names:
        _assert_identical(_load(reference / "checkpoints" / name),
                          _load(killed / "checkpoints" / name), name)


def test_stream_from_start_is_the_uninterrupted_stream(tmp_path):
    """Training batches from batch s equal batches s, s+1, ... of one iteration (epoch
    boundaries included), also for each rank's part of a two-way split."""
    import datasets
    from configs.builtin.subvp_ddpmpp_small import get_config

    config = get_config()
    config.data.update(dataset="NUMPY", root=str(_write_images(tmp_path / "images.npy")),
                       image_size=8, random_flip=True)
    config.training.batch_size = 4
    config.eval.batch_size = 4

    def batches(start=0, eval_start=0, shard=None, count=6):
        train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=True,
                                                    start=start, eval_start=eval_start,
                                                    shard=shard)
        take = [iter(train_ds), iter(eval_ds)]
        return [[next(it)["image"] for _ in range(count)] for it in take]

    (train, evals) = batches(count=9)
    later_train, later_eval = batches(start=5, eval_start=3)
    assert all(torch.equal(a, b) for a, b in zip(train[5:], later_train))
    assert all(torch.equal(a, b) for a, b in zip(evals[3:], later_eval))
    halves = [batches(start=5, shard=(rank, 2), count=4)[0] for rank in (0, 1)]
    for whole, first, second in zip(train[5:], *halves):
        assert torch.equal(whole[0::2], first) and torch.equal(whole[1::2], second)
    assert not torch.equal(train[0], train[5])


def _config(images: Path):
    """The config of the runs above, built in this process."""
    from configs.builtin.subvp_ddpmpp_small import get_config

    config = get_config()
    for key, value in {**OVERRIDES, "data.root": str(images)}.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    config.device = torch.device("cpu")
    return config


def test_killed_training_resumes_bit_for_bit(tmp_path, caplog):
    images = _write_images(tmp_path / "images.npy")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = _start(reference, images)
    # Killed inside step 4 (after its gradients): the preemption checkpoint of step 2 holds 3,
    # so steps 3 and 4 are taken again. Resumed, killed halfway through writing the
    # preemption checkpoint after step 6: the one of step 4 (5) stays, the half file is left.
    for kill, saved_step in (("step:4", 3), ("write:checkpoint.pth:7", 5)):
        code, log = _finish(_start(killed, images, kill))
        assert code == -signal.SIGKILL, log[-3000:]
        assert _load(_meta(killed))["step"] == saved_step
    assert list(_meta(killed).parent.glob(".checkpoint.pth.*.tmp")), "the kill hit the write"
    # Files of other names, which the removal of half-written checkpoints must leave alone.
    foreign = [_meta(killed).parent / "notes.tmp", _meta(killed).parent / ".other.pth.x.tmp"]
    for path in foreign:
        path.write_text("not ours")
    code, log = _finish(_start(killed, images))
    assert code == 0 and "Resuming training from step 5" in log, log[-3000:]
    assert "left by an interrupted checkpoint write" in log
    assert all(path.read_text() == "not ours" for path in foreign)
    for path in foreign:
        path.unlink()
    code, log = _finish(uninterrupted)
    assert code == 0, log[-3000:]
    _compare_with_reference(reference, killed)
    # Started again, the finished run says that it is complete and which checkpoints it has.
    import run_lib

    with caplog.at_level(logging.INFO, logger="run_lib"):
        run_lib.train(_config(images), killed, progress=False)
    assert "is complete" in caplog.text and "checkpoint_1.pth, checkpoint_2.pth" in caplog.text
    _assert_identical(_load(_meta(reference)), _load(_meta(killed)), "the complete run")


def test_killed_torchrun_pair_resumes_bit_for_bit(tmp_path):
    images = _write_images(tmp_path / "images.npy")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = _start(reference, images, processes=2)
    # Rank 1 killed inside step 4 (resume at 3), then rank 0 killed halfway through writing
    # the preemption checkpoint after step 6 (resume at 5); torchrun ends the other rank.
    for kill, saved_step in (("step:4@1", 3), ("write:checkpoint.pth:7@0", 5)):
        code, log = _finish(_start(killed, images, kill, processes=2))
        # torchrun reports the killed rank (exitcode -9) either as the first failure or, when
        # the other rank's failed collective ended it first, in its list of failures.
        assert code != 0 and re.search(r"exitcode\s*:\s*-9\b", log), log[-3000:]
        assert _load(_meta(killed))["step"] == saved_step
    assert list(_meta(killed).parent.glob(".checkpoint.pth.*.tmp")), "the kill hit the write"
    code, log = _finish(_start(killed, images, processes=2))
    assert code == 0 and "Resuming training from step 5" in log, log[-3000:]
    assert "left by an interrupted checkpoint write" in log
    # Only rank 0 logs the training loss, from the resumed step on: steps 5..9, once each.
    assert "step: 5, training_loss" in log and "step: 4, training_loss" not in log
    assert log.count("training_loss") == N_ITERS + 1 - 5
    code, log = _finish(uninterrupted)
    assert code == 0, log[-3000:]
    _compare_with_reference(reference, killed)


# ------------------------------------------------------------------------------------------------
# The script: main.py with a kill point.

def _kill_self() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill_point(spec: str) -> None:
    """Patch the training code so that this process kills itself at `spec` (see the module
    docstring)."""
    import losses
    import models.checkpoints as checkpoints
    from files import atomic_write

    kind, *where = spec.split(":")
    if kind == "step":
        kill_step = int(where[0])
        make_optimize_fn = losses.optimization_manager

        def optimization_manager(config):
            optimize_fn = make_optimize_fn(config)

            def killing_optimize_fn(optimizer, params, step, **kwargs):
                if step == kill_step:
                    _kill_self()
                return optimize_fn(optimizer, params, step, **kwargs)

            return killing_optimize_fn

        losses.optimization_manager = optimization_manager
    elif kind == "write":
        name, kill_step = where[0], int(where[1])
        save = checkpoints.atomic_torch_save

        def killing_save(obj, path):
            if Path(path).name == name and obj["step"] == kill_step:
                buffer = io.BytesIO()
                torch.save(obj, buffer)
                data = buffer.getvalue()
                with atomic_write(path, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                    _kill_self()
            save(obj, path)

        checkpoints.atomic_torch_save = killing_save
    else:
        raise ValueError(f"Unknown kill point {spec!r}: use step:K or write:NAME:K.")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import cli
    import main

    point, _, rank = os.environ.get("RESUME_KILL", "").partition("@")
    if point and os.environ.get("RANK", "0") == (rank or "0"):
        _install_kill_point(point)
    cli.start(main.main)
