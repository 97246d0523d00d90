"""Orthogonal Fisher divergence of a full score model for each subspace (docs/maths.md section 6).

For data x_0 in [0,1]^d with scaler x' = a x_0 + b, the perturbed state is
x_t = alpha(t) x' + sigma(t) eps. If the component of the data orthogonal to the k-halvings
subspace were isotropic Gaussian with per-dimension RMSD r_k, the orthogonal part of the score
would be g = -(x_t - P_k x_t) / v with v = alpha^2 (a r_k)^2 + sigma^2. Per sample we record

    err_norm   = ||(I - P_k) s(x_t, t) - g||^2 / ((d - n_k) / v)   (the divergence D_F)
    gauss_norm = ||g||^2 / ((d - n_k) / v)                         (about 1 for Gaussian data)
    score_norm = ||(I - P_k) s(x_t, t)||^2 / ((d - n_k) / v)

in the layout of the reference notebooks: {"16": {"t": [...], "err_norm": [...], "gauss_norm":
[...], "score_norm": [...]}}, one row per (time, image), times outermost. At a given time the
same x_t and network evaluation serve every subspace size.

Command line (needs datasets.py, a config and a checkpoint):
    python -m analysis.divergence --config C --checkpoint ckpt.pth --subspace 16,8
        --num_times 21 --num_images 1000 --out divergence.json
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

import sde_lib
import subspace_lib
from analysis.batches import image_batches

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
COLUMNS = ("t", "err_norm", "gauss_norm", "score_norm")


def default_times(num_times: int = 21, t_min: float = 0.0, t_max: float = 1.0) -> list[float]:
    """`num_times` equally spaced times (numpy linspace, as the reference notebooks)."""
    if num_times < 1:
        raise ValueError(f"The number of times must be at least 1; got {num_times}.")
    if not 0.0 <= t_min <= t_max <= 1.0:
        raise ValueError(f"Times must satisfy 0 <= t_min <= t_max <= 1; got {t_min}, {t_max}.")
    return [float(t) for t in np.linspace(t_min, t_max, num_times)]


def orthogonal_variance(sde: sde_lib.SDE, t: float, rmsd: float, centered: bool) -> float:
    """Per-dimension variance v = alpha(t)^2 (a r)^2 + sigma(t)^2 of the orthogonal part of x_t."""
    a, _ = subspace_lib.scaler_coefficients(centered)
    time = torch.tensor(float(t), dtype=torch.float64)
    alpha = float(sde.alpha(time))
    sigma = float(sde.sigma(time))
    return alpha**2 * (a * rmsd) ** 2 + sigma**2


def perturb(sde: sde_lib.SDE, images: torch.Tensor, t: float, centered: bool,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t = alpha(t) (a x_0 + b) + sigma(t) eps for images x_0 in [0,1]."""
    a, b = subspace_lib.scaler_coefficients(centered)
    scaled = a * images + b
    t_vec = torch.full((images.shape[0],), float(t), dtype=images.dtype, device=images.device)
    mean, std = sde.marginal_prob(scaled, t_vec)
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype,
                        device=images.device)
    return mean + std.reshape(-1, 1, 1, 1) * noise


def divergence_terms(score: torch.Tensor, x_t: torch.Tensor, k: int,
                     variance: float) -> dict[str, torch.Tensor]:
    """Per-sample err_norm (D_F), gauss_norm and score_norm for the k-halvings subspace."""
    score = score.to(torch.float64)
    x_t = x_t.to(torch.float64)
    d = x_t[0].numel()
    n = d * subspace_lib.subspace_dim_fraction(k)
    expected_gauss_norm = (d - n) / variance
    score_perp = subspace_lib.orthogonal_part(score, k)
    gauss = -subspace_lib.orthogonal_part(x_t, k) / variance

    def norm(v: torch.Tensor) -> torch.Tensor:
        return v.pow(2).flatten(1).sum(1) / expected_gauss_norm

    return {"err_norm": norm(score_perp - gauss), "gauss_norm": norm(gauss),
            "score_norm": norm(score_perp)}


