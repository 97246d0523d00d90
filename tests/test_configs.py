"""Config files: every module loads, the two reference configs match field by field, the full-size
configs agree with the parameter manifests of the original networks, and the built-in family has
the documented values."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
import torch
from absl import flags
from ml_collections import config_flags

from models.utils import config_device, default_device

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SECTIONS = ("data", "model", "training", "sampling", "eval", "optim")
# Fields this project adds to the original configs.
ADDED_FIELDS = {("data", "root"), ("eval", "bpd_num_images"), ("eval", "inception"),
                ("eval", "inception_resize"),
                ("sampling", "steps"),
                ("sampling", "schedule"), ("sampling", "split"), ("sampling", "churn"),
                ("sampling", "eta"),
                ("model", "memory_format"), ("training", "precision"), ("training", "grad_accum"),
                ("training", "compile"), ("training", "min_time"), ("sampling", "precision"),
                ("sampling", "compile")}


def _config_modules() -> list[str]:
    """Dotted names of every config module under configs/ (packages excluded)."""
    paths = sorted(p for p in CONFIGS.rglob("*.py") if p.name != "__init__.py")
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in paths]


def _load(name: str) -> ml_collections.ConfigDict:
    """The config of module `name` (or `configs/<name>.py` when given as a relative path)."""
    if not name.startswith("configs."):
        name = "configs." + name.replace("/", ".")
    module = importlib.import_module(name)
    if hasattr(module, "get_config"):
        return module.get_config()
    return module.get_default_configs()


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """{(section, ..., field): value} of a nested dict; tuples become lists as in JSON."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = list(value) if isinstance(value, tuple) else value
    return flat


MODULES = _config_modules()


def test_every_original_config_file_exists():
    names = {m.removeprefix("configs.") for m in MODULES}
    expected = {
        "default_cifar10_configs", "default_celeba_configs", "default_lsun_configs",
        "subvp.cifar10_ddpm_continuous", "subvp.cifar10_ddpmpp_continuous",
        "subvp.cifar10_ddpmpp_deep_continuous", "subvp.cifar10_ncsnpp_continuous",
        "subvp.cifar10_ncsnpp_deep_continuous",
        "ve.bedroom_ncsnpp_continuous", "ve.celeba_ncsnpp", "ve.celebahq_256_ncsnpp_continuous",
        "ve.celebahq_ncsnpp_continuous", "ve.church_ncsnpp_continuous", "ve.cifar10_ddpm",
        "ve.cifar10_ncsnpp", "ve.cifar10_ncsnpp_continuous", "ve.cifar10_ncsnpp_deep_continuous",
        "ve.ffhq_256_ncsnpp_continuous", "ve.ffhq_ncsnpp_continuous",
        "ve.ncsn.celeba", "ve.ncsn.celeba_124", "ve.ncsn.celeba_1245", "ve.ncsn.celeba_5",
        "ve.ncsn.cifar10", "ve.ncsn.cifar10_124", "ve.ncsn.cifar10_1245", "ve.ncsn.cifar10_5",
        "ve.ncsnv2.bedroom", "ve.ncsnv2.celeba", "ve.ncsnv2.cifar10",
        "vp.cifar10_ddpmpp", "vp.cifar10_ddpmpp_continuous", "vp.cifar10_ddpmpp_deep_continuous",
        "vp.cifar10_ncsnpp", "vp.cifar10_ncsnpp_continuous", "vp.cifar10_ncsnpp_deep_continuous",
        "vp.ddpm.bedroom", "vp.ddpm.celebahq", "vp.ddpm.church", "vp.ddpm.cifar10",
        "vp.ddpm.cifar10_continuous", "vp.ddpm.cifar10_unconditional",
        "builtin.default_builtin_configs", "builtin.ve_ncsnpp_small", "builtin.subvp_ddpmpp_small",
    }
    assert expected <= names, f"missing config modules: {sorted(expected - names)}"


@pytest.mark.parametrize("name", MODULES)
def test_config_loads_with_sections_device_and_root(name):
    config = _load(name)
    assert isinstance(config, ml_collections.ConfigDict)
    for section in SECTIONS:
        assert isinstance(config.get(section), ml_collections.ConfigDict), section
    assert config.device is None and config_device(config) == default_device()
    assert "root" in config.data and config.data.root is None
    if hasattr(importlib.import_module(name), "get_config"):
        # Every runnable config can choose how its networks run; the defaults keep fp32.
        assert config.model.memory_format == "auto"
        assert (config.training.precision, config.sampling.precision) == ("fp32", "fp32")
        assert (config.training.grad_accum, config.training.compile) == (1, False)
        assert config.sampling.compile is False
    for field in ("dataset", "image_size", "num_channels", "centered"):
        assert field in config.data, field
    assert config.model.num_scales > 0 and config.model.sigma_min > 0
    if hasattr(importlib.import_module(name), "get_config"):
        assert "name" in config.model and "sde" in config.training or name.endswith("ncsn.celeba")
    # Two loads give equal but independent configs (no shared mutable state between calls).
    again = _load(name)
    again.data.image_size = 7
    assert config.data.image_size != 7


