"""Model registry, construction, and the conversion of a network into a score function."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

import sde_lib
from registry import Registry

_MODELS = Registry(
    "model", "Unknown model name '{name}': config.model.name must be one of {known}.")

# Modules whose import registers a network; imported on demand so `create_model` knows them all.
_NETWORK_MODULES = ("models.ncsnpp", "models.ddpm", "models.ncsnv2")


def register_model(cls=None, *, name: str | None = None):
    """Class decorator registering a network under `name` (default: the class name)."""
    return _MODELS.register(cls, name=name)


def _import_networks() -> None:
    import importlib

    for module in _NETWORK_MODULES:
        importlib.import_module(module)


def get_model(name: str) -> type[nn.Module]:
    """The network class registered as `name` (the config's `model.name`)."""
    if name not in _MODELS:
        _import_networks()
    return _MODELS.get(name)


def get_sigmas(config) -> torch.Tensor:
    """The geometric noise levels sigma_max ... sigma_min of SMLD/NCSN (float64, num_scales)."""
    sigmas = np.exp(np.linspace(np.log(config.model.sigma_max), np.log(config.model.sigma_min),
                                config.model.num_scales))
    return torch.from_numpy(sigmas)


def register_sigmas(module: nn.Module, config) -> None:
    """Register the float64 `sigmas` buffer (`get_sigmas`, num_scales noise levels) on `module`.

    A continuous-time network never indexes it by a trained step count, so for
    `config.training.continuous` the buffer is marked as derived from the config
    (`config_derived_buffers`): checkpoint loading accepts any length and then keeps the
    config's values, so sampling may use another `model.num_scales` than training did (the same
    length loads the checkpoint's values, equal to rounding). Discrete-time networks keep the
    strict check.
    """
    module.register_buffer("sigmas", get_sigmas(config))
    training = config.get("training") if hasattr(config, "get") else None
    if training is not None and bool(training.get("continuous", False)):
        module.config_derived_buffers = ("sigmas",)


def config_derived_keys(model: nn.Module) -> set[str]:
    """State-dict keys of `model` whose values come from its config, not from checkpoints."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules()
            for name in getattr(module, "config_derived_buffers", ())}


def default_device() -> torch.device:
    """CUDA when a GPU is present, else CPU (chosen at run time, never at import)."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def config_device(config) -> torch.device:
    """The device a config asks for: `config.device` when set (a torch.device or a name such as
    "cpu"), else `default_device()`. Configs leave it unset, so it is chosen where they are used."""
    device = getattr(config, "device", None)
    return torch.device(device) if device is not None else default_device()


def create_model(config, subspace: bool = False) -> nn.Module:
    """Build the network `config.model.name` on `config_device(config)` (no DataParallel).

    `subspace=True` (the subspace-diffusion code's wrapper, configured by absl flags there) is
    refused with the name of its replacement.
    """
    if subspace:
        raise ValueError(
            "create_model(config, subspace=True) built the reference's flag-configured wrapper: "
            "use models.subspace_model.load_subspace_model(config, ckpt_full, ckpt_subspace, "
            "sizes, cutoffs, dataset) or build_subspace_model(...) instead.")
    model_cls = get_model(config.model.name)
    model = model_cls(config)
    return model.to(config_device(config))


def get_model_fn(model: nn.Module, train: bool = False) -> Callable:
    """A function (x, labels) -> network output, with the model in train or eval mode."""

    def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if train:
            model.train()
        else:
            model.eval()
        return model(x, labels)

    return model_fn


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, train: bool = False,
                 continuous: bool = False) -> Callable:
    """The score function s(x, t) of `model` under `sde`.

    VP and sub-VP networks predict -sigma(t) * score (noise prediction), so their output is divided
    by -sigma(t); VE networks output the score itself. Labels come from `sde.time_to_label`.
    """
    model_fn = get_model_fn(model, train=train)

    if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):

        def score_fn(x, t):
            if continuous or isinstance(sde, sde_lib.subVPSDE):
                labels = sde.time_to_label(t, continuous=True)
                output = model_fn(x, labels)
                std = sde.sigma(t)
            else:
                labels = sde.time_to_label(t, continuous=False)
                output = model_fn(x, labels)
                std = sde.sqrt_1m_alphas_cumprod.to(labels.device)[labels.long()]
            return -output / std.reshape(-1, *([1] * (x.dim() - 1)))

    elif isinstance(sde, sde_lib.VESDE):

        def score_fn(x, t):
            labels = sde.time_to_label(t, continuous=continuous)
            return model_fn(x, labels)

    else:
        raise NotImplementedError(f"SDE class {sde.__class__.__name__} is not supported.")

    return score_fn

