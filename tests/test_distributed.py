"""torch.distributed: data sharding, per-example noise, and 2-process gloo runs under torchrun
that must reproduce one process (training, a two-process checkpoint loaded in one, sampling,
bits/dim)."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from script_runner import run_python, worker_environment

import datasets
import distributed
import losses
import run_lib
import sde_lib
from configs.builtin.subvp_ddpmpp_small import get_config
from models import utils as mutils
from models.checkpoints import restore_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = "configs/builtin/subvp_ddpmpp_small.py"
# A tiny model and schedule; both layouts train and sample with exactly these settings.
TRAIN_STEPS = 3
OVERRIDES = {
    "data.dataset": "NUMPY",
    "data.image_size": 8,
    "data.uniform_dequantization": True,
    "model.nf": 8,
    # "auto" is timed in each process; the one- and two-process runs must share one layout.
    "model.memory_format": "contiguous",
    "model.num_scales": 4,
    # A gentler sub-VP SDE than the default 20: the bits/dim ODE (RK45 at 1e-5) takes half the
    # steps (about 45 per image instead of 100), the larger part of the evaluations' time.
    "model.beta_max": 5.0,
    "training.batch_size": 4,
    "training.snapshot_freq": 2,
    "training.snapshot_freq_for_preemption": 2,
    "training.eval_freq": 2,
    "training.log_freq": 1,
    "training.snapshot_sampling": False,
    "optim.warmup": 0,
    "optim.lr": 1e-3,
    "eval.begin_ckpt": 1,
    "eval.end_ckpt": 1,
    "eval.batch_size": 2,
    "eval.num_samples": 5,
    "eval.enable_sampling": True,
    "eval.enable_loss": True,
    "eval.enable_bpd": True,
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _write_images(path: Path, n: int = 24, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    np.save(path, rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    return path


def _config(root: Path, **extra):
    config = get_config()
    for key, value in {**OVERRIDES, "data.root": str(root), **extra}.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    config.device = torch.device("cpu")
    return config


def _torchrun(mode: str, workdir: Path, root: Path | None, *args: str,
              config_file: str = CONFIG_FILE, **extra) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 main.py ...` with OVERRIDES (when `root` is
    given), `extra` config values and further `args`."""
    values = {} if root is None else {**OVERRIDES, "data.root": root}
    flags = [f"--config.{k}={v}" for k, v in {**values, **extra}.items()]
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
               f"--config={config_file}", f"--mode={mode}", f"--workdir={workdir}",
               "--progress=false", *flags, *args]
    result = run_python(command, cwd=ROOT, env=worker_environment(env), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _max_difference(a: dict, b: dict) -> tuple[float, float]:
    model = max((a["model"][k].double() - b["model"][k].double()).abs().max().item()
                for k in a["model"])
    ema = max((x.double() - y.double()).abs().max().item()
              for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]))
    return model, ema


# ------------------------------------------------------------------------------------------------
# Single-process behaviour and the pure helpers.

