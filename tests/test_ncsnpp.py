"""NCSN++ / DDPM++: parameter layout of every original config, every option on a tiny network,
the output scalings, initialisation fidelity and the FIR resampling layers."""
import gc
import importlib
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from models import layerspp
from models import up_or_down_sampling as uds
from models.ncsnpp import NCSNpp
from models.utils import create_model, get_model

# Every NCSN++ manifest of ../shared/reference/manifests: (config path, image size).
MANIFESTS = [
    ("subvp/cifar10_ddpmpp_continuous", 32), ("subvp/cifar10_ddpmpp_continuous", 16),
    ("subvp/cifar10_ddpmpp_continuous", 8), ("subvp/cifar10_ddpmpp_deep_continuous", 32),
    ("subvp/cifar10_ddpmpp_deep_continuous", 16), ("subvp/cifar10_ddpmpp_deep_continuous", 8),
    ("ve/cifar10_ncsnpp_continuous", 32), ("ve/cifar10_ncsnpp_continuous", 16),
    ("ve/cifar10_ncsnpp_continuous", 8), ("ve/cifar10_ncsnpp_deep_continuous", 32),
    ("ve/cifar10_ncsnpp_deep_continuous", 16), ("ve/cifar10_ncsnpp_deep_continuous", 8),
    ("vp/cifar10_ddpmpp_continuous", 32),
    ("ve/celebahq_256_ncsnpp_continuous", 256), ("ve/celebahq_256_ncsnpp_continuous", 128),
    ("ve/celebahq_256_ncsnpp_continuous", 64), ("ve/church_ncsnpp_continuous", 256),
    ("ve/church_ncsnpp_continuous", 128), ("ve/church_ncsnpp_continuous", 64),
]


def _config(path: str):
    return importlib.import_module("configs." + path.replace("/", ".")).get_config()


def test_manifest_list_is_complete(reference_dir):
    found = set()
    for path in (reference_dir / "manifests").rglob("*.json"):
        manifest = json.loads(path.read_text())
        if manifest.get("model_class") == "NCSNpp":
            found.add((manifest["config"], manifest["image_size"]))
    assert found == set(MANIFESTS)


@pytest.mark.parametrize("config_path,size", MANIFESTS, ids=[f"{c}_{s}" for c, s in MANIFESTS])
def test_state_dict_matches_original_manifest(reference_dir, config_path, size):
    manifest = json.loads((reference_dir / "manifests" / f"{config_path}_{size}.json").read_text())
    config = _config(config_path)
    config.data.image_size = size
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = get_model(config.model.name)(config)
    assert type(model).__name__ == manifest["model_class"]
    state = model.state_dict()
    expected = [(key.removeprefix("module."), shape) for key, shape in manifest["state_dict"]]
    assert [(key, list(value.shape)) for key, value in state.items()] == expected
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == manifest["num_trainable_params"]
    assert len(trainable) == manifest["num_ema_shadow_tensors"]
    frozen = [[n, list(p.shape)] for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == [[k.removeprefix("module."), s]
                      for k, s in manifest["non_trainable_parameters"]]
    for key, shape, dtype in manifest["buffers"]:
        buffer = state[key.removeprefix("module.")]
        assert list(buffer.shape) == shape and str(buffer.dtype) == f"torch.{dtype}"
    assert state["sigmas"].dtype == torch.float64
    del model, state
    gc.collect()


def _tiny_config(**model_overrides):
    config = _config("ve/cifar10_ncsnpp_continuous")
    config.device = torch.device("cpu")
    config.data.image_size = 8
    config.model.update(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.0, num_scales=10)
    config.model.update(**model_overrides)
    if config.model.embedding_type == "positional":
        config.training.continuous = False
    return config


def _time_cond(config, batch):
    if config.model.embedding_type == "fourier":
        return torch.tensor([0.05, 3.0, 20.0][:batch])  # sigma
    return torch.tensor([0.0, 4.7, 9.0][:batch])  # labels, truncated to sigma indices


def _combinations():
    for progressive, (progressive_input, combine), resblock, embedding, fir in itertools.product(
            ("none", "output_skip", "residual"),
            (("none", "sum"), ("residual", "sum"), ("input_skip", "sum"), ("input_skip", "cat")),
            ("ddpm", "biggan"), ("fourier", "positional"), (False, True)):
        yield dict(progressive=progressive, progressive_input=progressive_input,
                   progressive_combine=combine, resblock_type=resblock, embedding_type=embedding,
                   fir=fir)


COMBINATIONS = list(_combinations())


@pytest.mark.parametrize("options", COMBINATIONS,
                         ids=["-".join(str(v) for v in o.values()) for o in COMBINATIONS])
def test_every_option_combination_runs(options):
    torch.manual_seed(0)
    config = _tiny_config(**options)
    model = NCSNpp(config).eval()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        out = model(x, _time_cond(config, 3))  # the forward asserts every module was used once
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fir", [False, True])
def test_ddpm_blocks_without_resampling_convolutions(fir):
    config = _tiny_config(resblock_type="ddpm", resamp_with_conv=False, fir=fir,
                          progressive="output_skip", progressive_input="input_skip")
    model = NCSNpp(config).eval()
    resamplers = [m for m in model.modules()
                  if isinstance(m, (layerspp.Upsample, layerspp.Downsample))]
    assert len(resamplers) == 4  # two in the U-Net, two pyramid resamplers
    assert all(not list(m.parameters()) for m in resamplers)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 8, 8), _time_cond(config, 2))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_unconditional_network_ignores_the_noise_level():
    model = NCSNpp(_tiny_config(conditional=False, scale_by_sigma=False)).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([0.1, 0.1])),
                                   model(x, torch.tensor([7.0, 30.0])))


