"""Command lines of the analyses on the built-in dataset: `python -m analysis.rmsd` and
`python -m analysis.divergence` (run as subprocesses, as a user would)."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runner import run_python

ROOT = Path(__file__).resolve().parents[1]
VE_CONFIG = "configs/builtin/ve_ncsnpp_small.py"
SUBVP_CONFIG = "configs/builtin/subvp_ddpmpp_small.py"


def _run(*args):
    # One intra-op thread, as the test process (conftest), so results agree to the last bit.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_python(["-m", *args, "--noprogress"], cwd=ROOT, env=env, timeout=600)


def _config(module):
    import importlib

    return importlib.import_module(module).get_config()


def test_rmsd_cli_writes_table_and_statistics(tmp_path):
    import datasets
    from analysis.rmsd import rmsd_table

    out, stats = tmp_path / "table.json", tmp_path / "stats.json"
    # An older measurement with another size: replaced as a whole, never mixed with the new one.
    stats.write_text(json.dumps({"builtin": {"32": {"4": 0.5}}, "other": {"32": {"16": 0.1}}}))
    proc = _run("analysis.rmsd", "--config", VE_CONFIG, "--max_images", "40", "--sizes", "16,8",
                "--methods", "downsample,patch_pca", "--out", str(out), "--stats_file",
                str(stats), "--update_stats")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(stats.read_text())["other"] == {"32": {"16": 0.1}}
    table = json.loads(out.read_text())
    assert table["dataset"] == "builtin" and table["num_images"] == 40
    assert set(table["rmsd"]) == {"downsample", "patch_pca"}
    # The statistics file the upsampling code reads gets exactly the downsampling values.
    saved = json.loads(stats.read_text())["builtin"]["32"]
    assert saved == table["rmsd"]["downsample"]
    # Same numbers as the library on the same images.
    train_ds, _, _ = datasets.get_dataset(_config("configs.builtin.ve_ncsnpp_small"),
                                          evaluation=True)
    direct = rmsd_table(train_ds, [16, 8], ["downsample", "patch_pca"], max_images=40)
    assert direct["rmsd"] == table["rmsd"]
    assert math.isclose(direct["mean_distance"], table["mean_distance"], rel_tol=1e-12)
    assert "distance to the mean" in proc.stdout


def test_rmsd_cli_bad_input_exits_1_from_the_shell(tmp_path):
    # One real process (the exit status the shell sees); the other bad input of this command
    # runs in tests/test_entry_errors.py.
    proc = _run("analysis.rmsd", "--config", VE_CONFIG, "--methods", "wavelet",
                "--stats_file", str(tmp_path / "s.json"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --methods 'wavelet'")
    assert not (tmp_path / "s.json").exists()


@pytest.fixture(scope="module")
def subvp_checkpoint(tmp_path_factory):
    import run_lib
    from models.checkpoints import save_checkpoint

    config = _config("configs.builtin.subvp_ddpmpp_small")
    torch.manual_seed(0)
    state = run_lib.create_train_state(config, torch.device("cpu"))
    # Non-zero weights everywhere (init_scale=0 zeroes the output layer).
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(0.02 * torch.randn_like(p))
    state["ema"] = type(state["ema"])(state["model"].parameters(), decay=0.999)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    save_checkpoint(path, state)
    return path


def test_divergence_cli_matches_library(subvp_checkpoint, tmp_path):
    import datasets
    import sde_lib
    from analysis.divergence import fisher_divergence
    from models import utils as mutils
    from models.checkpoints import load_model_weights

    out, plot = tmp_path / "div.json", tmp_path / "div.png"
    proc = _run("analysis.divergence", "--config", SUBVP_CONFIG, "--checkpoint",
                str(subvp_checkpoint), "--subspace", "16,8", "--num_times", "3",
                "--num_images", "6", "--rmsd", "16=0.05", "--config.eval.batch_size", "4",
                "--out", str(out), "--thresholds", "1e-2,1e3", "--plot", str(plot))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"16", "8"}
    for entry in data.values():
        assert entry["t"] == [0.0] * 6 + [0.5] * 6 + [1.0] * 6
        assert len(entry["err_norm"]) == len(entry["gauss_norm"]) == 18
        # sub-VP: sigma(0) = 0, so the network score (and D_F) is NaN at t = 0, as in the
        # reference files; later times are finite.
        assert all(math.isnan(v) for v in entry["err_norm"][:6])
        assert all(math.isfinite(v) for v in entry["err_norm"][6:])
    cut = json.loads((tmp_path / "div_cutoffs.json").read_text())["cutoffs"]["div.json"]
    assert cut["16"]["1000.0"] == 0.5  # NaN times never count, so the first finite time
    assert plot.read_bytes()[:4] == b"\x89PNG"

    # The same computation in-process: the RMSD of size 8 comes from the statistics file.
    import subspace_lib

    config = _config("configs.builtin.subvp_ddpmpp_small")
    config.eval.batch_size = 4
    sde, _ = sde_lib.get_sde(config)
    model = load_model_weights(mutils.create_model(config), subvp_checkpoint)
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    rmsd = {16: 0.05, 8: subspace_lib.dataset_rmsd("builtin", 32, 8)}
    direct = fisher_divergence(score_fn, sde, train_ds, rmsd, [0.0, 0.5, 1.0], centered=True,
                               num_images=6, seed=config.seed,
                               device=mutils.config_device(config))
    for size in ("16", "8"):
        for column in ("t", "err_norm", "gauss_norm", "score_norm"):
            np.testing.assert_array_equal(data[size][column], direct[size][column])


def test_divergence_cli_bad_input_exits_1_from_the_shell(tmp_path):
    # One real process (the exit status the shell sees); the other bad input of this command
    # runs in tests/test_entry_errors.py.
    proc = _run("analysis.divergence", "--config", VE_CONFIG, "--checkpoint",
                str(tmp_path / "missing.pth"), "--subspace", "16", "--num_images", "2",
                "--out", str(tmp_path / "d.json"))
    assert proc.returncode == 1 and "missing.pth" in proc.stderr
    assert not (tmp_path / "d.json").exists()
