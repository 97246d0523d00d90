"""DDPM, NCSN and NCSNv2 networks and their normalisations, on tiny shapes.

The DDPM state dicts are checked key by key against the manifests of the original code; the rest
checks behaviour: output shapes, centring, sigma scaling, conditioning, layer formulas.
"""
import importlib
import json

import ml_collections
import pytest
import torch

import models.ddpm  # noqa: F401  (registers the networks)
import models.ncsnv2  # noqa: F401
from models import normalization
from models.ddpm import DDPM, AttnBlock
from models.ncsn_layers import ResidualBlock
from models.utils import create_model, get_sigmas

CPU = torch.device("cpu")


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add 0.02 N(0, 1) to every parameter, so zero-initialised output layers carry signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _twin(model: torch.nn.Module, config) -> torch.nn.Module:
    """A second network built from `config` carrying `model`'s weights."""
    other = create_model(config)
    other.load_state_dict(model.state_dict())
    return other.eval()


# --------------------------------------------------------------------------------------------
# DDPM against the manifests of the original code


@pytest.mark.parametrize("config_path", ["vp/ddpm/cifar10_continuous", "ve/cifar10_ddpm"])
def test_ddpm_matches_original_manifest(reference_dir, config_path):
    manifest = json.loads((reference_dir / "manifests" / f"{config_path}_32.json").read_text())
    assert manifest["model_class"] == "DDPM"
    config = importlib.import_module("configs." + config_path.replace("/", ".")).get_config()
    config.data.image_size = manifest["image_size"]
    config.device = CPU
    # Layouts leave the state dict alone; "auto" would time this 36M-parameter network in both
    # (test_network_options covers that measurement).
    config.model.memory_format = "contiguous"
    model = create_model(config)
    assert isinstance(model, DDPM)

    state = model.state_dict()
    expected = [(key.removeprefix("module."), shape) for key, shape in manifest["state_dict"]]
    assert [(key, list(value.shape)) for key, value in state.items()] == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == manifest["num_trainable_params"]
    assert len(trainable) == manifest["num_ema_shadow_tensors"]
    for key, shape, dtype in manifest["buffers"]:
        buffer = state[key.removeprefix("module.")]
        assert list(buffer.shape) == shape and str(buffer.dtype) == f"torch.{dtype}"
    torch.testing.assert_close(model.sigmas, get_sigmas(config), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# DDPM behaviour on a tiny network


def _ddpm_config(**model_overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(dict(image_size=16, centered=True, num_channels=3))
    config.model = ml_collections.ConfigDict(dict(
        name="ddpm", sigma_min=0.01, sigma_max=50.0, num_scales=10, dropout=0.1,
        scale_by_sigma=False, nonlinearity="swish", nf=32, ch_mult=(1, 2), num_res_blocks=1,
        attn_resolutions=(8,), resamp_with_conv=True, conditional=True,
        # Twins of different configs are compared to 1e-6: one layout for all ("auto" is
        # measured per configuration).
        memory_format="contiguous"))
    config.model.update(model_overrides)
    config.device = CPU
    return config


def test_ddpm_forward_shape_and_conditioning():
    torch.manual_seed(0)
    model = _perturb(create_model(_ddpm_config()))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([10.0, 10.0]))
        other = model(x, torch.tensor([900.0, 10.0]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out[0] - other[0]).abs().max() > 1e-3 * out.abs().max()  # label changes the output
    torch.testing.assert_close(out[1], other[1])  # ... per sample only


def test_ddpm_attention_placement_follows_image_size():
    config = _ddpm_config()
    n_attn = lambda c: sum(isinstance(m, AttnBlock) for m in create_model(c).all_modules)  # noqa: E731
    assert n_attn(config) == 3  # 8x8 level on the way down and up, plus the middle block
    config.data.image_size = 32
    assert n_attn(config) == 1  # no 8x8 level: only the middle block


def test_ddpm_uncentred_input_is_mapped_to_minus_one_one():
    torch.manual_seed(1)
    centred = _perturb(create_model(_ddpm_config()))
    config = _ddpm_config()
    config.data.centered = False
    uncentred = _twin(centred, config)
    x = torch.rand(2, 3, 16, 16)
    labels = torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(uncentred(x, labels), centred(2 * x - 1, labels))


def test_ddpm_scale_by_sigma_divides_by_indexed_sigma():
    torch.manual_seed(2)
    plain = _perturb(create_model(_ddpm_config()))
    scaled = _twin(plain, _ddpm_config(scale_by_sigma=True))
    x = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 4, 9])
    sigmas = get_sigmas(_ddpm_config()).float()
    with torch.no_grad():
        out = scaled(x, labels)
        expected = plain(x, labels) / sigmas[labels][:, None, None, None]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="integer"):
        scaled(x, labels.float())


