"""Every config under configs/ builds its network; the small built-in configs also run it.

Full-size networks (up to ~110M parameters) are constructed on the meta device (shapes, no
memory, no initialisation cost) and compared with the original code's manifest when one exists
for that config and size. The built-in CPU configs run a real forward pass at 32, 16 and 8 pixels
(full and subspace models).
"""
import functools
import importlib
import json
from pathlib import Path

import pytest
import torch
from conftest import REFERENCE

import sde_lib
from models.utils import create_model, get_model

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
META = torch.device("meta")


def _config_modules() -> list[str]:
    """Dotted names of the config files (modules defining `get_config`) under configs/."""
    names = []
    for path in sorted((ROOT / "configs").rglob("*.py")):
        if path.name == "__init__.py" or path.name.startswith("default_"):
            continue
        names.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return names


CONFIGS = _config_modules()
BUILTIN = [name for name in CONFIGS if name.startswith("configs.builtin.")]


def _load(module: str):
    config = importlib.import_module(module).get_config()
    config.device = CPU
    return config


@functools.cache
def _summary(module: str, image_size: int | None = None) -> dict:
    """Class, state-dict keys/shapes and parameter counts of the network of `module`.

    Built at `image_size` when given (a subspace model), else at the config's own size.
    """
    config = _load(module)
    if image_size is not None:
        config.data.image_size = image_size
    config.device = META
    with META:
        model = create_model(config)
    state = model.state_dict()
    return {
        "class": type(model).__name__,
        "state_dict": [(k, list(v.shape)) for k, v in state.items()],
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "sigmas": (state["sigmas"].dtype, tuple(state["sigmas"].shape)) if "sigmas" in state
        else None,
    }


def test_configs_are_found():
    assert len(CONFIGS) >= 40 and BUILTIN, CONFIGS


@pytest.mark.parametrize("module", CONFIGS)
def test_config_builds(module):
    config = _load(module)
    summary = _summary(module, config.data.image_size)
    assert summary["class"] == get_model(config.model.name).__name__
    assert summary["num_params"] > 0
    if summary["sigmas"] is not None:  # the SMLD noise levels, kept in float64
        assert summary["sigmas"] == (torch.float64, (config.model.num_scales,))


def _manifest_paths(reference: Path, module: str) -> list[Path]:
    relative = module.removeprefix("configs.").replace(".", "/")
    folder = reference / "manifests" / Path(relative).parent
    return sorted(path for path in folder.glob("*.json")
                  if path.stem.rpartition("_")[0] == Path(relative).name
                  and path.stem.rpartition("_")[2].isdigit())


# The configs the original's manifests cover (none when the reference data is absent; then
# test_manifests_cover_the_papers_configs skips with the reason).
WITH_MANIFESTS = ([m for m in CONFIGS if _manifest_paths(REFERENCE, m)] if REFERENCE.is_dir()
                  else [])


def test_manifests_cover_the_papers_configs(reference_dir):
    assert len(WITH_MANIFESTS) == 9, WITH_MANIFESTS


@pytest.mark.parametrize("module", WITH_MANIFESTS)
def test_config_matches_original_manifests(reference_dir, module):
    """Keys in order, shapes and counts equal the original's at every size it has a manifest for
    (the config's own size and, for the subspace configs, the smaller ones)."""
    relative = module.removeprefix("configs.").replace(".", "/")
    for path in _manifest_paths(reference_dir, module):
        manifest = json.loads(path.read_text())
        summary = _summary(module, manifest["image_size"])
        where = f"{relative} at {manifest['image_size']}"
        assert summary["class"] == manifest["model_class"], where
        expected = [(key.removeprefix("module."), shape) for key, shape in manifest["state_dict"]]
        assert summary["state_dict"] == expected, where
        assert summary["num_params"] == manifest["num_params"], where
        assert summary["num_trainable"] == manifest["num_trainable_params"], where


@pytest.mark.parametrize("size", [32, 16, 8])
@pytest.mark.parametrize("module", BUILTIN)
def test_builtin_config_forward(module, size):
    config = _load(module)
    config.data.image_size = size
    torch.manual_seed(0)
    model = create_model(config).eval()
    sde, _ = sde_lib.get_sde(config)
    t = torch.tensor([0.1, 0.9])
    labels = sde.time_to_label(t, continuous=config.training.continuous)
    x = torch.rand(2, config.data.num_channels, size, size)
    with torch.no_grad():
        out = model(x, labels)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
