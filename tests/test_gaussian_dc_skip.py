"""The Gaussian DC skip of the built-in DDPM++ (config.model.gaussian_dc_skip)."""
import pytest
import torch

import datasets
import run_lib
import sde_lib
import subspace_lib
import utils
from configs.builtin import subvp_ddpmpp_small, ve_ncsnpp_small
from models import utils as mutils


def _config(size: int = 8, skip: bool = True):
    config = subvp_ddpmpp_small.get_config()
    config.data.image_size = size
    config.model.gaussian_dc_skip = skip
    config.device = torch.device("cpu")
    return config


def test_builtin_subvp_config_turns_it_on_and_the_originals_do_not_have_it():
    assert subvp_ddpmpp_small.get_config().model.gaussian_dc_skip is True
    from configs.subvp import cifar10_ddpmpp_continuous

    assert "gaussian_dc_skip" not in cifar10_ddpmpp_continuous.get_config().model


def test_untrained_network_outputs_the_gaussian_noise_prediction_of_the_dc():
    """The output layers start at zero (init_scale 0), so the output is the skip alone:
    sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x_DC - alpha mu), constant per channel / 8."""
    torch.manual_seed(0)
    config = _config(8)
    net = mutils.create_model(config).eval()
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.randn(3, 3, dtype=torch.float64)
    cov = a @ a.T + 3 * torch.eye(3, dtype=torch.float64)
    net.set_dc_statistics(mean, cov)
    sde = sde_lib.subVPSDE(config.model.beta_min, config.model.beta_max, 100)
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    with torch.no_grad():
        out = net(x, sde.time_to_label(t))
    dc = x.to(torch.float64).mean(dim=(2, 3)) * 8
    expected = torch.empty(4, 3, dtype=torch.float64)
    for i in range(4):
        ti = t[i].double()
        alpha, sigma = sde.alpha(ti), sde.sigma(ti)
        c = alpha**2 * cov + sigma**2 * torch.eye(3, dtype=torch.float64)
        expected[i] = sigma * torch.linalg.solve(c, dc[i] - alpha * mean)
    torch.testing.assert_close(out.double(), (expected / 8)[:, :, None, None].expand(4, 3, 8, 8),
                               atol=1e-4, rtol=1e-4)
    # Same through the subspace library's lifting of DC coordinates.
    lifted = subspace_lib.upsample(expected.reshape(4, 3, 1, 1), 3)
    torch.testing.assert_close(out.double(), lifted, atol=1e-4, rtol=1e-4)


def test_statistics_are_required_and_only_for_noise_predicting_networks():
    net = mutils.create_model(_config(8))
    assert not net.has_dc_statistics()
    with pytest.raises(RuntimeError, match="no data statistics"):
        net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    assert mutils.create_model(_config(8, skip=False)).has_dc_statistics()
    ve = ve_ncsnpp_small.get_config()
    ve.data.image_size = 8
    ve.model.gaussian_dc_skip = True
    with pytest.raises(ValueError, match="continuous VP or sub-VP"):
        mutils.create_model(ve)


def test_statistics_come_from_the_training_data_and_survive_checkpoints(tmp_path):
    config = _config(8)
    state = run_lib.create_train_state(config, torch.device("cpu"))
    net = state["model"]
    run_lib.set_dc_statistics(net, config, torch.device("cpu"))
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    scaler = datasets.get_data_scaler(config)
    dc = torch.cat([scaler(b["image"]).mean(dim=(2, 3)) * 8 for b in train_ds]).double()
    torch.testing.assert_close(net.dc_mean, dc.mean(0))
    torch.testing.assert_close(net.dc_cov, torch.cov(dc.T))
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint(path, state)
    loaded = utils.load_model_weights(mutils.create_model(config), path)
    torch.testing.assert_close(loaded.dc_cov, net.dc_cov)
    assert list(loaded.state_dict())[:3] == ["sigmas", "dc_mean", "dc_cov"]
