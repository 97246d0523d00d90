"""Model registry, construction, and the conversion of a network into a score function."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import sde_lib
from files import atomic_write_text
from registry import Registry

logger = logging.getLogger(__name__)

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
    """Build the network `config.model.name` on `config_device(config)` (no DataParallel), in
    the memory format `config.model.memory_format` selects (`resolve_memory_format`; "auto" on
    the CPU times this network in both formats, once per machine and configuration).

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
    device = config_device(config)
    # Configs written for the original code (or by hand) may lack these fields: defaults apply.
    precisions = {config.get(section, {}).get("precision", "fp32")
                  for section in ("training", "sampling")}
    precision = min(precisions - {"fp32"}, default="fp32")
    memory_format = resolve_memory_format(config.model.get("memory_format", "auto"), device,
                                          precision=precision)
    model = model.to(device)
    if memory_format is None:
        memory_format = _measured_memory_format(model, config, precision)
    return model.to(memory_format=memory_format)


# How a network is evaluated: memory format, reduced precision, compilation.

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError of one sentence."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision '{precision}': set config.training.precision or "
                         f"config.sampling.precision to one of {', '.join(PRECISIONS)}.")
    return precision


def resolve_memory_format(name: str, device: torch.device | str,
                          precision: str = "fp32") -> torch.memory_format | None:
    """The memory format of network weights and inputs for `config.model.memory_format`, or
    None when it is to be measured for the network at hand (`measure_memory_format`).

    "auto" is measured on the CPU (`create_model` times the network in both formats once per
    machine and network configuration), channels-last on CUDA in reduced precision (tensor
    cores; not measurable here), contiguous otherwise.
    """
    if name not in MEMORY_FORMATS:
        raise ValueError(f"Unknown memory format '{name}': set config.model.memory_format to "
                         f"one of {', '.join(MEMORY_FORMATS)}.")
    if name == "auto":
        device_type = torch.device(device).type
        if device_type == "cpu":
            return None
        name = "channels_last" if device_type == "cuda" and precision != "fp32" else "contiguous"
    return _LAYOUTS[name]


# channels-last must be at least this much faster to be chosen: contiguous is the layout of the
# original code, so near-ties keep its rounding.
CHANNELS_LAST_MARGIN = 0.97
_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
_MEASURED_FORMATS: dict[str, torch.memory_format] = {}


