"""Speed of one network evaluation for the CIFAR-10 NCSN++ and DDPM++ score models.

For each model and image size: the median wall-clock time of a forward pass (after warm-up,
`torch.no_grad()`, eval mode), its CPU time, the FLOP count of one evaluation (counted with
`torch.utils.flop_counter.FlopCounterMode`), the achieved GFLOP/s, and, as a yardstick taken in
the same run, the GFLOP/s of a float32 matrix product.

    python bench/bench_networks.py [--batch 8] [--sizes 32 16 8] [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.utils import get_model  # noqa: E402

MODELS = {
    "ncsnpp": "ve/cifar10_ncsnpp_continuous",
    "ddpmpp": "subvp/cifar10_ddpmpp_continuous",
}


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


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (a multiply-add counts as 2)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_gflops(n: int = 1024, repeats: int = 9) -> float:
    """Achieved GFLOP/s of an n x n float32 matrix product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    wall, _ = time_calls(lambda: a @ b, repeats, warmup=2)
    return 2 * n ** 3 / wall / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 16, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}")
    print(f"float32 matmul (1024^3): {matmul_gflops():.1f} GFLOP/s")
    print(f"{'model':8s} {'size':>4s} {'wall s':>8s} {'cpu s':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
    for name in args.models:
        for size in args.sizes:
            model, config = build(MODELS[name], size)
            x = torch.rand(args.batch, config.data.num_channels, size, size)
            t = conditioning(config, args.batch)
            call = functools.partial(model, x, t)
            with torch.no_grad():
                flops = count_flops(call)
                wall, cpu = time_calls(call, args.repeats, args.warmup)
            print(f"{name:8s} {size:4d} {wall:8.3f} {cpu:8.3f} {flops / 1e9:8.1f} "
                  f"{flops / wall / 1e9:8.1f}", flush=True)
            del model, call
    print(f"float32 matmul (1024^3): {matmul_gflops():.1f} GFLOP/s (after)")


if __name__ == "__main__":
    main()
