"""Throughput of the torch Inception network (`evaluation.torch_inception_features`), and how far
its features move under the input pipelines it could have followed.

Throughput: built-in data images (32x32, resized to 299 inside) in batches of `--batch` on the
CPU with `--threads` intra-op threads; the first batch is a warm-up, the rest is timed. Printed:
images per second (wall clock), CPU seconds per image of this process (less sensitive to other
processes on a shared machine), the load average before and after, the CPU model and the thread
count.

`--compare` also runs the same images through two other pipelines and reports, per pipeline, the
mean relative change of the 2048 `pool_3` features against this project's pipeline and the FID
between the two feature sets of the same images (only the pipeline differs):
- `range-127.5`: (x - 127.5) / 127.5 instead of (x - 128) / 128, the input range the score-SDE
  code feeds to TF-Hub's module;
- `tf1-resize`: TF1's `tf.image.resize_bilinear(align_corners=False)` (no half-pixel centres:
  output pixel i samples input coordinate i * in / out) instead of TF2's half-pixel resize, i.e.
  `config.eval.inception_resize` "tf1".
For scale, the mean relative distance between the features of different images is printed too.

    python bench/bench_inception.py [--images 32] [--batch 16] [--threads 2] [--compare]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import evaluation  # noqa: E402
from models import utils as mutils  # noqa: E402


def resize_matrix(n_in: int, n_out: int, half_pixel: bool) -> np.ndarray:
    """[n_out, n_in] bilinear interpolation weights: output i samples input coordinate
    (i + 0.5) n_in / n_out - 0.5 (half-pixel centres, TF2) or i n_in / n_out (TF1's
    resize_bilinear without align_corners), clamped to [0, n_in - 1]."""
    i = np.arange(n_out)
    source = (i + 0.5) * n_in / n_out - 0.5 if half_pixel else i * n_in / n_out
    source = np.clip(source, 0, n_in - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    w = np.zeros((n_out, n_in))
    w[i, low] += 1 - (source - low)
    w[i, high] += source - low
    return w


def separable_input(images: np.ndarray) -> torch.Tensor:
    """Network input of uint8 NHWC images through this file's own half-pixel weights
    (`resize_matrix`): a check of `evaluation.torch_inception_input`'s `F.interpolate`."""
    size = evaluation.INCEPTION_DEFAULT_IMAGE_SIZE
    wy = torch.from_numpy(resize_matrix(images.shape[1], size, True)).float()
    wx = torch.from_numpy(resize_matrix(images.shape[2], size, True)).float()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return (wy @ x @ wx.T - 128.0) / 128.0


def variant_input(images: np.ndarray, name: str) -> torch.Tensor:
    """Network input under a pipeline variant: "range-127.5" is this project's resize with
    (x - 127.5) / 127.5, i.e. its input times 128 / 127.5 plus 0.5 / 127.5; "tf1-resize" is
    `torch_inception_input(resize="tf1")`."""
    if name == "range-127.5":
        return evaluation.torch_inception_input(images) * (128 / 127.5) + 0.5 / 127.5
    return evaluation.torch_inception_input(images, resize="tf1")


def features_of(model, inputs: torch.Tensor, batch: int) -> np.ndarray:
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        return torch.cat([model(inputs[i:i + batch]) for i in range(0, len(inputs), batch)]
                         ).numpy().astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="Images to time (after warm-up).")
    parser.add_argument("--batch", type=int, default=16, help="Images per network batch.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument("--compare", action="store_true",
                        help="Also measure the feature change under other input pipelines.")
    args = parser.parse_args()
    if min(args.images, args.batch, args.threads) < 1:
        parser.error("--images, --batch and --threads must be at least 1.")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"CPU {mutils.machine_kind()} ({os.cpu_count()} logical), torch {torch.__version__}, "
          f"{args.threads} threads; load average before {load_before[0]:.2f}")

    start = time.perf_counter()
    evaluation.torch_inception_path()
    checked = time.perf_counter()
    model = evaluation.load_torch_inception("cpu")
    loaded = time.perf_counter()
    print(f"weights: size and SHA-1 checked in {checked - start:.2f} s, loaded in "
          f"{loaded - checked:.2f} s")

    pool = datasets.builtin_arrays()["train_images"]
    rng = np.random.default_rng(0)
    images = pool[rng.choice(len(pool), args.images + args.batch, replace=False)]
    evaluation.torch_inception_features(images[:args.batch], model, args.batch)  # warm-up
    timed = images[args.batch:]
    wall, cpu = time.perf_counter(), time.process_time()
    features = evaluation.torch_inception_features(timed, model, args.batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    print(f"{len(timed)} images in batches of {args.batch}: {len(timed) / wall:.2f} images/s "
          f"({wall / len(timed):.3f} s wall and {cpu / len(timed):.3f} s CPU of this process "
          f"per image); load average after {load_after[0]:.2f}")

    if not args.compare:
        return
    ours = features.astype(np.float64)
    check = features_of(model, separable_input(timed), args.batch)
    print(f"separable half-pixel resize vs F.interpolate: max feature difference "
          f"{np.abs(check - ours).max():.2e}")
    tf1 = evaluation.tf1_resize_weights(32, 299).double().numpy()
    print(f"evaluation.tf1_resize_weights vs this file's TF1 weights: max difference "
          f"{np.abs(tf1 - resize_matrix(32, 299, False)).max():.1e}")
    norms = np.linalg.norm(ours, axis=1)
    pairs = [np.linalg.norm(ours[i] - ours[j]) / norms[i]
             for i in range(len(ours)) for j in range(len(ours)) if i != j]
    print(f"scale: mean relative feature distance between different images {np.mean(pairs):.3f}")
    for name in ("range-127.5", "tf1-resize"):
        other = features_of(model, variant_input(timed, name), args.batch)
        change = np.linalg.norm(other - ours, axis=1) / norms
        fid = evaluation.frechet_distance_from_activations(ours, other)
        print(f"{name}: mean relative feature change {change.mean():.4f} (max "
              f"{change.max():.4f}); FID between the two pipelines' features of the same "
              f"{len(ours)} images {fid:.3f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
