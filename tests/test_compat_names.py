"""Python names of the original code, used the original way: same result, or one sentence."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference_cases import CASES, case_networks, expected
from test_sampling import GaussianScoreNet

import sampling
import sde_lib
import subspace_lib as sl
import upsampling
from models import utils as mutils
from models.subspace_model import build_subspace_model
from subspace_sampling import conditional_langevin

# The reference's upsampling.py / models/subspace_model.py table (docs/maths.md).
REFERENCE_STDS = {
    "cifar": {16: 0.07505646805106986, 8: 0.11017048700915723},
    "celeba": {128: 0.034147739617184675, 64: 0.05084107453389564, 32: 0.07347487958749131,
               16: 0.1030002890867888, 8: 0.14072510083194403},
    "church": {128: 0.06969019929745306, 64: 0.0883778833712964, 32: 0.10887079373374633,
               16: 0.13137195950968375, 8: 0.15799366823221628},
}


def test_stds_table_is_the_reference_table():
    assert upsampling.stds == REFERENCE_STDS


def _reference_lift(x, n):
    """The reference's repeated 2x upsampling: each pixel to a 2x2 block, divided by 2."""
    for _ in range(n):
        x = x.repeat_interleave(2, -2).repeat_interleave(2, -1) / 2
    return x


def _reference_pool(x, n):
    for _ in range(n):
        x = 2 * F.avg_pool2d(x, 2)
    return x


@pytest.mark.parametrize("size, alpha, sigma", [(16, 1.0, 3.7), (8, 2 * 0.6, 0.45)])
def test_upsampling_fn_as_the_reference_script_calls_it(size, alpha, sigma):
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    ours = upsampling.upsampling_fn(x, alpha=alpha, sigma=sigma, dataset="cifar")
    # The reference: one normal draw at full size with std sqrt(sigma^2 + alpha^2 r^2), minus its
    # projection, added to the lifted state.
    n = int(math.log2(32 / size))
    torch.manual_seed(5)
    std = math.sqrt(sigma**2 + alpha**2 * REFERENCE_STDS["cifar"][size] ** 2)
    noise = torch.normal(mean=0, std=std, size=(3, 3, 32, 32))
    ref = _reference_lift(x, n) + noise - _reference_lift(_reference_pool(noise, n), n)
    assert ours.shape == (3, 3, 32, 32)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()


def test_upsampling_fn_lifts_256_data_to_full_size():
    # The reference assumed 32x32 for every dataset and returned 64x64 church states unchanged.
    x = torch.randn(1, 3, 64, 64)
    out = upsampling.upsampling_fn(x, alpha=1.0, sigma=0.5, dataset="church")
    assert out.shape == (1, 3, 256, 256)
    assert torch.allclose(sl.downsample(out, 2), x, atol=1e-5)
    with pytest.raises(KeyError, match="no full image size with a 4x4 RMSD for dataset "
                                       "'cifar10'"):
        upsampling.upsampling_fn(torch.zeros(1, 3, 4, 4), 1.0, 1.0, "cifar")


def test_langevin_corrector_remove_subspace_is_the_conditional_langevin():
    sde = sde_lib.VESDE(N=100)
    net = GaussianScoreNet(sde, torch.full((1, 8, 8), 0.4), torch.full((1, 8, 8), 0.2))
    x = torch.randn(4, 1, 8, 8) * 3
    t = torch.full((4,), 0.4)
    # The reference script: LangevinCorrector(sde, raw network, snr, steps).update_fn
    corrector = sampling.LangevinCorrector(sde, net, 0.22, 2)
    torch.manual_seed(3)
    ours, ours_mean = corrector.update_fn(x, t, remove_subspace=1)
    torch.manual_seed(3)
    ref, ref_mean = conditional_langevin(net, sde, x, t, 0.22, 2, remove_halvings=1)
    assert torch.equal(ours, ref) and torch.equal(ours_mean, ref_mean)
    assert torch.allclose(sl.downsample(ours, 1), sl.downsample(x, 1), atol=1e-5)
    assert not torch.allclose(ours, x)
    torch.manual_seed(3)
    free, _ = corrector.update_fn(x, t)
    assert not torch.allclose(sl.downsample(free, 1), sl.downsample(x, 1), atol=1e-3)


def test_windowed_pc_sampler_of_the_fork():
    sde = sde_lib.VESDE(N=10)
    net = GaussianScoreNet(sde, torch.full((1, 4, 4), 0.4), torch.full((1, 4, 4), 0.2))
    sampler = sampling.get_pc_sampler(sde, (2, 1, 4, 4), "reverse_diffusion", "langevin",
                                      lambda v: v, snr=0.16, continuous=True, denoise=False,
                                      eps=1e-5, progress=False)
    first, t_vec = sampler(net, start=1, end=0.5)
    # int(10 * 0.5) = 5 steps, corrector + predictor each; the last time is 0.5 + 0.5 eps.
    assert net.calls == 10 and first.shape == (2, 1, 4, 4)
    assert t_vec.shape == (2,) and t_vec[0].item() == pytest.approx(0.5 + 0.5e-5)
    net.calls = 0
    _, t_vec = sampler(net, x=first, start=0.5, end=0)
    assert net.calls == 10 and t_vec[0].item() == pytest.approx(1e-5)
    net.calls = 0
    samples, nfe = sampler(net)  # the score-SDE form
    assert nfe == net.calls == 20
    with pytest.raises(ValueError, match="A window needs 0 <= end <= start <= 1"):
        sampler(net, start=0.2, end=0.5)


_networks = case_networks