def test_ddpm_unconditional_ignores_labels():
    torch.manual_seed(3)
    model = _perturb(create_model(_ddpm_config(conditional=False)))
    assert not any("Dense" in key for key in model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([1.0])), model(x, torch.tensor([500.0])))


def test_ddpm_rejects_input_of_another_size():
    model = create_model(_ddpm_config())
    with pytest.raises(ValueError, match="16x16"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1))


def test_attention_block_is_softmax_attention_over_pixels():
    torch.manual_seed(4)
    block = _perturb(AttnBlock(32)).double()
    x = torch.randn(2, 32, 3, 4, dtype=torch.float64)
    h = block.GroupNorm_0(x)
    q, k, v = (nin(h).flatten(2) for nin in (block.NIN_0, block.NIN_1, block.NIN_2))
    out = torch.empty_like(q)
    for b in range(2):
        for i in range(12):  # every query pixel separately
            logits = torch.stack([q[b, :, i] @ k[b, :, j] for j in range(12)]) / 32 ** 0.5
            out[b, :, i] = v[b] @ torch.softmax(logits, dim=0)
    expected = x + block.NIN_3(out.reshape(x.shape))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)


# --------------------------------------------------------------------------------------------
# NCSN and NCSNv2


def _ncsn_config(name: str, image_size: int = 16, **model_overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        dict(image_size=image_size, centered=False, num_channels=3))
    # One layout for every configuration: "auto" measures each one apart, and two twins laid
    # out differently round differently (1.4e-6 apart under load, above the 1e-6 compared).
    config.model = ml_collections.ConfigDict(dict(
        name=name, sigma_min=0.01, sigma_max=50.0, num_scales=6, scale_by_sigma=True,
        normalization="InstanceNorm++", nonlinearity="elu", nf=8, memory_format="contiguous"))
    config.model.update(model_overrides)
    config.device = CPU
    return config


NCSN_NAMES = ["ncsn", "ncsnv2_64", "ncsnv2_128", "ncsnv2_256"]


@pytest.mark.parametrize("name", NCSN_NAMES)
def test_ncsn_family_forward(name):
    torch.manual_seed(5)
    model = _perturb(create_model(_ncsn_config(name)))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 5]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() > 0
    with pytest.raises(ValueError, match="discrete-time"):
        model(x, torch.tensor([0.0, 5.0]))


@pytest.mark.parametrize("name", NCSN_NAMES)
def test_ncsn_family_uncentred_input_is_mapped(name):
    torch.manual_seed(6)
    uncentred = _perturb(create_model(_ncsn_config(name)))
    centred_config = _ncsn_config(name)
    centred_config.data.centered = True
    centred = _twin(uncentred, centred_config)
    x = torch.rand(2, 3, 16, 16)
    y = torch.tensor([1, 4])
    with torch.no_grad():
        torch.testing.assert_close(uncentred(x, y), centred(2 * x - 1, y))


@pytest.mark.parametrize("name", ["ncsnv2_64", "ncsnv2_128", "ncsnv2_256"])
def test_ncsnv2_conditions_only_through_one_over_sigma(name):
    torch.manual_seed(7)
    model = _perturb(create_model(_ncsn_config(name)))
    unscaled = _twin(model, _ncsn_config(name, scale_by_sigma=False))
    x = torch.rand(1, 3, 16, 16).expand(6, -1, -1, -1)
    y = torch.arange(6)
    with torch.no_grad():
        out = model(x, y)
        raw = unscaled(x, y)
    sigmas = model.sigmas.float()[:, None, None, None]
    torch.testing.assert_close(out * sigmas, raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw, raw[:1].expand_as(raw))  # the body ignores the label
    assert out[0].abs().max() < out[-1].abs().max()  # sigma_max first: smallest output


def test_ncsn_is_conditioned_through_its_normalisations():
    torch.manual_seed(8)
    model = _perturb(create_model(_ncsn_config("ncsn")))
    assert "sigmas" not in model.state_dict()
    assert model.normalizer.embed.num_embeddings == 6
    x = torch.rand(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 5]))
    assert (out[0] - out[1]).abs().max() > 1e-3 * out.abs().max()