def measure_memory_format(model: nn.Module, image_size: int, num_channels: int,
                          precision: str = "fp32", batch: int = 1,
                          repeats: int = 3) -> tuple[torch.memory_format, dict[str, float]]:
    """Time one forward pass of `model` (eval mode, no gradients, `precision`) on a `batch` of
    images in each memory format, interleaved over `repeats` rounds after a warm-up call each;
    return channels-last when its median is below CHANNELS_LAST_MARGIN times contiguous's, else
    contiguous, with the medians in seconds. The model is left contiguous, in its own mode, and
    the global random generator is not touched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, num_channels, image_size, image_size, device=device,
                    generator=generator)
    # Integer labels: networks that look their noise level up by index need them, and the
    # others (time or sigma embeddings) take them as the number 1.
    labels = torch.ones(batch, dtype=torch.long, device=device)
    seconds: dict[str, list[float]] = {name: [] for name in _LAYOUTS}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), network_options(precision=precision, compile=False):
            for round_ in range(repeats + 1):
                for name, memory_format in _LAYOUTS.items():
                    model.to(memory_format=memory_format)
                    start = time.perf_counter()
                    run_network(model, x, labels)
                    if round_ > 0:  # round 0 warms up
                        seconds[name].append(time.perf_counter() - start)
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    faster = medians["channels_last"] < CHANNELS_LAST_MARGIN * medians["contiguous"]
    return _LAYOUTS["channels_last" if faster else "contiguous"], medians


MEMORY_FORMAT_CACHE_ENV = "SUBSPACE_DIFFUSION_CACHE"


def memory_format_cache_path() -> Path:
    """The file of measured memory formats: $SUBSPACE_DIFFUSION_CACHE, else
    $XDG_CACHE_HOME/subspace-diffusion, else ~/.cache/subspace-diffusion; memory_formats.json."""
    folder = os.environ.get(MEMORY_FORMAT_CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        folder = os.path.join(base, "subspace-diffusion")
    return Path(folder) / "memory_formats.json"


@functools.cache
def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_format_cache(path: Path) -> dict[str, str]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


# Model fields that leave the network's computation unchanged (not part of the cache key).
_LAYOUT_NEUTRAL_FIELDS = ("num_scales", "memory_format")


def _measured_memory_format(model: nn.Module, config, precision: str) -> torch.memory_format:
    """`measure_memory_format` once per machine for each network configuration, image size,
    precision, device, thread count and torch version. The answer is kept in
    `memory_format_cache_path()` (in memory only when that file cannot be written), so that
    every later run, and every process of a run, uses the same layout and gives the same
    numbers."""
    image_size = int(config.data.image_size)
    num_channels = int(config.data.get("num_channels", 3))
    device = next(model.parameters()).device
    # N only sizes the table of noise levels: a run that samples with another N than it trained
    # with must keep its layout (and its numbers).
    fields = sorted((k, v) for k, v in config.model.items() if k not in _LAYOUT_NEUTRAL_FIELDS)
    network = hashlib.sha256(repr(fields).encode()).hexdigest()[:16]
    key = (f"{config.model.name}/{network}/{image_size}px/{num_channels}ch/{precision}/"
           f"{device}/{torch.get_num_threads()}threads/torch{torch.__version__}/"
           f"{_processor_name()}")
    path = memory_format_cache_path()
    if key not in _MEASURED_FORMATS:
        known = _read_format_cache(path).get(key)
        if known in _LAYOUTS:
            _MEASURED_FORMATS[key] = _LAYOUTS[known]
    if key not in _MEASURED_FORMATS:
        # A batch of 8 at 32 px and the same pixel count above (at least one image): the probe
        # costs about eight network evaluations of that size.
        batch = min(8, max(1, 8 * 32 * 32 // image_size ** 2))
        chosen, medians = measure_memory_format(model, image_size, num_channels, precision,
                                                batch=batch)
        _MEASURED_FORMATS[key] = chosen
        name = "channels_last" if chosen is torch.channels_last else "contiguous"
        try:
            entries = _read_format_cache(path)
            entries[key] = name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
        except OSError:
            logger.debug("Could not write %s; the measured memory format stays in memory.", path)
        logger.debug("Memory format of %s at %d px (%s, %s): %s (one forward at batch %d: "
                     "contiguous %.4f s, channels-last %.4f s), kept in %s.", config.model.name,
                     image_size, precision, device, name, batch, medians["contiguous"],
                     medians["channels_last"], path)
    return _MEASURED_FORMATS[key]


def model_memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's first convolution weight is stored channels-last (see
    `create_model`), else contiguous_format."""
    for param in model.parameters():
        if param.dim() == 4 and param.shape[-1] * param.shape[-2] > 1:
            if not param.is_contiguous() and param.is_contiguous(
                    memory_format=torch.channels_last):
                return torch.channels_last
            return torch.contiguous_format
    return torch.contiguous_format


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
    """Reduced precision and compilation of the network calls made through `get_model_fn`.

    precision: "fp32", "bf16" or "fp16": autocast of the network's forward pass only; its output
    is returned in the input's dtype, so everything around the network (SDE arithmetic, solver
    states, divergence estimates) stays in float32/float64. compile: False, True (the default
    `torch.compile` backend) or a backend name; the compiled module is cached per network and
    the network itself (and its state_dict keys) is unchanged.
    """

    precision: str = "fp32"
    compile: bool | str = False


_DEFAULT_OPTIONS = NetworkOptions()
_NETWORK_OPTIONS: contextvars.ContextVar[NetworkOptions | None] = contextvars.ContextVar(
    "network_options", default=None)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def network_options(precision: str | None = None,
                    compile: bool | str | None = None) -> Iterator[NetworkOptions]:
    """Within the block, network calls through `get_model_fn` use these options (None keeps the
    enclosing block's value; outside any block: fp32, not compiled)."""
    current = current_network_options()
    options = NetworkOptions(
        precision=current.precision if precision is None else check_precision(precision),
        compile=current.compile if compile is None else compile)
    token = _NETWORK_OPTIONS.set(options)
    try:
        yield options
    finally:
        _NETWORK_OPTIONS.reset(token)


def current_network_options() -> NetworkOptions:
    """The options in force for network calls here (see `network_options`)."""
    return _NETWORK_OPTIONS.get() or _DEFAULT_OPTIONS


def _compiled(model: nn.Module, backend: bool | str) -> nn.Module:
    """`torch.compile(model)`, built once per network and backend, on first use."""
    backend_name = "inductor" if backend is True else str(backend)
    per_model = _COMPILED.setdefault(model, {})
    if backend_name not in per_model:
        per_model[backend_name] = torch.compile(model, backend=backend_name)
    return per_model[backend_name]


def run_network(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`model(x, labels)` with the current `network_options` and the model's memory format.

    The input is laid out like the model's weights (channels-last after `create_model` on CPU),
    the forward pass runs under autocast when a reduced precision is in force (the output then
    comes back in x's dtype), and the output comes back in the default contiguous layout.
    """
    options = current_network_options()
    channels_last = x.dim() == 4 and model_memory_format(model) is torch.channels_last
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    network = _compiled(model, options.compile) if options.compile else model
    dtype = PRECISIONS[options.precision]
    if dtype is None:
        output = network(x, labels)
    else:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            output = network(x, labels).to(x.dtype)
    return output.contiguous() if channels_last else output


def get_model_fn(model: nn.Module, train: bool = False) -> Callable:
    """A function (x, labels) -> network output, with the model in train or eval mode, evaluated
    by `run_network` (memory format, precision and compilation in force)."""

    def model_fn(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if train:
            model.train()
        else:
            model.eval()
        return run_network(model, x, labels)

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

