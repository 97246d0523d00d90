"""The Gaussian DC model of the built-in DDPM++ (config.model.gaussian_dc)."""
import pytest
import torch

import datasets
import run_lib
import sde_lib
import subspace_lib
from configs.builtin import subvp_ddpmpp_small, ve_ncsnpp_small
from models import utils as mutils
from models.checkpoints import load_model_weights, save_checkpoint


def _config(size: int = 8, on: bool = True):
    config = subvp_ddpmpp_small.get_config()
    config.data.image_size = size
    config.model.gaussian_dc = on
    config.device = torch.device("cpu")
    return config


def test_builtin_subvp_config_turns_it_on_and_the_originals_do_not_have_it():
    assert subvp_ddpmpp_small.get_config().model.gaussian_dc is True
    from configs.subvp import cifar10_ddpmpp_continuous

    assert "gaussian_dc" not in cifar10_ddpmpp_continuous.get_config().model


def test_the_dc_of_the_output_is_the_gaussian_noise_prediction():
    """Whatever the weights, the output's per-channel mean is
    sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x_DC - alpha mu) / 8 (DC coordinates lifted to
    pixels); the rest of the output is the network's own."""
    torch.manual_seed(0)
    config = _config(8)
    net = mutils.create_model(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # an output of its own, DC included
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a = torch.randn(3, 3, dtype=torch.float64)
    cov = a @ a.T + 3 * torch.eye(3, dtype=torch.float64)
    net.set_dc_statistics(mean, cov)
    sde = sde_lib.subVPSDE(config.model.beta_min, config.model.beta_max, 100)
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    with torch.no_grad():
        out = net(x, sde.time_to_label(t))
        plain = mutils.create_model(_config(8, on=False))
        weights = {k: v for k, v in net.state_dict().items() if not k.startswith("dc_")}
        bias = f"all_modules.{len(net.all_modules) - 1}.bias"
        plain.load_state_dict({**weights, bias: torch.zeros(3)})
        raw = plain.eval()(x, sde.time_to_label(t))
    dc = x.to(torch.float64).mean(dim=(2, 3)) * 8
    expected = torch.empty(4, 3, dtype=torch.float64)
    for i in range(4):
        ti = t[i].double()
        alpha, sigma = sde.alpha(ti), sde.sigma(ti)
        c = alpha**2 * cov + sigma**2 * torch.eye(3, dtype=torch.float64)
        expected[i] = sigma * torch.linalg.solve(c, dc[i] - alpha * mean)
    torch.testing.assert_close(out.double().mean(dim=(2, 3)), expected / 8, atol=1e-6,
                               rtol=1e-5)
    assert float(raw.mean(dim=(2, 3)).abs().max()) > 1e-3  # the network did have a DC
    centred = raw - raw.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out - out.mean(dim=(2, 3), keepdim=True), centred, atol=1e-5,
                               rtol=1e-5)
    lifted = subspace_lib.upsample(expected.reshape(4, 3, 1, 1), 3)
    torch.testing.assert_close(out.double() - centred.double(), lifted, atol=1e-5, rtol=1e-5)


def test_the_output_conv_has_no_bias_to_drift():
    """A bias of the output conv would only shift the DC that the Gaussian model replaces: its
    gradient would be float rounding noise, which Adam scales into steps of about lr. With the
    option the conv has none, so every parameter of the network affects its output."""
    net = mutils.create_model(_config(8))
    plain = mutils.create_model(_config(8, on=False))
    assert net.all_modules[-1].bias is None and plain.all_modules[-1].bias is not None
    missing = set(plain.state_dict()) - set(net.state_dict())
    assert missing == {f"all_modules.{len(net.all_modules) - 1}.bias"}
    torch.manual_seed(0)
    net(torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])).square().sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0
               for p in net.parameters() if p.requires_grad and p.dim() > 1)


def test_statistics_start_standard_normal_and_only_noise_predicting_networks_have_them():
    net = mutils.create_model(_config(8))
    torch.testing.assert_close(net.dc_mean, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(net.dc_cov, torch.eye(3, dtype=torch.float64))
    assert "dc_cov" not in mutils.create_model(_config(8, on=False)).state_dict()
    with pytest.raises(ValueError, match="no Gaussian DC model"):
        mutils.create_model(_config(8, on=False)).set_dc_statistics(torch.zeros(3),
                                                                      torch.eye(3))
    ve = ve_ncsnpp_small.get_config()
    ve.data.image_size = 8
    ve.model.gaussian_dc = True
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
    save_checkpoint(path, state)
    loaded = load_model_weights(mutils.create_model(config), path)
    torch.testing.assert_close(loaded.dc_cov, net.dc_cov)
    assert list(loaded.state_dict())[:3] == ["sigmas", "dc_mean", "dc_cov"]