def test_without_launcher_everything_is_one_process(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") == torch.device("cpu")
    assert not dist.is_initialized()
    assert distributed.shard() == (0, 1) and distributed.is_main_process()
    seen = []
    results = distributed.map_rounds(4, lambda r: r * 10, on_result=lambda r, v: seen.append(r),
                                     first=1)
    assert results == [10, 20, 30] and seen == [1, 2, 3]
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.rank_seed(7) == 7


def test_half_configured_launch_is_rejected(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        distributed.setup("cpu")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two' is not an integer"):
        distributed.setup("cpu")


def test_batch_split_and_round_split():
    assert distributed.per_rank_batch_size(128, 4) == 32
    with pytest.raises(ValueError, match="batch_size = 6 is not a positive multiple of the 4"):
        distributed.per_rank_batch_size(6, 4)
    for world in (1, 2, 3):
        positions = np.concatenate([distributed.rank_positions(7, r, world)
                                    for r in range(world)])
        assert sorted(positions) == list(range(7))
        rounds = sum((distributed.split_rounds(9, r, world, first=2) for r in range(world)), [])
        assert sorted(rounds) == list(range(2, 9))
    assert len({distributed.rank_seed(5, r) for r in range(4)}) == 4


def test_sharded_training_batches_are_the_single_process_batches(tmp_path):
    """Flips and dequantization noise included, the two ranks' halves of every step make up the
    one-process batch, across the epoch boundary (22 training images, batch 4)."""
    config = _config(_write_images(tmp_path / "images.npy"), **{"data.random_flip": True})
    whole = datasets.get_dataset(config, uniform_dequantization=True, seed=3)[0]
    halves = [datasets.get_dataset(config, uniform_dequantization=True, seed=3, shard=(r, 2))[0]
              for r in range(2)]
    streams = [iter(whole)] + [iter(h) for h in halves]
    for _ in range(8):
        full, *parts = (next(s)["image"] for s in streams)
        assert all(p.shape == (2, 3, 8, 8) for p in parts)
        assert torch.equal(full[0::2], parts[0]) and torch.equal(full[1::2], parts[1])
    with pytest.raises(ValueError, match="not a positive multiple of the 3 processes"):
        datasets.get_dataset(config, shard=(0, 3))
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        datasets.get_dataset(config, shard=(2, 2))


def test_sharded_evaluation_covers_every_image_once(tmp_path):
    config = _config(_write_images(tmp_path / "images.npy"), **{"eval.batch_size": 4})
    whole = torch.cat([b["image"] for b in datasets.get_dataset(config, evaluation=True)[0]])
    parts = [datasets.get_dataset(config, evaluation=True, shard=(r, 3))[0] for r in range(3)]
    # 22 images in batches of 4: the short last batch of 2 leaves rank 2 without it.
    assert [len(p) for p in parts] == [6, 6, 5]
    images = [torch.cat([b["image"] for b in p]) for p in parts]
    assert sum(len(x) for x in images) == len(whole) == 22
    for rank, x in enumerate(images):
        positions = np.concatenate([distributed.rank_positions(n, rank, 3) + 4 * i
                                    for i, n in enumerate([4] * 5 + [2])])
        assert torch.equal(x, whole[positions])


def test_per_example_generators_make_the_loss_split_invariant(tmp_path):
    config = _config(tmp_path / "unused.npy")
    torch.manual_seed(0)
    model = mutils.create_model(config)
    sde, _ = sde_lib.get_sde(config)
    loss_fn = losses.get_sde_loss_fn(sde, train=False, reduce_mean=True, continuous=True,
                                     likelihood_weighting=False)
    batch = torch.rand(4, 3, 8, 8) * 2 - 1

    def generators(positions):
        return run_lib.example_generators(11, 5, positions, torch.device("cpu"))

    with torch.no_grad():
        whole = loss_fn(model, batch, generator=generators(range(4)))
        halves = [loss_fn(model, batch[r::2], generator=generators(range(r, 4, 2)))
                  for r in range(2)]
        other_step = loss_fn(model, batch,
                             generator=run_lib.example_generators(11, 6, range(4), "cpu"))
    assert torch.allclose(whole, (halves[0] + halves[1]) / 2, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(whole, other_step)
    with pytest.raises(ValueError, match="3 generators for a batch of 4"):
        loss_fn(model, batch, generator=generators(range(3)))


# ------------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo) against one process.

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process and two-process training (3 steps) and evaluation. (Resuming under torchrun
    is checked bit for bit against an uninterrupted pair in test_resume_exact.py.)"""
    base = tmp_path_factory.mktemp("distributed")
    root = _write_images(base / "images.npy")
    single, pair = base / "single", base / "pair"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker; sampling must agree to the last bit
    try:
        run_lib.train(_config(root, **{"training.n_iters": TRAIN_STEPS}), single, progress=False)
        first_single = _load(single / "checkpoints-meta" / "checkpoint.pth")
        single_report = run_lib.evaluate(_config(root), single, "eval", progress=False)[1]
    finally:
        torch.set_num_threads(threads)
    assert not dist.is_initialized()
    first = _torchrun("train", pair, root, **{"training.n_iters": TRAIN_STEPS})
    first_pair = _load(pair / "checkpoints-meta" / "checkpoint.pth")
    _torchrun("eval", pair, root)
    return dict(root=root, single=single, pair=pair, first_single=first_single,
                first_pair=first_pair, first_log=first.stderr, single_report=single_report)


def test_two_processes_train_the_parameters_of_one(runs):
    single, pair = runs["first_single"], runs["first_pair"]
    # Steps 0..3 were taken; per-rank batch 2 against one batch of 4.
    assert single["step"] == pair["step"] == TRAIN_STEPS + 1
    model_diff, ema_diff = _max_difference(single, pair)
    assert model_diff < 2e-6 and ema_diff < 2e-6
    init = run_lib.create_train_state(_config(runs["root"]), torch.device("cpu"))
    moved = max((p.detach().double() - single["model"]["module." + k].double()).abs().max().item()
                for k, p in init["model"].named_parameters())
    assert moved > 1e-3  # the parameters did move, far beyond the tolerance
    assert all(k.startswith("module.") and not k.startswith("module.module.")
               for k in pair["model"])
    # Only rank 0 logs the training loss.
    assert runs["first_log"].count("training_loss") == TRAIN_STEPS + 1


def test_two_process_checkpoint_loads_in_one_process(runs):
    state = run_lib.create_train_state(_config(runs["root"]), torch.device("cpu"))
    path = runs["pair"] / "checkpoints" / "checkpoint_1.pth"
    state = restore_checkpoint(path, state, torch.device("cpu"))
    assert state["step"] == TRAIN_STEPS + 1
    assert torch.equal(state["model"].state_dict()["all_modules.0.weight"],
                       runs["first_pair"]["model"]["module.all_modules.0.weight"])


def test_two_process_sampling_writes_the_one_process_samples(runs):
    single_dir = runs["single"] / "eval" / "ckpt_1"
    pair_dir = runs["pair"] / "eval" / "ckpt_1"
    names = sorted(p.name for p in pair_dir.glob("samples_*.npz"))
    assert names == sorted(p.name for p in single_dir.glob("samples_*.npz")) == [
        "samples_0.npz", "samples_1.npz", "samples_2.npz"]
    for name in names:
        with np.load(single_dir / name) as a, np.load(pair_dir / name) as b:
            assert a["samples"].shape == (2, 8, 8, 3)
            assert np.array_equal(a["samples"], b["samples"]), name
    report = json.loads((runs["pair"] / "eval" / "report_1.json").read_text())
    assert report["num_samples"] == runs["single_report"]["num_samples"] == 5


def test_two_process_bits_per_dim_cover_the_test_split_once(runs):
    report = json.loads((runs["pair"] / "eval" / "report_1.json").read_text())
    with np.load(runs["pair"] / "eval" / "ckpt_1_bpd.npz") as archive:
        bpd = archive["bpd"]
    # 2 test images x 5 dequantizations, one image per rank each time.
    assert bpd.shape == (10,) and np.all(np.isfinite(bpd))
    assert report["bpd"] == pytest.approx(float(bpd.mean()))
    single = runs["single_report"]
    assert report["bpd"] == pytest.approx(single["bpd"], rel=0.2)
    assert report["bpd_nfe"] > 0 and np.isfinite(report["eval_loss"])


def _untrained_checkpoints(config, folder: Path) -> dict[int, Path]:
    """Seeded untrained (randomly perturbed) full (32) and 16x16 checkpoints of `config`:
    {size: path}."""
    from models.ema import ExponentialMovingAverage
    from models.subspace_model import subspace_configs

    torch.manual_seed(0)
    paths = {}
    for cfg in [config] + subspace_configs(config, (16,)):
        model = mutils.create_model(cfg)
        # A zero-initialised output layer gives a zero score, whose Langevin step size is
        # infinite: small noise on every weight makes the samples finite and seed-dependent.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        paths[cfg.data.image_size] = folder / f"checkpoint_{cfg.data.image_size}.pth"
        save_checkpoint(paths[cfg.data.image_size], dict(
            optimizer=losses.get_optimizer(cfg, model.parameters()), model=model,
            ema=ExponentialMovingAverage(model.parameters(), decay=0.999), step=0))
    return paths


def test_two_process_subspace_sampling_writes_the_one_process_samples(tmp_path):
    """`main.py --mode eval_subspace` (implicit subspace score, 6 PC steps) on untrained
    32/16 checkpoints: 5 samples in rounds of 2 over 2 ranks equal the one-process samples."""
    from configs.builtin import ve_ncsnpp_small

    config = ve_ncsnpp_small.get_config()
    config.device = torch.device("cpu")
    values = {"model.num_scales": 6, "eval.batch_size": 2, "eval.num_samples": 5,
              "eval.enable_sampling": True, "eval.enable_bpd": False}
    for key, value in values.items():
        section, name = key.split(".")
        setattr(config[section], name, value)
    paths = _untrained_checkpoints(config, tmp_path)
    single = run_lib.evaluate_subspace(config, tmp_path / "single", "eval", [16], [0.5],
                                       paths[32], [paths[16]], dataset="builtin",
                                       save_name="s", progress=False)
    _torchrun("eval_subspace", tmp_path / "pair", None, "--subspace=16", "--time=0.5",
              "--dataset=builtin", f"--ckpt_full={paths[32]}", f"--ckpt_subspace={paths[16]}",
              "--save_name=s", config_file="configs/builtin/ve_ncsnpp_small.py", **values)
    samples = np.load(tmp_path / "pair" / "eval" / "s.npy")
    assert samples.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(samples, np.load(tmp_path / "single" / "eval" / "s.npy"))
    report = json.loads((tmp_path / "pair" / "eval" / "s_report.json").read_text())
    # Every network evaluation of the three rounds is counted, whichever rank made it.
    assert report["sampling_num_full"] == single["sampling_num_full"] > 0
    assert report["sampling_num_subspace"] == single["sampling_num_subspace"] > 0


def test_two_process_subspace_sample_script_writes_the_one_process_samples(tmp_path):
    """`subspace_sample.py` under torchrun: exactly --number_samples samples, in rounds split
    over 2 ranks, equal to the samples of one process with the same seed."""
    from configs.builtin import subvp_ddpmpp_small

    config = subvp_ddpmpp_small.get_config()
    config.device = torch.device("cpu")
    config.model.num_scales = 6
    paths = _untrained_checkpoints(config, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCH_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    script = ["subspace_sample.py", "--config=configs/builtin/subvp_ddpmpp_small.py",
              "--config.model.num_scales=6", "--dataset=builtin", "--subspace=16", "--time=0.5",
              f"--ckpt_full={paths[32]}", f"--ckpt_subspace={paths[16]}", "--number_samples=5",
              "--batch=2", "--save_name=s", "--noprogress",
              # The untrained networks output zero: a Langevin step would divide by a zero
              # gradient norm and the samples come out NaN, which now stops the run.
              "--langevin_steps=0"]
    launchers = {"single": [], "pair": ["-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2"]}
    for name, launcher in launchers.items():
        result = run_python([*launcher, *script, f"--eval_folder={tmp_path / name}"], cwd=ROOT,
                            env=worker_environment(env), timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    pair, single = (np.load(tmp_path / name / "s.npy") for name in ("pair", "single"))
    assert pair.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(pair, single)