def test_device_is_chosen_where_the_config_is_used(monkeypatch):
    module = importlib.import_module("configs.ve.cifar10_ncsnpp_continuous")
    config = module.get_config()
    assert config.device is None
    assert config_device(config) == default_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_device(config) == torch.device("cuda:0")
    config.device = "cpu"  # an explicit choice wins, as a name or a torch.device
    assert config_device(config) == torch.device("cpu")


def test_configs_import_nothing_heavier_than_ml_collections():
    # Reading a config must not load torch, the networks or the SDEs.
    code = ("import sys, importlib\n"
            f"for name in {MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "heavy = [m for m in ('torch', 'numpy', 'models', 'sde_lib') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == ""


def test_fields_that_only_some_originals_have():
    assert _load("ve/church_ncsnpp_continuous").data.category == "church_outdoor"
    assert _load("ve/bedroom_ncsnpp_continuous").data.category == "bedroom"
    assert _load("vp/ddpm/bedroom").data.category == "bedroom"
    celebahq = _load("ve/celebahq_256_ncsnpp_continuous")
    assert celebahq.data.tfrecords_path.endswith(".tfrecords")
    assert (celebahq.data.dataset, celebahq.data.image_size) == ("CelebAHQ", 256)
    assert _load("vp/ddpm/celebahq").data.tfrecords_path.endswith(".tfrecords")
    assert "category" not in _load("ve/cifar10_ncsnpp_continuous").data
    assert "tfrecords_path" not in _load("default_lsun_configs").data
    church = _load("ve/church_ncsnpp_continuous")
    assert (church.model.sigma_max, church.model.num_scales) == (380, 2000)
    assert church.sampling.snr == 0.075
    # The original's quirks are kept: a misspelt field and a `loss` instead of an `sde`.
    assert _load("ve/ncsnv2/bedroom").training.continuouse is False
    assert "sde" not in _load("ve/ncsn/celeba").training


@pytest.mark.parametrize("case", ["case_ve_ncsnpp", "case_subvp_ddpmpp"])
def test_config_equals_reference_field_by_field(reference_dir, case):
    reference = json.loads((reference_dir / case / "config.json").read_text())
    meta = json.loads((reference_dir / case / "meta.json").read_text())
    ours = _flatten(_load(meta["config_name"]).to_dict())
    theirs = _flatten(reference)
    skipped = {("model", key) for key in meta["model_overrides"]} | {("device",)}
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"fields missing from our config: {missing}"
    assert set(ours) - set(theirs) == ADDED_FIELDS
    for key in sorted(set(theirs) - skipped):
        value, expected = ours[key], theirs[key]
        assert value == expected and type(value) is type(expected), (key, value, expected)


def _manifests(reference: Path) -> list[Path]:
    return sorted(p for p in (reference / "manifests").rglob("*.json") if p.name[0] != "_")


def test_every_manifest_has_its_config_file(reference_dir):
    manifests = _manifests(reference_dir)
    assert len(manifests) >= 21
    for path in manifests:
        name = json.loads(path.read_text())["config"]
        assert (CONFIGS / f"{name}.py").is_file(), f"no config file for manifest {path.name}"
        assert path.relative_to(reference_dir / "manifests").as_posix().startswith(name + "_")


def test_configs_agree_with_original_network_manifests(reference_dir):
    """Shapes in the manifests of the original networks follow from nf, ch_mult, num_res_blocks,
    attn_resolutions, num_scales, num_channels and the embedding of our configs."""
    for path in _manifests(reference_dir):
        manifest = json.loads(path.read_text())
        config = _load(manifest["config"])
        model, size = config.model, manifest["image_size"]
        shapes = dict(manifest["state_dict"])
        nf, mults, blocks = model.nf, model.ch_mult, model.num_res_blocks
        where = f"{manifest['config']} at {size}"
        assert manifest["model_class"] == {"ncsnpp": "NCSNpp", "ddpm": "DDPM"}[model.name], where
        assert shapes["module.sigmas"] == [model.num_scales], where
        fourier = model.embedding_type == "fourier" and model.name == "ncsnpp"
        assert ("module.all_modules.0.W" in shapes) == fourier, where
        if fourier:
            assert shapes["module.all_modules.0.W"] == [nf], where
        dense = "module.all_modules.1.weight" if fourier else "module.all_modules.0.weight"
        assert shapes[dense] == [4 * nf, 2 * nf if fourier else nf], where
        convs = [s for k, s in manifest["state_dict"] if len(s) == 4 and s[2:] == [3, 3]]
        channels = config.data.num_channels
        assert convs[0] == [nf, channels, 3, 3] and convs[-1] == [channels, nf * mults[0], 3, 3]
        res_convs = [s for k, s in manifest["state_dict"]
                     if k.endswith(".Conv_0.weight") and s[2:] == [3, 3]]
        assert len(res_convs) == len(mults) * (2 * blocks + 3), where
        assert {s[0] for s in res_convs} == {nf * m for m in mults}, where
        levels = {size // 2 ** i for i in range(len(mults))} & set(model.attn_resolutions)
        attention = sum(k.endswith(".NIN_3.W") for k in shapes)
        assert attention == 1 + (blocks + 1) * len(levels), where


def test_config_flags_load_by_path_and_override():
    path = CONFIGS / "subvp" / "cifar10_ddpmpp_continuous.py"
    argv = ["prog", f"--config={path}", "--config.data.image_size=16",
            "--config.data.root=/data/images.npz", "--config.model.nf=32"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert (config.data.image_size, config.model.nf) == (16, 32)
    assert config.data.root == "/data/images.npz"
    assert config.training.sde == "subvpsde"


def test_builtin_family_values():
    base = _load("builtin/default_builtin_configs")
    assert (base.data.dataset, base.data.image_size, base.data.num_channels) == ("BUILTIN", 32, 3)
    assert base.data.random_flip and not base.data.uniform_dequantization
    t = base.training
    assert (t.batch_size, t.n_iters, t.snapshot_freq, t.snapshot_freq_for_preemption) == (
        32, 2000, 500, 100)
    assert (t.log_freq, t.eval_freq, t.snapshot_sampling) == (25, 100, True)
    assert base.model.num_scales == 100 and base.model.ema_rate == 0.999 and base.seed == 42
    e = base.eval
    assert (e.batch_size, e.num_samples, e.begin_ckpt, e.end_ckpt) == (64, 64, 1, 1)
    o = base.optim
    assert (o.optimizer, o.lr, o.warmup, o.grad_clip) == ("Adam", 2e-4, 100, 1.0)

    ve = _load("builtin/ve_ncsnpp_small")
    original = _load("ve/cifar10_ncsnpp_continuous")
    same = ("embedding_type", "resblock_type", "progressive", "progressive_input", "fir",
            "fir_kernel", "skip_rescale", "scale_by_sigma", "fourier_scale", "conditional",
            "name")
    assert {k: ve.model[k] for k in same} == {k: original.model[k] for k in same}
    assert (ve.training.sde, ve.data.centered, ve.model.sigma_min, ve.model.sigma_max) == (
        "vesde", False, 0.01, 50)
    assert (ve.sampling.predictor, ve.sampling.corrector, ve.sampling.snr) == (
        "reverse_diffusion", "langevin", 0.16)

    sub = _load("builtin/subvp_ddpmpp_small")
    original = _load("subvp/cifar10_ddpmpp_continuous")
    assert {k: sub.model[k] for k in same} == {k: original.model[k] for k in same}
    assert (sub.training.sde, sub.data.centered, sub.sampling.predictor, sub.sampling.corrector) \
        == ("subvpsde", True, "euler_maruyama", "none")
    for config in (ve, sub):
        m = config.model
        assert (m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.dropout) == (
            16, (1, 2, 2), 1, (8,), 0.0)


@pytest.mark.parametrize("name", ["builtin/ve_ncsnpp_small", "builtin/subvp_ddpmpp_small"])
def test_builtin_networks_build_at_every_subspace_size(name):
    from models.utils import create_model

    for size in (32, 16, 8):
        config = _load(name)
        config.device = torch.device("cpu")
        config.data.image_size = size
        torch.manual_seed(0)
        model = create_model(config).eval()
        x = torch.rand(2, 3, size, size)
        labels = torch.tensor([0.5, 20.0]) if config.training.sde == "vesde" else torch.tensor(
            [10.0, 900.0])
        with torch.no_grad():
            out = model(x, labels)
        assert out.shape == x.shape and torch.isfinite(out).all()
