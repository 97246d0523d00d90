"""Speed of the CIFAR-10 NCSN++ / DDPM++ score models: one network evaluation and one training
step, this project against the original score-SDE code in the same run.

For each model and image size, the median wall-clock time of a forward pass (eval mode,
`torch.no_grad()`, through `models.utils.get_model_fn`, i.e. the path the samplers take) in
float32 and in bfloat16 autocast, each with contiguous and channels-last weights, the FLOP count
of one evaluation (`torch.utils.flop_counter.FlopCounterMode`), the achieved GFLOP/s, and, as the
yardstick, the GFLOP/s of an n x n float32 matrix product timed in the same run; what
`model.memory_format` "auto" picks on this machine; then one training step (loss, backward,
Adam, EMA) at the largest size.

A reduced precision the CPU does not compute natively (`models.utils.native_precisions`: no
AVX-512 BF16 / AMX on x86) is emulated by torch at 2-60x the fp32 time per call, which made the
bf16 rows take half an hour on an AVX2-only machine: such variants are skipped, and said so,
unless `--force`; forced variants whose first call takes longer than `--cap` seconds are dropped
after that call (also said). The line on `sampling.precision` "auto" says what it picks here.

With `--original PATH` (a checkout of yang-song/score_sde_pytorch or bjing2016/subspace-diffusion)
the original networks and training step are imported from PATH and timed alongside: the checkout
is not modified, its CUDA extension loader is replaced in memory so that `op/` takes its own
pure-PyTorch CPU path, and its modules are removed from `sys.modules` again after import. Every
variant is timed once per repeat in turn (interleaved), so a change of machine load hits all of
them; ratios are medians of the per-repeat ratios. The original gets the same weights, so the
table also shows how far each variant's output is from the original's float32 output. Without
`--original` only this project's numbers are printed.

    python bench/bench_networks.py [--original /path/to/score_sde_pytorch] [--models ncsnpp]
        [--sizes 32 16 8] [--batch 8] [--threads 2] [--repeats 5] [--train_batch 8]
        [--force] [--cap 30]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import losses  # noqa: E402
import sde_lib  # noqa: E402
from models import utils as mutils  # noqa: E402
from models.ema import ExponentialMovingAverage  # noqa: E402
from models.utils import get_model  # noqa: E402

MODELS = {
    "ncsnpp": "ve/cifar10_ncsnpp_continuous",
    "ddpmpp": "subvp/cifar10_ddpmpp_continuous",
}
# Top-level module names that the original code and this project share.
_SHARED_NAMES = ("models", "op", "sde_lib", "losses", "configs", "utils", "sampling",
                 "likelihood", "datasets")
# (label, memory format, precision) of this project's variants.
VARIANTS = (("fp32 contiguous", "contiguous", "fp32"),
            ("fp32 channels-last", "channels_last", "fp32"),
            ("bf16 contiguous", "contiguous", "bf16"),
            ("bf16 channels-last", "channels_last", "bf16"))
ORIGINAL = "original fp32"


def build(config_path: str, image_size: int, seed: int = 0) -> tuple[torch.nn.Module, object]:
    """The network of `configs/<config_path>.py` at `image_size`, on CPU, in eval mode."""
    config = importlib.import_module("configs." + config_path.replace("/", ".")).get_config()
    config.data.image_size = image_size
    torch.manual_seed(seed)
    return get_model(config.model.name)(config).eval(), config


def conditioning(config, batch: int) -> torch.Tensor:
    """A mid-range noise input: sigma(0.5) for Fourier (VE) models, label 499.5 otherwise."""
    if config.model.embedding_type == "fourier":
        sigma = config.model.sigma_min * (config.model.sigma_max / config.model.sigma_min) ** 0.5
        return torch.full((batch,), float(sigma))
    return torch.full((batch,), 499.5)


def runnable_variants(force: bool) -> tuple[tuple, list[str]]:
    """This project's VARIANTS to time on this CPU, and a note per skipped precision: a
    precision the CPU only emulates is skipped unless `force`."""
    native = mutils.native_precisions("cpu")
    emulated = sorted({precision for _, _, precision in VARIANTS} - native)
    if force or not emulated:
        return VARIANTS, []
    notes = [f"{precision} variants skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) "
             f"has no native {precision}, so each call would take {mutils.EMULATED_SLOWDOWN} "
             "the fp32 time (seconds to minutes per call at 32 px); --force times them, "
             "dropping any whose first call exceeds --cap seconds."
             for precision in emulated]
    return tuple(v for v in VARIANTS if v[2] not in emulated), notes


def first_calls(calls: dict[str, Callable[[], object]], cap: float,
                keep: tuple[str, ...]) -> tuple[dict[str, object], list[str]]:
    """Call each function once; return its output by name and a note for each one (except
    those named in `keep`) whose call took longer than `cap` seconds, which is removed from
    `calls`."""
    outputs, notes = {}, []
    for label in list(calls):
        start = time.perf_counter()
        outputs[label] = calls[label]()
        seconds = time.perf_counter() - start
        if seconds > cap and label not in keep:
            del calls[label]
            notes.append(f"{label} dropped: its first call took {seconds:.1f} s (over --cap "
                         f"{cap:g} s).")
    return outputs, notes


def time_calls(fn, repeats: int, warmup: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU time of `fn()` over `repeats` calls."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock and process CPU times of every function, called once each per repeat in turn
    ({name: {"wall": [...], "cpu": [...]}}). On a shared machine the CPU time is the steadier
    measure: it leaves out the time the process waited for a core."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def ratio_to(times: dict, name: str, baseline: str, kind: str = "wall") -> float:
    """Median over repeats of baseline time / time of `name` (above 1: `name` is faster)."""
    return statistics.median(b / t for b, t in zip(times[baseline][kind], times[name][kind]))


def _ratios(times: dict, name: str, original: bool) -> str:
    """"wall / cpu" speed-ups against the original, or "-" without it."""
    if not original:
        return "-"
    return f"{ratio_to(times, name, ORIGINAL):.2f}x / {ratio_to(times, name, ORIGINAL, 'cpu'):.2f}x"


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(n: int = 2048, repeats: int = 9) -> float:
    """Achieved GFLOP/s of an n x n float32 matrix product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    wall, _ = time_calls(lambda: a @ b, repeats, warmup=2)
    return 2 * n ** 3 / wall / 1e9


