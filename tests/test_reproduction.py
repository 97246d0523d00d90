"""Defaults that reproduce the original code: bits/dim passes, snapshot sampling in training, the
`--dataset` spellings of the entry scripts."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runner import run_python
from test_sampling import GaussianScoreNet
from test_subspace_cli import checkpoints  # noqa: F401  (fixture)

import likelihood
import run_lib
import sde_lib
import subspace_lib as sl

ROOT = Path(__file__).resolve().parents[1]


def _numpy_config(tmp_path, n_images=20, size=4):
    from configs.builtin import subvp_ddpmpp_small

    rng = np.random.default_rng(0)
    path = tmp_path / "imgs.npy"
    np.save(path, rng.integers(60, 200, (n_images, size, size, 1), dtype=np.uint8))
    config = subvp_ddpmpp_small.get_config()
    config.data.update(dataset="NUMPY", root=str(path), image_size=size, num_channels=1,
                       test_fraction=0.25)
    config.eval.batch_size = 2
    config.device = torch.device("cpu")
    return config


def _bpd(config, num_repeats, **kwargs):
    sde = sde_lib.subVPSDE(N=1000)
    net = GaussianScoreNet(sde, torch.full((1, 4, 4), 0.0), torch.full((1, 4, 4), 0.3))
    likelihood_fn = likelihood.get_likelihood_fn(sde, lambda x: (x + 1) / 2, rtol=1e-3,
                                                 atol=1e-3)
    return run_lib.compute_bpd(likelihood_fn, net, config, lambda x: 2 * x - 1,
                               torch.device("cpu"), num_repeats, progress=False, **kwargs)


def test_bits_per_dim_passes_follow_the_original(tmp_path):
    config = _numpy_config(tmp_path)
    # score_sde run_lib.evaluate: bpd_num_repeats = 5 on the test split, 1 on the train split.
    assert run_lib.bpd_num_repeats(config) == 5
    config.eval.bpd_dataset = "train"
    assert run_lib.bpd_num_repeats(config) == 1
    config.eval.bpd_dataset = "validation"
    with pytest.raises(ValueError, match="Unknown eval.bpd_dataset 'validation': use train or "
                                         "test."):
        run_lib.bpd_num_repeats(config)
    config.eval.bpd_dataset = "test"
    assert config.eval.bpd_num_images == 0  # the default is the whole split
    torch.manual_seed(0)
    bpds, nfe = _bpd(config, num_repeats=5)
    # 5 test images (a quarter of 20), 5 passes, each pass with its own dequantization noise.
    assert bpds.shape == (25,) and nfe > 0 and np.all(np.isfinite(bpds))
    passes = bpds.reshape(5, 5)
    assert all(not np.allclose(np.sort(passes[0]), np.sort(p)) for p in passes[1:])


def test_bits_per_dim_image_limit(tmp_path):
    config = _numpy_config(tmp_path)
    config.eval.bpd_num_images = 3
    torch.manual_seed(0)
    bpds, _ = _bpd(config, num_repeats=2)
    assert bpds.shape == (6,)
    # Over ranks the shares add up to the limit.
    assert [run_lib._rank_image_limit(7, (r, 3)) for r in range(3)] == [3, 2, 2]
    config.eval.bpd_num_images = -1
    with pytest.raises(ValueError, match="eval.bpd_num_images must be >= 0"):
        _bpd(config, num_repeats=1)


def test_training_snapshot_sampling_is_off_unless_asked(tmp_path):
    config = ROOT / "configs" / "builtin" / "subvp_ddpmpp_small.py"
    tiny = ["--config.model.nf", "8", "--config.model.num_scales", "4",
            "--config.data.image_size", "8", "--config.training.batch_size", "2",
            "--config.training.n_iters", "2", "--config.training.snapshot_freq", "2",
            "--config.training.eval_freq", "100", "--progress=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(ROOT / "main.py"), "--config", str(config), "--mode", "train",
           "--workdir", str(tmp_path)]
    run_python(cmd + tiny, cwd=ROOT, env=env, check=True)
    # The config says snapshot_sampling=True; main.py switches it off as the original did.
    assert (tmp_path / "checkpoints" / "checkpoint_1.pth").is_file()
    assert not list((tmp_path / "samples").glob("iter_*"))


@pytest.mark.parametrize("flag, key", [("cifar", "cifar10"), ("celeba", "celebahq"),
                                       ("church", "church"), ("CIFAR10", "cifar10"),
                                       ("builtin", "builtin"), (None, "cifar10")])
def test_dataset_spellings(flag, key):
    from configs.ve import cifar10_ncsnpp_continuous

    config = cifar10_ncsnpp_continuous.get_config()
    assert sl.stats_name_from_flag(flag, config) == key


def test_main_eval_subspace_takes_the_reference_dataset_spellings(checkpoints, tmp_path):  # noqa: F811
    def eval_subspace(dataset):
        cmd = ["main.py", "--config", "configs/builtin/ve_ncsnpp_small.py",
               "--config.model.num_scales", "6", "--mode", "eval_subspace", "--workdir",
               str(tmp_path), "--subspace", "16", "--time", "0.5", "--ckpt_full",
               str(checkpoints[32]), "--ckpt_subspace", str(checkpoints[16]), "--dataset",
               dataset, "--save_name", dataset, "--progress=false"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return run_python(cmd, cwd=ROOT, env=env, timeout=600)

    # `cifar` names the CIFAR-10 statistics of 32x32 images, which this 32x32 config can use.
    assert eval_subspace("cifar").returncode == 0
    report = tmp_path / "eval" / "cifar_report.json"
    assert report.is_file()
    # `celeba` names the CelebA-HQ-256 statistics, as in subspace_sample.py; they hold no
    # 32x32 entry, and the one-sentence error says so.
    result = eval_subspace("celeba")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "No RMSD statistic for dataset 'celebahq' from 32x32 to 16x16" in result.stderr