def _pair(config_a, config_b):
    torch.manual_seed(0)
    a = NCSNpp(config_a).eval()
    b = NCSNpp(config_b).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("embedding", ["fourier", "positional"])
def test_scale_by_sigma_divides_by_sigma(embedding):
    scaled, plain = _pair(_tiny_config(embedding_type=embedding, scale_by_sigma=True),
                          _tiny_config(embedding_type=embedding, scale_by_sigma=False))
    x = torch.rand(3, 3, 8, 8)
    t = _time_cond(scaled.config, 3)
    sigma = t if embedding == "fourier" else scaled.sigmas[t.long()].float()
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, t) * sigma[:, None, None, None], plain(x, t),
                                   rtol=1e-5, atol=1e-6)


def test_uncentered_inputs_are_mapped_to_minus_one_one():
    uncentered = _tiny_config()
    centered = _tiny_config()
    centered.data.centered = True
    a, b = _pair(uncentered, centered)
    x = torch.rand(2, 3, 8, 8)
    t = torch.tensor([0.3, 4.0])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t), b(2 * x - 1, t))


def test_fourier_weights_are_frozen_and_listed_first():
    model = NCSNpp(_tiny_config())
    fourier = model.all_modules[0]
    assert isinstance(fourier, layerspp.GaussianFourierProjection)
    assert not fourier.W.requires_grad
    assert list(model.state_dict())[:2] == ["sigmas", "all_modules.0.W"]
    assert model.sigmas.dtype == torch.float64 and model.sigmas.shape == (10,)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="progressive is .sideways.; it must be one of"):
        NCSNpp(_tiny_config(progressive="sideways"))
    config = _tiny_config()
    config.training.continuous = False
    with pytest.raises(ValueError, match="continuous training"):
        NCSNpp(config)
    with pytest.raises(ValueError, match="divisible"):
        NCSNpp(_tiny_config(ch_mult=(1, 2, 2, 2, 2)))


def test_create_model_builds_registered_ncsnpp():
    model = create_model(_tiny_config())
    assert isinstance(model, NCSNpp)
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("case,seed", [("case_ve_ncsnpp", 1000), ("case_subvp_ddpmpp", 2000)])
def test_initialisation_reproduces_the_original(reference_dir, case, seed):
    """Same RNG consumption as the original: its seeded init + the README's perturbation."""
    import ml_collections

    config = ml_collections.ConfigDict(json.loads((reference_dir / case / "config.json")
                                                  .read_text()))
    checkpoint = torch.load(reference_dir / case / "checkpoint_full.pth", weights_only=True)
    torch.manual_seed(seed)
    model = NCSNpp(config)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, param in model.named_parameters():
        perturbed = param.detach() + 0.02 * torch.randn(param.shape, generator=generator)
        torch.testing.assert_close(perturbed, checkpoint["model"]["module." + name], rtol=0,
                                   atol=0)


# FIR resampling layers.

def test_fused_resampling_convolutions_equal_the_unfused_ones_inside_the_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    k = (1, 3, 3, 1)
    up = uds.upsample_conv_2d(x, w, k)
    torch.testing.assert_close(up[..., 3:-3, 3:-3],
                               F.conv2d(uds.upsample_2d(x, k), w, padding=1)[..., 3:-3, 3:-3])
    down = uds.conv_downsample_2d(x, w, k)
    torch.testing.assert_close(
        down[..., 1:-1, 1:-1], uds.downsample_2d(F.conv2d(x, w, padding=1), k)[..., 1:-1, 1:-1])
    assert up.shape == (2, 5, 16, 16) and down.shape == (2, 5, 4, 4)


def test_fir_resampling_keeps_constants_and_naive_resampling_is_block_wise():
    ones = torch.ones(1, 2, 8, 8)
    fir = (1, 3, 3, 1)
    assert torch.equal(uds.upsample_2d(ones, fir)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    assert torch.equal(uds.downsample_2d(ones, fir)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    # The default kernel [1, 1] is nearest-neighbour up-sampling and 2x2 average pooling.
    x = torch.randn(1, 2, 4, 4)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(uds.upsample_2d(x), nearest)
    torch.testing.assert_close(uds.naive_upsample_2d(x), nearest)
    pooled = x.reshape(1, 2, 2, 2, 2, 2).mean(dim=(3, 5))
    torch.testing.assert_close(uds.downsample_2d(x), pooled)
    torch.testing.assert_close(uds.naive_downsample_2d(x), pooled)


def test_conv2d_layer_shapes_and_bias():
    layer = uds.Conv2d(3, 4, kernel=3, up=True)
    assert [k for k in layer.state_dict()] == ["weight", "bias"]
    assert layer(torch.randn(1, 3, 4, 4)).shape == (1, 4, 8, 8)
    assert uds.Conv2d(3, 4, kernel=3, down=True)(torch.randn(1, 3, 8, 8)).shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match="odd kernel"):
        uds.Conv2d(3, 4, kernel=2)
