"""End-to-end training and evaluation through main.py and run_lib on the built-in dataset."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ml_collections import config_flags  # noqa: F401  (the CLI parses configs with it)
from script_runner import run_python

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "builtin" / "subvp_ddpmpp_small.py"

# A tiny network and schedule so that a step takes a fraction of a second on one core.
TINY = ["--config.model.nf", "8", "--config.model.num_scales", "4", "--config.data.image_size",
        "8", "--config.training.batch_size", "4", "--config.eval.batch_size", "4"]


def _main(workdir, *extra, mode="train", check=True, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(ROOT / "main.py"), "--config", str(CONFIG), "--mode", mode,
           "--workdir", str(workdir), "--progress=false", *TINY, *extra]
    result = run_python(cmd, cwd=ROOT, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"main.py failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _config():
    from configs.builtin import subvp_ddpmpp_small

    config = subvp_ddpmpp_small.get_config()
    config.model.nf = 8
    config.model.num_scales = 4
    config.data.image_size = 8
    config.training.batch_size = 4
    config.eval.batch_size = 4
    config.device = torch.device("cpu")
    return config


def test_train_end_to_end_writes_checkpoints_grid_and_events(tmp_path):
    _main(tmp_path, "--config.training.n_iters", "4", "--config.training.snapshot_freq", "2",
          "--config.training.log_freq", "1", "--config.training.eval_freq", "2",
          "--config.training.snapshot_freq_for_preemption", "2", "--snapshot_sampling")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint_1.pth", "checkpoint_2.pth"]
    ckpt = torch.load(tmp_path / "checkpoints" / "checkpoint_2.pth", weights_only=True)
    assert set(ckpt) == {"optimizer", "model", "ema", "step"} and ckpt["step"] == 5
    assert all(key.startswith("module.") for key in ckpt["model"])
    grid = tmp_path / "samples" / "iter_4" / "sample.png"
    assert grid.is_file() and grid.stat().st_size > 0
    samples = np.load(tmp_path / "samples" / "iter_4" / "sample.npy")
    assert samples.shape == (4, 8, 8, 3) and samples.dtype == np.uint8
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not list(tmp_path.rglob("*.tmp")), "no temporary files may be left behind"


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    import run_lib

    config = _config()
    config.training.update(n_iters=2, snapshot_sampling=False, snapshot_freq=2)
    run_lib.train(config, tmp_path, progress=False)
    before = (tmp_path / "checkpoints" / "checkpoint_1.pth").read_bytes()
    result = _main(tmp_path, "--config.training.n_iters", "40",
                   "--config.training.snapshot_sampling=false", "--config.optim.lr", "1e30",
                   "--config.optim.warmup", "0", "--config.optim.grad_clip", "-1",
                   "--config.training.snapshot_freq", "2",
                   "--config.training.snapshot_freq_for_preemption", "1000", check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: Training loss became") and "Traceback" not in result.stderr
    assert "last good checkpoint is kept" in last_line
    assert (tmp_path / "checkpoints" / "checkpoint_1.pth").read_bytes() == before
    for path in (tmp_path / "checkpoints").iterdir():
        model = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_evaluate_loss_and_resumable_sampling(tmp_path):
    import run_lib

    config = _config()
    config.training.n_iters = 1
    config.training.snapshot_sampling = False
    run_lib.train(config, tmp_path, progress=False)
    config = _config()
    config.eval.begin_ckpt = config.eval.end_ckpt = 1  # one step below snapshot_freq: the 1st
    config.eval.enable_sampling = True
    config.eval.num_samples = 6  # two rounds of 4, the second one cut to 2
    reports = run_lib.evaluate(config, tmp_path, "eval", progress=False)
    report = json.loads((tmp_path / "eval" / "report_1.json").read_text())
    assert report == reports[1]
    assert np.isfinite(report["eval_loss"]) and report["step"] == 2
    # The rounds below do not depend on the loss: the evaluations that follow skip its pass over
    # the whole test split.
    config.eval.enable_loss = False
    rounds = sorted((tmp_path / "eval" / "ckpt_1").glob("samples_*.npz"))
    assert [p.name for p in rounds] == ["samples_0.npz", "samples_1.npz"]
    first = np.load(rounds[1])["samples"]
    # A second evaluation reuses the rounds on disk instead of drawing new samples.
    mtime = rounds[1].stat().st_mtime_ns
    run_lib.evaluate(config, tmp_path, "eval", progress=False)
    assert rounds[1].stat().st_mtime_ns == mtime
    # A lost round is redrawn identically from its seed.
    rounds[1].unlink()
    run_lib.evaluate(config, tmp_path, "eval", progress=False)
    np.testing.assert_array_equal(np.load(rounds[1])["samples"], first)
    # The settings are recorded beside the rounds; a larger count extends them ...
    settings = json.loads((tmp_path / "eval" / "ckpt_1.settings.json").read_text())
    assert settings["batch"] == 4 and len(settings["checkpoint"]["sha256"]) == 64
    config.eval.num_samples = 10
    assert run_lib.evaluate(config, tmp_path, "eval", progress=False)[1]["num_samples"] == 10
    assert (rounds[0].parent / "samples_2.npz").is_file()
    np.testing.assert_array_equal(np.load(rounds[1])["samples"], first)
    # ... and other settings are refused before any round is drawn.
    import sample_settings

    config.sampling.snr = 0.2
    with pytest.raises(sample_settings.SettingsMismatchError, match="other settings.*config was"):
        run_lib.evaluate(config, tmp_path, "eval", progress=False)
    assert not (rounds[0].parent / "samples_3.npz").exists()


def test_compute_bpd_on_trained_checkpoint(tmp_path):
    import datasets
    import likelihood
    import run_lib
    import sde_lib
    from models import utils as mutils
    from models.checkpoints import load_model_weights

    config = _config()
    config.training.n_iters = 1
    config.training.snapshot_sampling = False
    run_lib.train(config, tmp_path, progress=False)
    model = load_model_weights(mutils.create_model(config),
                               tmp_path / "checkpoints" / "checkpoint_1.pth")
    sde, _ = sde_lib.get_sde(config)
    likelihood_fn = likelihood.get_likelihood_fn(sde, datasets.get_data_inverse_scaler(config))
    bpds, nfe = run_lib.compute_bpd(likelihood_fn, model, config,
                                    datasets.get_data_scaler(config), torch.device("cpu"),
                                    num_repeats=1, progress=False, max_batches=1)
    assert bpds.shape == (4,) and np.all(np.isfinite(bpds)) and nfe > 0
    # An untrained network is no better than about 8 bits per dimension, never below 0.
    assert np.all(bpds > 0)