# ----------------------------------------------------------------------------------------------
# The original code, imported in isolation.


class _NoCompiledKernels:
    """Stands in for a CUDA extension of the original `op/`; its CPU path never calls it."""

    def __init__(self, name: str):
        self.name = name

    def __getattr__(self, attribute: str):
        raise RuntimeError(f"The original's compiled '{self.name}' kernel was called; the "
                           "benchmark runs its pure-PyTorch CPU path only.")


@contextlib.contextmanager
def _original_on_path(path: Path):
    """Import modules from the original checkout at `path` (CUDA extension loads stubbed),
    then restore this project's modules."""
    import torch.utils.cpp_extension as cpp_extension

    def shared(name: str) -> bool:
        return name.split(".")[0] in _SHARED_NAMES

    ours = {name: module for name, module in sys.modules.items() if shared(name)}
    for name in ours:
        del sys.modules[name]
    load = cpp_extension.load
    cpp_extension.load = lambda name, *args, **kwargs: _NoCompiledKernels(name)
    # This project's folder leaves the path meanwhile: its regular packages would otherwise win
    # over the original's namespace packages (the original's configs/ has no __init__.py).
    saved_path = list(sys.path)
    sys.path[:] = [str(path)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        yield
    finally:
        sys.path[:] = saved_path
        cpp_extension.load = load
        for name in [n for n in sys.modules if shared(n)]:
            del sys.modules[name]
        sys.modules.update(ours)


class Original:
    """The original score-SDE modules needed to build its networks and take a training step."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path).resolve()
        if not (path / "models" / "ncsnpp.py").is_file() or not (path / "op").is_dir():
            raise SystemExit(f"error: {path} is not a checkout of the original score-SDE code "
                             "(no models/ncsnpp.py and op/): pass --original the folder of a "
                             "clone of yang-song/score_sde_pytorch.")
        self.path = path
        with _original_on_path(path):
            self.mutils = importlib.import_module("models.utils")
            for module in ("models.ncsnpp", "models.ddpm"):
                importlib.import_module(module)
            self.ema = importlib.import_module("models.ema")
            self.losses = importlib.import_module("losses")
            self.sde_lib = importlib.import_module("sde_lib")
            self.configs = {name: importlib.import_module(
                "configs." + config.replace("/", ".")) for name, config in MODELS.items()}

    def network(self, name: str, image_size: int, weights: dict) -> tuple[torch.nn.Module, object]:
        """The original network `name` at `image_size` on CPU with `weights` (our state dict)."""
        config = self.configs[name].get_config()
        config.data.image_size = image_size
        config.device = torch.device("cpu")
        model = self.mutils.get_model(config.model.name)(config)
        model.load_state_dict(weights, strict=True)
        return model.eval(), config

    def train_step(self, name: str, image_size: int, weights: dict) -> Callable:
        """One original training step (loss, backward, Adam, EMA) on a fixed batch."""
        model, config = self.network(name, image_size, weights)
        sde = self.sde_lib.VESDE(config.model.sigma_min, config.model.sigma_max,
                                 config.model.num_scales) if config.training.sde == "vesde" else \
            self.sde_lib.subVPSDE(config.model.beta_min, config.model.beta_max,
                                  config.model.num_scales)
        optimizer = self.losses.get_optimizer(config, model.parameters())
        state = dict(optimizer=optimizer, model=model, step=0,
                     ema=self.ema.ExponentialMovingAverage(model.parameters(),
                                                           decay=config.model.ema_rate))
        step_fn = self.losses.get_step_fn(
            sde, train=True, optimize_fn=self.losses.optimization_manager(config),
            reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
            likelihood_weighting=config.training.likelihood_weighting)
        return state, step_fn


# ----------------------------------------------------------------------------------------------
# This project's variants.


def our_network(name: str, image_size: int, memory_format: str) -> tuple[torch.nn.Module, object]:
    """Our network `name` at `image_size` on CPU, built by `create_model` in `memory_format`."""
    config = importlib.import_module("configs." + MODELS[name].replace("/", ".")).get_config()
    config.data.image_size = image_size
    config.device = torch.device("cpu")
    config.model.memory_format = memory_format
    torch.manual_seed(0)
    return mutils.create_model(config).eval(), config


def our_train_step(name: str, image_size: int, memory_format: str, precision: str,
                   weights: dict) -> tuple[dict, Callable]:
    """Our training state and step function (loss, backward, Adam, EMA) for one variant."""
    model, config = our_network(name, image_size, memory_format)
    model.load_state_dict(weights)
    state = dict(model=model, optimizer=losses.get_optimizer(config, model.parameters()),
                 ema=ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate),
                 step=0)
    sde, _ = sde_lib.get_sde(config)
    step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                                 reduce_mean=config.training.reduce_mean,
                                 continuous=config.training.continuous,
                                 likelihood_weighting=config.training.likelihood_weighting,
                                 precision=precision)
    return state, step_fn


def _max_relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def bench_forward(name: str, size: int, args, original: Original | None, matmul: float) -> list:
    """Rows of the forward table for one model and size."""
    models = {label: our_network(name, size, fmt)[0] for label, fmt, _ in args.variants}
    weights = copy.deepcopy(models["fp32 contiguous"].state_dict())
    for model in models.values():
        model.load_state_dict(weights)
    config = our_network(name, size, "contiguous")[1]
    x = torch.rand(args.batch, config.data.num_channels, size, size,
                   generator=torch.Generator().manual_seed(1))
    labels = conditioning(config, args.batch)
    calls = {}
    for label, _, precision in args.variants:
        fn = mutils.get_model_fn(models[label], train=False)

        def call(fn=fn, precision=precision):
            with mutils.network_options(precision=precision):
                return fn(x, labels)

        calls[label] = call
    if original is not None:
        original_model, _ = original.network(name, size, weights)
        calls[ORIGINAL] = lambda: original_model(x, labels)
    reference_name = ORIGINAL if original is not None else "fp32 contiguous"
    with torch.no_grad():
        flops = count_flops(calls["fp32 contiguous"])
        outputs, notes = first_calls(calls, args.cap, keep=(reference_name, "fp32 contiguous"))
        diffs = {label: _max_relative(outputs[label], outputs[reference_name])
                 for label in calls}
        times = time_interleaved(calls, args.repeats, args.warmup)
    for note in notes:
        print(f"<!-- {name} {size} px: {note} -->", flush=True)
    rows = []
    for label in calls:
        wall = statistics.median(times[label]["wall"])
        cpu = statistics.median(times[label]["cpu"])
        rate = flops / wall / 1e9
        rows.append((name, size, label, wall, cpu, _ratios(times, label, original is not None),
                     rate, 100 * rate / matmul, diffs[label]))
    return rows


def auto_choices(name: str, sizes: list[int], batch: int, precisions: list[str]) -> list[str]:
    """What `model.memory_format` "auto" picks on this machine (`measure_memory_format` at
    `batch`), per size and precision, with the two medians."""
    lines = []
    for size in sizes:
        model, config = our_network(name, size, "contiguous")
        for precision in precisions:
            chosen, medians = mutils.measure_memory_format(
                model, size, config.data.num_channels, precision, batch=batch)
            lines.append(f"- {name} {size} px {precision}: "
                         f"{'channels-last' if chosen is torch.channels_last else 'contiguous'} "
                         f"(contiguous {medians['contiguous']:.3f} s, channels-last "
                         f"{medians['channels_last']:.3f} s)")
    return lines


def bench_train(name: str, size: int, args, original: Original | None) -> list:
    """Rows of the training-step table for one model at `size`."""
    model, config = our_network(name, size, "contiguous")
    weights = copy.deepcopy(model.state_dict())
    del model
    batch = torch.rand(args.train_batch, config.data.num_channels, size, size,
                       generator=torch.Generator().manual_seed(2))
    steps = {}
    for label, fmt, precision in args.variants:
        state, step_fn = our_train_step(name, size, fmt, precision, weights)
        steps[label] = (lambda state=state, step_fn=step_fn: step_fn(state, batch))
    if original is not None:
        state, step_fn = original.train_step(name, size, weights)
        steps[ORIGINAL] = lambda: step_fn(state, batch)
    # The first step of each is its warm-up; a variant over the cap stops there.
    _, notes = first_calls(steps, args.cap, keep=(ORIGINAL, "fp32 contiguous"))
    for note in notes:
        print(f"<!-- training step {name} {size} px: {note} -->", flush=True)
    times = time_interleaved(steps, args.train_repeats, warmup=0)
    return [(name, size, label, statistics.median(times[label]["wall"]),
             statistics.median(times[label]["cpu"]), _ratios(times, label, original is not None))
            for label in steps]


def auto_precision_line() -> str:
    """What precision "auto" can pick on this CPU, and why."""
    native = sorted(mutils.native_precisions("cpu") - {"fp32"})
    capability = torch.backends.cpu.get_cpu_capability()
    if not native:
        return (f"fp32 without measuring (this CPU, {capability}, computes no reduced precision "
                "natively).")
    return (f"measured per network between fp32 and {', '.join(native)} (native on this "
            f"{capability} CPU); a reduced precision is chosen when at least "
            f"{1 / mutils.REDUCED_PRECISION_MARGIN:.2f}x faster.")


def _load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=None,
                        help="Folder of a checkout of the original score-SDE code to time in the "
                             "same run (yang-song/score_sde_pytorch or subspace-diffusion).")
    parser.add_argument("--models", nargs="+", default=["ncsnpp"], choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 16, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--train_size", type=int, default=32)
    parser.add_argument("--train_repeats", type=int, default=5)
    parser.add_argument("--no_train", action="store_true", help="Skip the training step.")
    parser.add_argument("--force", action="store_true",
                        help="Also time reduced precisions this CPU only emulates.")
    parser.add_argument("--cap", type=float, default=30.0,
                        help="Drop a variant whose first call takes longer (seconds).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    original = Original(args.original) if args.original else None
    args.variants, skipped = runnable_variants(args.force)

    print(f"# Network speed ({mutils.machine_kind()}, torch "
          f"{torch.__version__}, {args.threads} threads)\n")
    print(f"Load average (1/5/15 min) at start: {_load()}. Batch {args.batch}; median of "
          f"{args.repeats} interleaved repeats after {args.warmup} warm-up calls.")
    if original is not None:
        print(f"Original code: {original.path} (its pure-PyTorch CPU path for `op/`).")
    for note in skipped:
        print(note)
    print(f"`sampling.precision` auto on this machine: {auto_precision_line()}")
    matmul_before = matmul_gflops()
    print(f"float32 2048x2048 matrix product: {matmul_before:.1f} GFLOP/s.\n", flush=True)
    print("| model | px | variant | wall (s) | CPU (s) | speed-up vs original, wall / CPU "
          "| GFLOP/s | % of matmul | max rel. diff vs "
          + ("original fp32 |" if original else "fp32 contiguous |"))
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for size in args.sizes:
            for row in bench_forward(name, size, args, original, matmul_before):
                name_, px, label, wall, cpu, ratios, rate, share, diff = row
                print(f"| {name_} | {px} | {label} | {wall:.3f} | {cpu:.3f} | {ratios} | "
                      f"{rate:.1f} | {share:.0f} % | {diff:.1e} |", flush=True)
    print(f"\n`model.memory_format` auto on this machine (batch {args.batch}, interleaved, "
          "median of 3):\n")
    precisions = sorted({precision for _, _, precision in args.variants}, reverse=True)
    for name in args.models:
        print("\n".join(auto_choices(name, args.sizes, args.batch, precisions)), flush=True)
    if not args.no_train:
        print(f"\nTraining step (loss, backward, Adam, EMA), batch {args.train_batch}, "
              f"{args.train_size}x{args.train_size}, median of {args.train_repeats} interleaved "
              "repeats:\n")
        print("| model | px | variant | wall (s) | CPU (s) | speed-up vs original, wall / CPU |")
        print("|---|---|---|---|---|---|")
        for name in args.models:
            for row in bench_train(name, args.train_size, args, original):
                name_, px, label, wall, cpu, ratios = row
                print(f"| {name_} | {px} | {label} | {wall:.3f} | {cpu:.3f} | {ratios} |",
                      flush=True)
    print(f"\nfloat32 2048x2048 matrix product after: {matmul_gflops():.1f} GFLOP/s; load "
          f"average at end: {_load()}.")


if __name__ == "__main__":
    main()