def test_ncsnv2_layouts():
    """Stage and refine-block names of the score-SDE port, and the deeper nets' widths."""
    model = create_model(_ncsn_config("ncsnv2_256", nf=4))
    children = [name for name, _ in model.named_children()]
    assert children == ["act", "begin_conv", "normalizer", "end_conv", "res1", "res2", "res3",
                        "res31", "res4", "res5", "refine1", "refine2", "refine3", "refine31",
                        "refine4", "refine5"]
    assert list(model.state_dict())[0] == "sigmas"
    assert model.res5[1].conv1.weight.shape == (16, 16, 3, 3)  # 4 nf at the deepest stage
    assert getattr(model.refine2.output_convs, "1_1_conv").weight.shape[0] == 8  # -> 2 nf
    assert hasattr(model.refine5.output_convs, "3_2_conv")  # the end block has 3 RCUs
    deeper = create_model(_ncsn_config("ncsnv2_128", nf=4))
    assert not hasattr(deeper, "res31") and hasattr(deeper, "refine5")


@pytest.mark.parametrize("resample, dilation, size", [
    (None, 1, 8), ("down", 1, 4), ("down", 2, 8), (None, 4, 8)])
def test_residual_block_resolution(resample, dilation, size):
    """Dilated blocks keep the resolution (padding = dilation); plain 'down' blocks halve it."""
    block = ResidualBlock(4, 6, normalization.InstanceNorm2dPlus, torch.nn.ELU(),
                          resample=resample, dilation=dilation)
    with torch.no_grad():
        assert block(torch.randn(2, 4, 8, 8)).shape == (2, 6, size, size)


# --------------------------------------------------------------------------------------------
# Normalisations


def test_instance_norm_plus_formula():
    torch.manual_seed(9)
    norm = normalization.InstanceNorm2dPlus(5).double()
    with torch.no_grad():
        norm.beta.normal_()
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 3 + torch.arange(5.0)[:, None, None]
    mu = x.mean(dim=(2, 3), keepdim=True)
    s = x.var(dim=(2, 3), unbiased=False, keepdim=True).add(1e-5).sqrt()
    m = mu.mean(dim=1, keepdim=True)
    v = mu.var(dim=1, keepdim=True).add(1e-5).sqrt()
    shape = (1, 5, 1, 1)
    expected = norm.gamma.view(shape) * ((x - mu) / s + norm.alpha.view(shape) * (mu - m) / v)
    expected = expected + norm.beta.view(shape)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected)


def test_conditional_instance_norm_plus_selects_parameters_per_level():
    torch.manual_seed(10)
    conditional = normalization.ConditionalInstanceNorm2dPlus(5, num_classes=3)
    plain = normalization.InstanceNorm2dPlus(5)
    with torch.no_grad():
        conditional.embed.weight.normal_()
        gamma, alpha, beta = conditional.embed.weight[2].chunk(3)
        plain.gamma.copy_(gamma)
        plain.alpha.copy_(alpha)
        plain.beta.copy_(beta)
        x = torch.randn(2, 5, 4, 4)
        torch.testing.assert_close(conditional(x, torch.tensor([2, 2])), plain(x))
        assert not torch.allclose(conditional(x, torch.tensor([0, 0])), plain(x))


def test_get_normalization():
    config = _ncsn_config("ncsn")
    assert normalization.get_normalization(config) is normalization.InstanceNorm2dPlus
    layer = normalization.get_normalization(config, conditional=True)(7)
    assert isinstance(layer, normalization.ConditionalInstanceNorm2dPlus)
    assert layer.embed.weight.shape == (6, 21)  # num_classes falls back to num_scales
    config.model.num_classes = 4
    assert normalization.get_normalization(config, conditional=True)(7).embed.num_embeddings == 4
    for name in ("InstanceNorm", "VarianceNorm", "GroupNorm"):
        config.model.normalization = name
        layer = normalization.get_normalization(config)(8)
        x = torch.randn(2, 8, 4, 4)
        assert layer(x).shape == x.shape
    config.model.normalization = "GroupNorm"
    with pytest.raises(ValueError, match="conditional normalization 'GroupNorm'"):
        normalization.get_normalization(config, conditional=True)
    config.model.normalization = "BatchNorm"
    with pytest.raises(ValueError, match="InstanceNorm\\+\\+"):
        normalization.get_normalization(config)


def test_variance_norm_divides_by_spatial_std():
    norm = normalization.VarianceNorm2d(3)
    x = torch.randn(2, 3, 5, 5) * 4 + 2
    expected = norm.alpha.view(1, 3, 1, 1) * x / (x.var(dim=(2, 3), keepdim=True) + 1e-5).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(norm(x), expected)
