"""`subspace_sample.py` and `subspace_inpainting.py` run as users run them, on tiny checkpoints
of the built-in config."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runner import run_python

import losses
from configs.builtin import ve_ncsnpp_small
from models import utils as mutils
from models.checkpoints import load_model_weights, save_checkpoint
from models.ema import ExponentialMovingAverage
from models.subspace_model import subspace_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/builtin/ve_ncsnpp_small.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Freshly initialised (untrained) checkpoints at sizes 32, 16 and 8, published format."""
    folder = tmp_path_factory.mktemp("ckpt")
    config = ve_ncsnpp_small.get_config()
    config.device = torch.device("cpu")
    config.model.num_scales = 6  # the networks hold a buffer of num_scales noise levels
    paths = {}
    torch.manual_seed(0)
    for cfg in [config] + subspace_configs(config, (16, 8)):
        model = mutils.create_model(cfg)
        state = dict(optimizer=losses.get_optimizer(cfg, model.parameters()), model=model,
                     ema=ExponentialMovingAverage(model.parameters(), decay=cfg.model.ema_rate),
                     step=0)
        paths[cfg.data.image_size] = folder / f"checkpoint_{cfg.data.image_size}.pth"
        save_checkpoint(paths[cfg.data.image_size], state)
    return paths


def run_cli(*args: str, script: str = "subspace_sample.py") -> subprocess.CompletedProcess:
    command = [script, "--config", CONFIG,
               "--config.model.num_scales", "6", "--progress=false", *args]
    # One intra-op thread: tiny networks, and the machine running the tests is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_python(command, cwd=ROOT, timeout=600, env=env)


def test_two_level_sampling_saves_resumes_and_reports(checkpoints, tmp_path):
    common = ["--subspace", "16,8", "--time", "0.5,0.6", "--langevin_snr", "0.22",
              "--ckpt_subspace", f"{checkpoints[16]},{checkpoints[8]}",
              "--ckpt_full", str(checkpoints[32]), "--eval_folder", str(tmp_path), "--batch", "2"]
    first = run_cli(*common, "--save_name", "run", "--number_samples", "2")
    assert first.returncode == 0, first.stderr
    saved = np.load(tmp_path / "run.npy")
    assert saved.shape == (2, 32, 32, 3) and saved.dtype == np.uint8
    # The round is kept in the evaluation format, which the resumed runs below start from.
    with np.load(tmp_path / "run" / "samples_0.npz") as archive:
        np.testing.assert_array_equal(archive["samples"], saved)
    table = first.stdout.splitlines()
    rows = {int(line.split()[0]): line.split() for line in table if line.split()[:1]
            and line.split()[0].isdigit()}
    # N = 6 steps split over the windows [1, 0.6], [0.6, 0.5], [0.5, eps]; reverse diffusion +
    # Langevin corrector = 2 evaluations per step, plus 2 conditional Langevin steps per switch.
    assert sorted(rows) == [8, 16, 32]
    assert sum(int(rows[s][-4]) for s in rows) == 6
    assert int(rows[32][-3]) == 2 * int(rows[32][-4]) + 2

    # Resume: ask for 3, then 4 samples; the 2 saved ones are kept and more are drawn, exactly
    # as an uninterrupted run draws them (each round is seeded by seed + round): the round cut to
    # 1 sample for 3 is drawn again in full for 4.
    (tmp_path / ".run.npy.k1ll3d.tmp").write_bytes(b"left by a killed run")
    (tmp_path / ".other.npy.x.tmp").write_bytes(b"not this run's")
    resumed = run_cli(*common, "--save_name", "run", "--number_samples", "3")
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".other.npy.x.tmp"]
    (tmp_path / ".other.npy.x.tmp").unlink()
    assert resumed.returncode == 0, resumed.stderr
    assert np.load(tmp_path / "run.npy").shape[0] == 3
    resumed = run_cli(*common, "--save_name", "run", "--number_samples", "4")
    assert resumed.returncode == 0, resumed.stderr
    fresh = run_cli(*common, "--save_name", "fresh", "--number_samples", "4")
    assert fresh.returncode == 0, fresh.stderr
    after = np.load(tmp_path / "run.npy")
    assert after.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(after[:2], saved)
    np.testing.assert_array_equal(after, np.load(tmp_path / "fresh.npy"))
    assert not list(tmp_path.glob(".*.tmp"))
    settings = json.loads((tmp_path / "run.settings.json").read_text())
    assert settings["plan"]["cutoffs"] == [0.5, 0.6] and settings["batch"] == 2
    assert len(settings["ckpt_full"]["sha256"]) == 64
    # Another plan into the same name is refused before any sampling; the file is unchanged.
    changed = [a if a != "0.5,0.6" else "0.4,0.6" for a in common]
    refused = run_cli(*changed, "--save_name", "run", "--number_samples", "6")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "other settings" in lines[0]
    assert "plan.cutoffs was [0.5, 0.6], now [0.4, 0.6]" in lines[0]
    np.testing.assert_array_equal(np.load(tmp_path / "run.npy"), after)


def test_inpainting_grid_over_cutoff_times(checkpoints, tmp_path):
    from PIL import Image

    image = tmp_path / "out.png"
    result = run_cli("--image_path", str(image), "--batch_size", "2", "--subspace", "16",
                     "--checkpoint_subspace", str(checkpoints[16]),
                     "--checkpoint_full", str(checkpoints[32]), script="subspace_inpainting.py")
    assert result.returncode == 0, result.stderr
    # 2 rows (images) x 8 columns (original, masked, cutoffs 0, 0.2, ..., 1) of 32x32 tiles
    # with 2-pixel padding.
    with Image.open(image) as grid:
        assert grid.size == (8 * 34 + 2, 2 * 34 + 2)
    lines = result.stdout.splitlines()
    # N = 6 steps of predictor + corrector: 12 evaluations, split by the cutoff.
    assert "cutoff 0: full network 0, 16x16 network 12 evaluations" in lines
    assert "cutoff 1: full network 12, 16x16 network 0 evaluations" in lines
    assert "cutoff 0.4: full network 4, 16x16 network 8 evaluations" in lines


def test_load_subspace_model_for_notebooks(checkpoints):
    import sde_lib
    from models.subspace_model import load_subspace_model

    config = ve_ncsnpp_small.get_config()
    config.device = torch.device("cpu")
    config.model.num_scales = 6
    model = load_subspace_model(config, checkpoints[32], [checkpoints[16], checkpoints[8]],
                                "16,8", "0.5,0.6")
    assert model.plan.rmsds == (0.03747933962267894, 0.05261084821932425)  # builtin statistics
    assert not model.training
    sde, _ = sde_lib.get_sde(config)
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    x, t = torch.rand(3, 3, 32, 32), torch.tensor([0.2, 0.55, 0.9])
    with torch.no_grad():
        out = score_fn(x, t)
    assert out.shape == (3, 3, 32, 32)
    assert (model.nfe_full, model.nfe_subspace) == (1, [1, 1])
    # Below both cutoffs the implicit score is the full network's score.
    full = load_model_weights(mutils.create_model(config), checkpoints[32])
    with torch.no_grad():
        expected = mutils.get_score_fn(sde, full, train=False, continuous=True)(x[:1], t[:1])
    torch.testing.assert_close(out[:1], expected)
    with pytest.raises(ValueError, match="give one --ckpt_subspace per size"):
        load_subspace_model(config, checkpoints[32], [checkpoints[16]], "16,8", "0.5,0.6")
