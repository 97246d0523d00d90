"""Denoising error of a score network split into frequency bands, per time (`analysis.bands`).

A score network trained by denoising score matching predicts the noise z of
x_t = alpha(t) x' + sigma(t) z (x' the scaled data); its residual is r = sigma(t) s(x_t, t) + z.
The nested downsampling subspaces split the image space into orthogonal bands: with P_k the
projector onto block means of 2^k x 2^k blocks (P_0 = I), band j is (P_{j-1} - P_j) for
j = 1..L and the last band is P_L, the per-channel image mean ("DC"). For each time and band
this module reports the mean squared residual per coordinate,

    E ||(P_{j-1} - P_j) r||^2 / n_j,

which is 1 for a network that predicts nothing and, for any network, at least the error of the
best predictor of that band's noise. As a yardstick for the DC band it also reports the error of
the best predictor under a Gaussian model of the data's channel means alone (mean mu and 3x3
covariance Sigma of the DC coordinates): with C = alpha^2 Sigma + sigma^2 I the posterior error
covariance of z_DC is I - sigma^2 C^{-1}, so the error per coordinate is
tr(I - sigma^2 C^{-1}) / channels. A network whose DC error lies far above this yardstick has
not learned the images' global colour at that time. The DC gain G = d z_hat_DC / d x_DC of
the network (finite differences) is compared with the Gaussian predictor's gain
sigma C^{-1}: it must grow from about 0 at low noise (x_t's colour is the data's) to 1/sigma at
t = 1 (x_t's colour is the noise's), so a gain that does not change with t cannot be right.

Command line (a trained model on its own data, any image size):
    python -m analysis.bands --config C --checkpoint ckpt.pth [--config.data.image_size 16]
        [--times 0.05,0.2,0.5,0.8,0.95,1] [--num_images 256] [--out bands.json]
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

import sde_lib
import subspace_lib

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_TIMES = (0.05, 0.2, 0.5, 0.8, 0.95, 1.0)


def band_names(size: int) -> list[str]:
    """Names of the bands of a size x size image, finest first: '32-16', ..., '2-1', 'DC'."""
    levels = subspace_lib.num_halvings(size, 1)
    return [f"{size >> (j - 1)}-{size >> j}" for j in range(1, levels + 1)] + ["DC"]


def band_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """The orthogonal band components of `x` [B, C, S, S] (S a power of two), finest first;
    they sum to `x`. The last one is the per-channel spatial mean (P_L x)."""
    size = x.shape[-1]
    if x.shape[-2] != size or size < 2 or size & (size - 1):
        raise ValueError(f"Images must be square with a power-of-two side; got "
                         f"{tuple(x.shape[-2:])}.")
    levels = subspace_lib.num_halvings(size, 1)
    projections = [x] + [subspace_lib.project(x, k) for k in range(1, levels + 1)]
    return [projections[j - 1] - projections[j] for j in range(1, levels + 1)] \
        + [projections[levels]]


def band_dims(size: int, channels: int) -> list[int]:
    """Number of coordinates of each band (finest first, DC last)."""
    levels = subspace_lib.num_halvings(size, 1)
    pixels = [size * size >> (2 * j) for j in range(levels + 1)]
    return [channels * (pixels[j - 1] - pixels[j]) for j in range(1, levels + 1)] + [channels]


def dc_coordinates(images: torch.Tensor) -> torch.Tensor:
    """Orthonormal DC coordinates [B, C] of images [B, C, S, S]: the channel means times S."""
    size = images.shape[-1]
    return subspace_lib.downsample(images.to(torch.float64),
                                   subspace_lib.num_halvings(size, 1)).flatten(1)


def gaussian_dc_error(dc: torch.Tensor, sde: sde_lib.SDE, t: float) -> float:
    """Error per coordinate of the best predictor of z_DC from x_t's DC coordinates when the
    data's DC coordinates `dc` [N, C] (already scaled) are modelled as a Gaussian:
    tr(I - sigma^2 (alpha^2 Sigma + sigma^2 I)^{-1}) / C = tr(I - sigma G) / C with G the
    Gaussian DC gain (`gaussian_dc_gain`)."""
    sigma = float(sde.sigma(torch.tensor(float(t), dtype=torch.float64)))
    gain = gaussian_dc_gain(dc, sde, t)
    channels = gain.shape[0]
    return float(torch.trace(torch.eye(channels, dtype=torch.float64) - sigma * gain)) / channels


def dc_gain(score_fn: ScoreFn, sde: sde_lib.SDE, x_t: torch.Tensor, t: float,
            delta: float = 0.05) -> torch.Tensor:
    """The network's gain on the DC band at time t: G[i, j] = d z_hat_DC,i / d x_DC,j with
    z_hat = -sigma(t) s(x_t, t) its noise prediction, by central differences of size `delta`
    (orthonormal DC coordinates) around the states `x_t` [B, C, S, S], averaged over the batch."""
    size, channels = x_t.shape[-1], x_t.shape[1]
    t_vec = torch.full((x_t.shape[0],), float(t), device=x_t.device)
    sigma = float(sde.sigma(torch.tensor(float(t), dtype=torch.float64)))
    gain = torch.zeros(channels, channels, dtype=torch.float64)
    with torch.no_grad():
        for j in range(channels):
            shift = torch.zeros(1, channels, 1, 1, device=x_t.device, dtype=x_t.dtype)
            shift[0, j] = delta / size
            up = dc_coordinates(-sigma * score_fn(x_t + shift, t_vec))
            down = dc_coordinates(-sigma * score_fn(x_t - shift, t_vec))
            gain[:, j] = ((up - down).mean(0) / (2 * delta)).cpu()
    return gain


def gaussian_dc_gain(dc: torch.Tensor, sde: sde_lib.SDE, t: float) -> torch.Tensor:
    """The DC gain of the best predictor under the Gaussian model of the data's DC coordinates
    `dc` [N, C] (`sde_lib.gaussian_noise_gain` with their covariance): about 0 where the data's
    colour dominates x_t, 1/sigma at t = 1."""
    dc = dc.to(torch.float64)
    channels = dc.shape[1]
    cov = torch.cov(dc.T).reshape(channels, channels) if dc.shape[0] > 1 \
        else torch.zeros(channels, channels, dtype=torch.float64)
    return sde_lib.gaussian_noise_gain(sde, torch.tensor([float(t)]), cov)[0]


def band_errors(score_fn: ScoreFn, sde: sde_lib.SDE, batches: Iterable[torch.Tensor],
                times: Sequence[float], scaler: Callable[[torch.Tensor], torch.Tensor],
                num_images: int | None = None, seed: int = 0,
                device: torch.device | str | None = None,
                progress: bool = False) -> dict:
    """Per time, the mean squared denoising residual per coordinate of each band, and the
    Gaussian DC yardstick (module docstring).

    `batches` yields image batches [B, C, S, S] as the model's data pipeline gives them (before
    the scaler; subspace coordinates for a subspace model); `scaler` maps them to x'. Returns
    {"bands": names, "dims": ..., "times": [...], "error": {band: [per time]},
    "gaussian_dc": [per time], "dc_gain": [C x C per time, on the first batch],
    "gaussian_dc_gain": [C x C per time], "images": n}.
    """
    times = [float(t) for t in times]
    if not times or any(not 0.0 < t <= 1.0 for t in times):
        raise ValueError(f"Times must lie in (0, 1]; got {times}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    sums: list[np.ndarray] | None = None
    gains: list[torch.Tensor] = []
    dcs = []
    seen = 0
    names: list[str] = []
    dims: list[int] = []

    from tqdm import tqdm

    total = None if num_images is None else num_images * len(times)
    with tqdm(total=total, desc="band errors", unit="img", disable=not progress,
              leave=False) as bar:
        for images in batches:
            if num_images is not None:
                images = images[: num_images - seen]
            if images.shape[0] == 0:
                break
            x0 = scaler(images.to(device=device, dtype=torch.float32))
            if sums is None:
                names = band_names(x0.shape[-1])
                dims = band_dims(x0.shape[-1], x0.shape[1])
                sums = [np.zeros(len(names)) for _ in times]
            dcs.append(dc_coordinates(x0).cpu())
            for i, t in enumerate(times):
                t_vec = torch.full((x0.shape[0],), t, device=device)
                mean, std = sde.marginal_prob(x0, t_vec)
                z = torch.randn(x0.shape, generator=generator, device=device)
                x_t = mean + std.reshape(-1, 1, 1, 1) * z
                with torch.no_grad():
                    residual = std.reshape(-1, 1, 1, 1) * score_fn(x_t, t_vec) + z
                parts = band_parts(residual.to(torch.float64))
                sums[i] += np.array([float(p.pow(2).sum()) for p in parts])
                if len(gains) < len(times):
                    gains.append(dc_gain(score_fn, sde, x_t, t))
                bar.update(x0.shape[0])
            seen += x0.shape[0]
            if num_images is not None and seen >= num_images:
                break
    if sums is None:
        raise ValueError("The dataset yielded no images: check the dataset and num_images.")
    dc = torch.cat(dcs)
    error = {name: [float(sums[i][j]) / (seen * dims[j]) for i in range(len(times))]
             for j, name in enumerate(names)}
    return {"bands": names, "dims": dims, "times": times, "error": error,
            "gaussian_dc": [gaussian_dc_error(dc, sde, t) for t in times],
            "dc_gain": [g.tolist() for g in gains],
            "gaussian_dc_gain": [gaussian_dc_gain(dc, sde, t).tolist() for t in times],
            "images": seen}


def format_band_table(result: dict, title: str = "") -> str:
    """Markdown table: one row per time, one column per band, then the Gaussian DC yardstick."""
    names = result["bands"]
    head = ["t"] + [f"{n} ({d})" for n, d in zip(names, result["dims"])] \
        + ["DC, Gaussian", "DC gain", "DC gain, Gaussian"]
    lines = ([f"{title} ({result['images']} images; mean squared residual per coordinate)"]
             if title else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(result["times"]):
        row = [f"{t:g}"] + [_fmt(result["error"][n][i]) for n in names] \
            + [_fmt(result["gaussian_dc"][i]), _gain(result["dc_gain"][i]),
               _gain(result["gaussian_dc_gain"][i])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _gain(matrix: list[list[float]]) -> str:
    """A gain matrix as its diagonal, e.g. '0.11/0.37/0.22'."""
    return "/".join(f"{matrix[i][i]:.2f}" for i in range(len(matrix)))


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if value >= 0.01 else f"{value:.1e}"


# --------------------------------------------------------------------------------------------
# Command line.

def _define_flags() -> None:
    from absl import flags
    from ml_collections.config_flags import config_flags

    config_flags.DEFINE_config_file("config", None, "Config of the model (its image size).",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Checkpoint of the model (EMA weights are used).")
    flags.DEFINE_string("times", ",".join(f"{t:g}" for t in DEFAULT_TIMES),
                        "Times in (0, 1], e.g. 0.5,0.8,1.")
    flags.DEFINE_integer("num_images", 256, "Number of held-out images.")
    flags.DEFINE_enum("split", "eval", ["train", "eval"], "Dataset split the images come from.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights of the checkpoint.")
    flags.DEFINE_integer("seed", 0, "Noise seed.")
    flags.DEFINE_string("out", None, "Also write the result as JSON to this file.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["config", "checkpoint"])


def _cli() -> None:
    import json

    from absl import flags

    import cli
    import datasets
    from analysis.batches import as_image_batch
    from analysis.cli import UsageError
    from cli import parse_float_list
    from files import atomic_write_text
    from models import utils as mutils
    from models.checkpoints import load_model_weights

    FLAGS = flags.FLAGS
    config = FLAGS.config
    times = parse_float_list(FLAGS.times, "--times")
    if any(not 0.0 < t <= 1.0 for t in times):
        raise UsageError(f"--times must lie in (0, 1]; got {FLAGS.times}.")
    if FLAGS.num_images <= 0:
        raise UsageError(f"--num_images must be positive; got {FLAGS.num_images}.")
    cli.check_checkpoint_files([FLAGS.checkpoint], "--checkpoint")
    if FLAGS.out:
        cli.check_writable(FLAGS.out, "--out", is_dir=False)
    sde, _ = sde_lib.get_sde(config)
    model = load_model_weights(mutils.create_model(config), FLAGS.checkpoint,
                               use_ema=FLAGS.use_ema)
    score_fn = mutils.get_score_fn(sde, model, train=False,
                                   continuous=config.training.continuous)
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    dataset = train_ds if FLAGS.split == "train" else eval_ds
    result = band_errors(score_fn, sde, (as_image_batch(b) for b in dataset), times,
                         datasets.get_data_scaler(config), num_images=FLAGS.num_images,
                         seed=FLAGS.seed, device=mutils.config_device(config),
                         progress=FLAGS.progress)
    size = int(config.data.image_size)
    print(format_band_table(result, f"{size}x{size} model, {FLAGS.split} split"))
    if FLAGS.out:
        atomic_write_text(FLAGS.out, json.dumps(result, indent=1))
        print(f"saved {FLAGS.out}")


if __name__ == "__main__":
    import cli
    from analysis.cli import run

    _define_flags()
    cli.start(lambda argv: run(_cli))