def fisher_divergence(score_fn: ScoreFn, sde: sde_lib.SDE, dataset: Iterable,
                      rmsd: Mapping[int, float], times: Sequence[float], centered: bool,
                      num_images: int | None = None, seed: int = 0,
                      device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float32,
                      progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """Orthogonal Fisher divergence of `score_fn` for each subspace size in `rmsd`.

    `rmsd` maps a subspace size to the dataset's per-dimension RMSD r_k (pixels in [0,1]);
    `dataset` yields image batches in [0,1] ([B, C, S, S] or {"image": ...}); the first
    `num_images` images are used at every time in `times`. Returns the notebook JSON layout.
    """
    if not rmsd:
        raise ValueError("No subspace sizes were given: pass at least one {size: rmsd}.")
    bad = {s: r for s, r in rmsd.items() if not r > 0}
    if bad:
        raise ValueError(f"RMSD values must be positive; got {bad}.")
    times = [float(t) for t in times]
    if not times:
        raise ValueError("No times were given: pass at least one time in [0, 1].")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    sizes = sorted(rmsd, reverse=True)
    variances = {s: [orthogonal_variance(sde, t, rmsd[s], centered) for t in times]
                 for s in sizes}
    rows = {s: {c: [[] for _ in times] for c in COLUMNS[1:]} for s in sizes}
    halvings: dict[int, int] = {}

    from tqdm import tqdm

    total = None if num_images is None else num_images * len(times)
    with tqdm(total=total, desc="Fisher divergence", unit="img", disable=not progress,
              leave=False) as bar:
        for images in image_batches(dataset, num_images):
            images = images.to(device=device, dtype=dtype)
            if not halvings:
                if images.shape[-1] != images.shape[-2]:
                    raise ValueError(f"Images must be square; got {tuple(images.shape[-2:])}.")
                halvings = {s: subspace_lib.num_halvings(images.shape[-1], s) for s in sizes}
                if any(k == 0 for k in halvings.values()):
                    raise ValueError(f"Subspace sizes must be smaller than the image size "
                                     f"{images.shape[-1]}; got {sizes}.")
            for i, t in enumerate(times):
                x_t = perturb(sde, images, t, centered, generator)
                t_vec = torch.full((images.shape[0],), t, dtype=dtype, device=device)
                with torch.no_grad():
                    score = score_fn(x_t, t_vec)
                for s in sizes:
                    terms = divergence_terms(score, x_t, halvings[s], variances[s][i])
                    for column, values in terms.items():
                        rows[s][column][i].append(values.cpu())
                bar.update(images.shape[0])
    if not halvings:
        raise ValueError("The dataset yielded no images: check the dataset and num_images.")

    result = {}
    for s in sizes:
        entry = {"t": []}
        for column in COLUMNS[1:]:
            entry[column] = []
        for i, t in enumerate(times):
            per_time = {c: torch.cat(rows[s][c][i]).tolist() for c in COLUMNS[1:]}
            entry["t"].extend([t] * len(per_time["err_norm"]))
            for column in COLUMNS[1:]:
                entry[column].extend(per_time[column])
        result[str(s)] = entry
    return result


# --------------------------------------------------------------------------------------------
# Command line.

def parse_rmsd_overrides(text: str) -> dict[int, float]:
    """'16=0.075,8=0.11' -> {16: 0.075, 8: 0.11}."""
    values = {}
    for item in (v.strip() for v in text.split(",") if v.strip()):
        size, sep, value = item.partition("=")
        try:
            values[int(size)] = float(value)
        except ValueError:
            raise ValueError(
                f"--rmsd entry '{item}' is not of the form size=value, e.g. 16=0.075.") from None
        if not sep:
            raise ValueError(f"--rmsd entry '{item}' is not of the form size=value, e.g. 16=0.075.")
    return values


def _define_flags() -> None:
    from absl import flags
    from ml_collections.config_flags import config_flags

    config_flags.DEFINE_config_file("config", None, "Config of the full model.", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "Checkpoint of the full model (EMA weights are used).")
    flags.DEFINE_string("subspace", None, "Subspace sizes, e.g. 16,8.")
    flags.DEFINE_integer("num_times", 21, "Number of equally spaced times in [t_min, 1].")
    flags.DEFINE_float("t_min", 0.0, "Smallest time of the grid.")
    flags.DEFINE_integer("num_images", 1000, "Number of data images (the same at every time).")
    flags.DEFINE_enum("split", "train", ["train", "eval"], "Dataset split the images come from.")
    flags.DEFINE_string("stats_file", str(subspace_lib.DEFAULT_RMSD_PATH),
                        "Statistics file with the dataset's RMSD per subspace size.")
    flags.DEFINE_string("dataset", None, "Statistics key: cifar, celeba (CelebA-HQ-256), church, "
                        "or any statistics name (default: from the config).")
    flags.DEFINE_string("rmsd", None, "RMSD per size overriding the statistics file, e.g. "
                        "16=0.075,8=0.11.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights of the checkpoint.")
    flags.DEFINE_integer("seed", None, "Noise seed (default: config.seed).")
    flags.DEFINE_string("out", "divergence.json", "JSON file to write.")
    flags.DEFINE_string("thresholds", None, "Also print and save cutoff times for these D_F "
                        "thresholds, e.g. 1e-3,3e-3 (saved beside --out as *_cutoffs.json).")
    flags.DEFINE_string("plot", None, "Also save the D_F plot to this .png/.pdf file.")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.mark_flags_as_required(["config", "checkpoint", "subspace"])


def _cli() -> None:
    import json
    from pathlib import Path

    from absl import flags

    import cli
    import datasets
    from analysis import cutoffs
    from analysis.cli import UsageError, check_full_size
    from files import atomic_write_text
    from models import utils as mutils
    from models.checkpoints import load_model_weights

    FLAGS = flags.FLAGS
    config = FLAGS.config
    check_full_size(config)
    if not FLAGS.checkpoint or not FLAGS.subspace:
        raise UsageError("Give --checkpoint (the full model) and --subspace (e.g. 16,8).")
    sizes = list(cli.parse_sizes(FLAGS.subspace, "--subspace", int(config.data.image_size)))
    cli.check_range(FLAGS.num_images, "--num_images", low=1)
    cli.check_range(FLAGS.num_times, "--num_times", low=1)
    cli.check_range(FLAGS.t_min, "--t_min", low=0, high=1, high_open=True)
    cli.check_range(FLAGS.seed, "--seed", low=0)
    cli.check_writable(FLAGS.out, "--out", is_dir=False)
    if FLAGS.plot:
        cli.check_writable(FLAGS.plot, "--plot", is_dir=False)
    thresholds = cutoffs.parse_thresholds(FLAGS.thresholds) if FLAGS.thresholds else None
    times = default_times(FLAGS.num_times, FLAGS.t_min, 1.0)
    overrides = parse_rmsd_overrides(FLAGS.rmsd) if FLAGS.rmsd else {}
    name = subspace_lib.stats_name_from_flag(FLAGS.dataset, config)
    full_size = int(config.data.image_size)
    rmsd = {s: overrides[s] if s in overrides else
            subspace_lib.dataset_rmsd(name, full_size, s, FLAGS.stats_file) for s in sizes}
    cli.check_checkpoint_files([FLAGS.checkpoint], "--checkpoint")

    sde, _ = sde_lib.get_sde(config)
    model = mutils.create_model(config)
    load_model_weights(model, FLAGS.checkpoint, use_ema=FLAGS.use_ema)
    score_fn = mutils.get_score_fn(sde, model, train=False,
                                   continuous=config.training.continuous)
    train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=False,
                                                evaluation=True)
    result = fisher_divergence(
        score_fn, sde, train_ds if FLAGS.split == "train" else eval_ds, rmsd, times,
        centered=bool(config.data.centered), num_images=FLAGS.num_images,
        seed=config.seed if FLAGS.seed is None else FLAGS.seed,
        device=mutils.config_device(config),
        progress=FLAGS.progress)
    out = Path(FLAGS.out)
    # NaN (sub-VP at t = 0) is written as the bare NaN of the reference files.
    atomic_write_text(out, json.dumps(result))
    print(f"saved {out} ({len(result[str(sizes[0])]['t'])} rows per size; RMSD "
          + ", ".join(f"{s}: {r:.5f}" for s, r in rmsd.items()) + ")")
    table = None
    if thresholds:
        table = {out.name: cutoffs.cutoff_table(result, thresholds)}
        print(cutoffs.format_cutoff_tables(table))
        cut_path = out.with_name(out.stem + "_cutoffs.json")
        atomic_write_text(cut_path, json.dumps({"thresholds": thresholds, "cutoffs": table},
                                               indent=2) + "\n")
        print(f"saved {cut_path}")
    if FLAGS.plot:
        from analysis.plots import plot_divergence, save_figure

        fig = plot_divergence(result, thresholds or (), table[out.name] if table else None,
                              title=f"{name} {full_size}x{full_size}")
        print(f"saved {save_figure(fig, FLAGS.plot)}")


if __name__ == "__main__":
    import cli
    from analysis.cli import run

    _define_flags()
    cli.start(lambda argv: run(_cli))
