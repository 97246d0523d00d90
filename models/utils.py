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
from collections.abc import Callable, Collection, Iterator, Mapping
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

    `training.precision` / `sampling.precision` are checked (`check_precision_setting`: an
    explicit reduced precision the device lacks natively gets one warning), and when either is
    "auto" the precision it means for this network is measured (`_measured_precision`) and kept
    as the attribute `auto_precision` (see `network_precision`); the layout is chosen for the
    precision the network will run in.

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
    settings = {check_precision_setting(config.get(section, {}).get("precision", "fp32"), device,
                                        f"{section}.precision")
                for section in ("training", "sampling")}
    format_name = config.model.get("memory_format", "auto")
    resolve_memory_format(format_name, device)  # checks the name before any measurement
    model = model.to(device)
    # What "auto" means for this network (`network_precision`); measured only where the device
    # computes a reduced precision natively.
    model.auto_precision = _measured_precision(model, config) if "auto" in settings else "fp32"
    precisions = {model.auto_precision if setting == "auto" else setting for setting in settings}
    precision = min(precisions - {"fp32"}, default="fp32")
    memory_format = resolve_memory_format(format_name, device, precision=precision)
    if memory_format is None:
        memory_format = _measured_memory_format(model, config, precision)
    return model.to(memory_format=memory_format)


# How a network is evaluated: memory format, reduced precision, compilation.

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


# The values of config.training.precision / config.sampling.precision: "auto" is measured per
# machine and network (`_measured_precision`), the others are taken as given.
PRECISION_SETTINGS = ("auto", *PRECISIONS)


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError of one sentence."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision '{precision}': set config.training.precision or "
                         f"config.sampling.precision to one of {', '.join(PRECISIONS)}.")
    return precision