@pytest.fixture(params=CASES)
def case_dir(request, reference_dir):
    return reference_dir / request.param


@torch.no_grad()
def test_setting_t_boundary_moves_the_cutoff(case_dir):
    config, meta, full, sub = _networks(case_dir)
    e = expected(case_dir)
    sde, _ = sde_lib.get_sde(config)
    flags = meta["FLAGS"]
    model = build_subspace_model(config, sde, full, [sub], (flags["subspace"],), (0.9,),
                                 flags["dataset"], legacy_batch_routing=True)
    # The reference's inpainting script set t_boundary on one wrapper for a grid of cutoffs.
    model.t_boundary = flags["time"]
    assert model.t_boundary == flags["time"] and model.plan.cutoffs == (flags["time"],)
    assert model.subspace_size == flags["subspace"] and model.full_size == 32
    score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
    x = e["x"].contiguous()
    for i in range(len(e["t_values"])):
        ref = e["score_wrapper"][i]
        err = (score_fn(x, e["vec_t"][i]) - ref).abs().max()
        assert err <= 1e-5 * ref.abs().max(), f"t index {i}"
    assert (model.num_full, model.num_subspace) == (2, 2)
    # The reference then scored the mixed and the boundary time vectors (whole batch routed by
    # element 0) and read its counters; it counted on its sub-VP branch only.
    for vec_t in e["mixed_vec_t"]:
        score_fn(x, vec_t)
    score_fn(x, e["boundary_vec_t"])
    if "wrapper_counters" in meta:
        counters = meta["wrapper_counters"]
        assert (model.num_full, model.num_subspace) == (counters["num_full"],
                                                        counters["num_subspace"])
    model.num_full = model.num_subspace = 0
    assert model.nfe_full == 0 and model.nfe_subspace == [0]
    with pytest.raises(ValueError, match="cannot change"):
        model.subspace_size = 8


def test_t_boundary_of_a_multi_level_plan_raises():
    sde = sde_lib.VESDE(N=10)
    nets = [GaussianScoreNet(sde, torch.zeros(1, s, s), torch.ones(1, s, s)) for s in (32, 16, 8)]
    plan = sl.SubspacePlan.from_statistics(32, "16,8", "0.5,0.6", "cifar10")
    from models.subspace_model import SubspaceScore

    model = SubspaceScore(sde, nets[0], nets[1:], plan, centered=False)
    message = "t_boundary is the reference's name for a one-level plan; this one has 2 levels"
    with pytest.raises(ValueError, match=message):
        model.t_boundary = 0.3
    with pytest.raises(ValueError, match=message):
        _ = model.t_boundary
    model.set_cutoffs([0.3, 0.7])
    assert model.plan.cutoffs == (0.3, 0.7)
    with pytest.raises(ValueError, match="can only be set to 0"):
        model.num_subspace = 3


def test_get_sampling_fn_keywords_of_the_fork():
    import ml_collections

    config = ml_collections.ConfigDict({
        "device": "cpu", "training": {"continuous": True},
        "sampling": {"method": "pc", "predictor": "reverse_diffusion", "corrector": "none",
                     "snr": 0.16, "n_steps_each": 1, "probability_flow": False,
                     "noise_removal": True}})
    sde = sde_lib.VESDE(N=6)
    net = GaussianScoreNet(sde, torch.full((1, 4, 4), 0.4), torch.full((1, 4, 4), 0.2))
    score_fn = mutils.get_score_fn(sde, net, train=False, continuous=True)
    # The fork's subspace_sample.py: get_sampling_fn(config, sde, shape, inverse_scaler, eps,
    # denoise=...) and, in its run_lib, score_fn=... with the model argument unused.
    torch.manual_seed(0)
    noisy, _ = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda v: v, 1e-5,
                                        denoise=False, progress=False)(net)
    torch.manual_seed(0)
    same, nfe = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda v: v, 1e-5,
                                         denoise=False, score_fn=score_fn, progress=False)(None)
    assert torch.equal(noisy, same) and nfe == 6
    torch.manual_seed(0)
    mean, _ = sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda v: v, 1e-5,
                                       progress=False)(net)
    assert not torch.equal(mean, noisy)  # the config's noise_removal=True: the noise-free mean
    config.sampling.method = "ode"
    with pytest.raises(ValueError, match="applies to the PC sampler only"):
        sampling.get_sampling_fn(config, sde, (2, 1, 4, 4), lambda v: v, 1e-5, score_fn=score_fn)


def test_create_model_subspace_names_its_replacement():
    from configs.builtin import ve_ncsnpp_small

    with pytest.raises(ValueError, match="use models.subspace_model.load_subspace_model"):
        mutils.create_model(ve_ncsnpp_small.get_config(), subspace=True)


def test_utils_reexports_the_original_names_from_their_homes():
    # The original `utils` names stay importable for notebooks and scripts written against the
    # original code; each is the object of its one home, not a copy.
    import cli
    import errors
    import files
    import utils
    from models import checkpoints

    homes = {files: ["atomic_write", "atomic_torch_save", "atomic_numpy_save",
                     "atomic_write_text", "make_image_grid", "save_image_grid"],
             checkpoints: ["save_checkpoint", "restore_checkpoint", "load_model_weights",
                           "check_state_dict", "load_state_dict_strict", "unwrap_model",
                           "CheckpointError", "CorruptCheckpointError",
                           "StateDictMismatchError"],
             cli: ["UsageError", "run_entry_point", "USER_ERRORS"],
             errors: ["ReportableError"]}
    for home, names in homes.items():
        for name in names:
            assert getattr(utils, name) is getattr(home, name), f"utils.{name}"