def cpu_capabilities() -> Mapping[str, object]:
    """The instruction-set features torch detects on this CPU (`torch.cpu.get_capabilities()`:
    "avx2", "avx512_bf16", "amx_bf16", "avx512_fp16", ... on x86, "bf16", "fp16_arith", ... on
    ARM), or an empty mapping when this torch cannot tell. The one place the CPU's capabilities
    are read."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None:
        return {}
    try:
        return get_capabilities()
    except RuntimeError:
        return {}


# CPU features that compute a reduced precision natively (x86: AVX-512 or AMX instructions;
# ARM: the bf16 / half-precision arithmetic extensions). Without any of them torch emulates the
# precision, converting to float32 and back around each operation.
_NATIVE_CPU_FEATURES = {"bf16": ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
                        "fp16": ("avx512_fp16", "amx_fp16", "fp16_arith")}
# Network calls in an emulated precision against fp32, measured on an AVX2-only AMD EPYC
# (docs/precision.md): NCSN++ 32 px bf16 9-57x slower, the demo network bf16 2.4-5.1x and
# fp16 3.6-5.4x slower, depending on the memory format.
EMULATED_SLOWDOWN = "2-60x"


def native_precisions(device: torch.device | str) -> frozenset[str]:
    """The precisions `device` computes natively: fp32 always; on the CPU bf16 / fp16 when
    `cpu_capabilities` reports the instructions for them; on CUDA fp16 from compute capability
    7.0 (tensor cores) and bf16 from 8.0; fp32 only on other devices."""
    device = torch.device(device)
    native = {"fp32"}
    if device.type == "cpu":
        capabilities = cpu_capabilities()
        native |= {precision for precision, features in _NATIVE_CPU_FEATURES.items()
                   if any(capabilities.get(feature) for feature in features)}
    elif device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        native |= {"fp16"} if major >= 7 else set()
        native |= {"bf16"} if major >= 8 else set()
    return frozenset(native)


def _device_kind(device: torch.device) -> str:
    """A short name of what the device computes with, for messages ("CPU (AVX2)")."""
    if device.type == "cpu":
        return f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"GPU (compute capability {major}.{minor})"
    return device.type


# (precision, device type) pairs already warned about in this process.
_WARNED_PRECISIONS: set[tuple[str, str]] = set()


def check_precision_setting(setting: str, device: torch.device | str | None = None,
                            field: str = "sampling.precision") -> str:
    """`setting`, the value of `config.<field>`, if it is one of PRECISION_SETTINGS, else a
    ValueError of one sentence. With a `device`, an explicit reduced precision that the device
    does not compute natively (`native_precisions`) is logged as one warning line with the
    expected slowdown, once per process for each precision and device type ("auto" never picks
    such a precision)."""
    if setting not in PRECISION_SETTINGS:
        raise ValueError(f"Unknown precision '{setting}': set config.training.precision or "
                         f"config.sampling.precision to one of {', '.join(PRECISION_SETTINGS)}.")
    if device is None or setting in ("auto", "fp32"):
        return setting
    device = torch.device(device)
    if setting in native_precisions(device):
        return setting
    if (setting, device.type) not in _WARNED_PRECISIONS:
        _WARNED_PRECISIONS.add((setting, device.type))
        slowdown = (f"about {EMULATED_SLOWDOWN} slower than fp32 (measured on an AVX2-only CPU)"
                    if device.type == "cpu" else "slower than fp32")
        logger.warning("config.%s = %s, but this %s has no native %s: torch emulates it and "
                       "network calls run %s; use fp32, or auto to pick a reduced precision "
                       "only where it is measured faster.", field, setting,
                       _device_kind(device), setting, slowdown)
    return setting


def network_precision(model: nn.Module, setting: str) -> str:
    """The precision the network `model` runs in under `setting`: the setting itself, except
    for "auto", which means the precision `create_model` measured for this network (its
    `auto_precision`; for a module composed of such networks, their common choice; fp32 for
    networks built otherwise or disagreeing parts)."""
    if setting != "auto":
        return setting
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    chosen = getattr(model, "auto_precision", None)
    if chosen is None:
        parts = {getattr(module, "auto_precision", None) for module in model.modules()} - {None}
        chosen = parts.pop() if len(parts) == 1 else "fp32"
    return chosen


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
_MEASURED_FORMATS: dict[str, str] = {}


def time_forward_variants(model: nn.Module, image_size: int, num_channels: int,
                          variants: Mapping[str, tuple[str, torch.memory_format]],
                          batch: int = 1, repeats: int = 3) -> dict[str, float]:
    """Median seconds of one forward pass of `model` (eval mode, no gradients, not compiled) on
    a `batch` of images for each named (precision, memory format) variant, the variants
    interleaved over `repeats` rounds after a warm-up round. The model is left contiguous, in
    its own mode, and the global random generator is not touched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, num_channels, image_size, image_size, device=device,
                    generator=generator)
    # Integer labels: networks that look their noise level up by index need them, and the
    # others (time or sigma embeddings) take them as the number 1.
    labels = torch.ones(batch, dtype=torch.long, device=device)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for round_ in range(repeats + 1):
                for name, (precision, memory_format) in variants.items():
                    model.to(memory_format=memory_format)
                    with network_options(precision=precision, compile=False):
                        _synchronize(device)
                        start = time.perf_counter()
                        run_network(model, x, labels)
                        _synchronize(device)
                    if round_ > 0:  # round 0 warms up
                        seconds[name].append(time.perf_counter() - start)
    finally:
        model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return {name: statistics.median(values) for name, values in seconds.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory_format(model: nn.Module, image_size: int, num_channels: int,
                          precision: str = "fp32", batch: int = 1,
                          repeats: int = 3) -> tuple[torch.memory_format, dict[str, float]]:
    """Time one forward pass of `model` in `precision` in each memory format
    (`time_forward_variants`); return channels-last when its median is below
    CHANNELS_LAST_MARGIN times contiguous's, else contiguous, with the medians in seconds."""
    medians = time_forward_variants(
        model, image_size, num_channels,
        {name: (precision, memory_format) for name, memory_format in _LAYOUTS.items()},
        batch=batch, repeats=repeats)
    faster = medians["channels_last"] < CHANNELS_LAST_MARGIN * medians["contiguous"]
    return _LAYOUTS["channels_last" if faster else "contiguous"], medians


MEMORY_FORMAT_CACHE_ENV = "SUBSPACE_DIFFUSION_CACHE"


def measurement_cache_folder() -> Path:
    """The folder of per-machine measurements ("auto" memory formats and precisions):
    $SUBSPACE_DIFFUSION_CACHE, else $XDG_CACHE_HOME/subspace-diffusion, else
    ~/.cache/subspace-diffusion."""
    folder = os.environ.get(MEMORY_FORMAT_CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                ".cache")
        folder = os.path.join(base, "subspace-diffusion")
    return Path(folder)


def memory_format_cache_path() -> Path:
    """The file of measured memory formats: memory_formats.json in
    `measurement_cache_folder()`."""
    return measurement_cache_folder() / "memory_formats.json"


def precision_cache_path() -> Path:
    """The file of measured "auto" precisions: precisions.json in
    `measurement_cache_folder()`."""
    return measurement_cache_folder() / "precisions.json"


@functools.cache
def processor_name() -> str:
    """The CPU's model name ("model name" in /proc/cpuinfo on Linux, where
    `platform.processor()` is empty), else what `platform` knows. The one place it is read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_kind() -> str:
    """The CPU's model name and the kind of machine it makes for timings: the instruction set
    torch's kernels run with (`torch.backends.cpu.get_cpu_capability()`: AVX2, AVX512, ...),
    AMX when present, and whether bf16 is native or emulated, e.g. "Intel(R) Xeon(R) Processor
    (AVX512, AMX, native bf16)". Machines of one model name can differ in these, and timings
    differ 2x or more between the kinds."""
    capabilities = cpu_capabilities()
    parts = [torch.backends.cpu.get_cpu_capability()]
    if any(capabilities.get(f) for f in ("amx_tile", "amx_bf16", "amx_int8")):
        parts.append("AMX")
    parts.append("native bf16" if "bf16" in native_precisions("cpu") else "bf16 emulated")
    return f"{processor_name()} ({', '.join(parts)})"


def _read_format_cache(path: Path) -> dict[str, str]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


# Model fields that leave the network's computation unchanged (not part of the cache key).
_LAYOUT_NEUTRAL_FIELDS = ("num_scales", "memory_format")


def _configuration_key(model: nn.Module, config, setting: str) -> str:
    """The key of a measurement for this network configuration, image size, `setting` (what
    else the answer depends on), device, thread count, torch version and CPU model."""
    image_size = int(config.data.image_size)
    num_channels = int(config.data.get("num_channels", 3))
    device = next(model.parameters()).device
    # N only sizes the table of noise levels: a run that samples with another N than it trained
    # with must keep its layout (and its numbers).
    fields = sorted((k, v) for k, v in config.model.items() if k not in _LAYOUT_NEUTRAL_FIELDS)
    network = hashlib.sha256(repr(fields).encode()).hexdigest()[:16]
    return (f"{config.model.name}/{network}/{image_size}px/{num_channels}ch/{setting}/"
            f"{device}/{torch.get_num_threads()}threads/torch{torch.__version__}/"
            f"{processor_name()}")


def _measured_once(memory: dict[str, str], path: Path, key: str, choices: Collection[str],
                   measure: Callable[[], str]) -> str:
    """The answer for `key`: from `memory`, else from the JSON file `path` (when it is one of
    `choices`), else `measure()`, which is then kept in both (in memory only when the file
    cannot be written)."""
    if key not in memory:
        known = _read_format_cache(path).get(key)
        if known in choices:
            memory[key] = known
    if key not in memory:
        memory[key] = measure()
        try:
            entries = _read_format_cache(path)
            entries[key] = memory[key]
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
        except OSError:
            logger.debug("Could not write %s; the measurement stays in memory.", path)
    return memory[key]


def _probe_batch(image_size: int) -> int:
    """A batch of 8 at 32 px and the same pixel count above (at least one image)."""
    return min(8, max(1, 8 * 32 * 32 // image_size ** 2))


def _measured_memory_format(model: nn.Module, config, precision: str) -> torch.memory_format:
    """`measure_memory_format` once per machine for each network configuration, image size,
    precision, device, thread count and torch version. The answer is kept in
    `memory_format_cache_path()` (in memory only when that file cannot be written), so that
    every later run, and every process of a run, uses the same layout and gives the same
    numbers."""
    image_size = int(config.data.image_size)
    num_channels = int(config.data.get("num_channels", 3))
    device = next(model.parameters()).device
    path = memory_format_cache_path()

    def measure() -> str:
        # The probe costs about eight network evaluations of the batch; in a precision the
        # device only emulates (already warned about) one image, as each call may take seconds.
        batch = _probe_batch(image_size) if precision in native_precisions(device) else 1
        chosen, medians = measure_memory_format(model, image_size, num_channels, precision,
                                                batch=batch)
        name = "channels_last" if chosen is torch.channels_last else "contiguous"
        logger.debug("Memory format of %s at %d px (%s, %s): %s (one forward at batch %d: "
                     "contiguous %.4f s, channels-last %.4f s), kept in %s.", config.model.name,
                     image_size, precision, device, name, batch, medians["contiguous"],
                     medians["channels_last"], path)
        return name

    key = _configuration_key(model, config, precision)
    return _LAYOUTS[_measured_once(_MEASURED_FORMATS, path, key, _LAYOUTS, measure)]


# "auto" picks a reduced precision only when its network call takes at most this fraction of
# fp32's: a reduced precision changes the network's output by about 1e-2 of its size, so a
# near-tie keeps fp32.
REDUCED_PRECISION_MARGIN = 0.8
_MEASURED_PRECISIONS: dict[str, str] = {}


def measure_precision(model: nn.Module, image_size: int, num_channels: int,
                      layouts: Mapping[str, torch.memory_format], batch: int = 1,
                      repeats: int = 3) -> tuple[str, dict[str, float]]:
    """Time one forward pass of `model` in each precision of `layouts` ("fp32" among them),
    each in its memory format (`time_forward_variants`); return the fastest reduced precision
    when its median is below REDUCED_PRECISION_MARGIN times fp32's, else fp32, with the
    medians in seconds."""
    if "fp32" not in layouts:
        raise ValueError("measure_precision needs fp32 among the precisions it compares.")
    medians = time_forward_variants(
        model, image_size, num_channels,
        {precision: (precision, layout) for precision, layout in layouts.items()},
        batch=batch, repeats=repeats)
    fastest = min(medians, key=medians.__getitem__)
    faster = medians[fastest] < REDUCED_PRECISION_MARGIN * medians["fp32"]
    return (fastest if faster else "fp32"), medians


def _measured_precision(model: nn.Module, config) -> str:
    """What precision "auto" means for this network on this machine: fp32 without a
    measurement when its device computes no reduced precision natively (`native_precisions`);
    else `measure_precision` over fp32 and the native ones, each in the memory format it would
    run in, once per machine and configuration (`precision_cache_path()`, as the memory
    format)."""
    device = next(model.parameters()).device
    candidates = [precision for precision in PRECISIONS if precision in native_precisions(device)]
    if candidates == ["fp32"]:
        return "fp32"
    image_size = int(config.data.image_size)
    num_channels = int(config.data.get("num_channels", 3))
    format_name = config.model.get("memory_format", "auto")
    path = precision_cache_path()

    def measure() -> str:
        layouts = {precision: resolve_memory_format(format_name, device, precision=precision)
                   or _measured_memory_format(model, config, precision)
                   for precision in candidates}
        chosen, medians = measure_precision(model, image_size, num_channels, layouts,
                                            batch=_probe_batch(image_size))
        logger.info("Precision of %s at %d px on %s for 'auto': %s (one forward: %s), kept in "
                    "%s.", config.model.name, image_size, _device_kind(device), chosen,
                    ", ".join(f"{name} {value:.4f} s" for name, value in medians.items()), path)
        return chosen

    key = _configuration_key(model, config, f"memory_format={format_name}")
    return _measured_once(_MEASURED_PRECISIONS, path, key, candidates, measure)


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
    states, divergence estimates) stays in float32/float64. "auto": each network in the
    precision `create_model` measured for it (`network_precision`). compile: False, True (the
    default `torch.compile` backend) or a backend name; the compiled module is cached per
    network and the network itself (and its state_dict keys) is unchanged.
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
        precision=(current.precision if precision is None
                   else check_precision_setting(precision)),
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
    the forward pass runs under autocast when a reduced precision is in force for this network
    (`network_precision`; the output then comes back in x's dtype), and the output comes back
    in the default contiguous layout.
    """
    options = current_network_options()
    channels_last = x.dim() == 4 and model_memory_format(model) is torch.channels_last
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    network = _compiled(model, options.compile) if options.compile else model
    dtype = PRECISIONS[network_precision(model, options.precision)]
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

