"""The demo's analysis step: the training images' RMSD to the downsampling subspaces, the
full model's orthogonal Fisher divergence, and the cutoff times chosen from it (the threshold
rule of `choose_threshold`, with its fallbacks).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

import datasets
import sde_lib
import subspace_lib as sl
from analysis import cutoffs as cutoff_lib
from analysis.divergence import default_times, fisher_divergence
from analysis.rmsd import rmsd_table
from demo_settings import FULL_SIZE, SUBSPACE_SIZES, DemoSettings
from files import atomic_write_text
from models import utils as mutils


def compute_rmsd(config, workdir: Path, progress: bool, stats_name: str
                 ) -> tuple[dict[int, float], Path]:
    """Downsampling RMSD r_k of the configured training images (pixels in [0,1]) for 16 and 8,
    written under `stats_name` to `workdir/subspace_rmsd.json` (the statistics file the plans
    of this run read)."""
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    table = rmsd_table(train_ds, SUBSPACE_SIZES, methods=("downsample",), progress=progress)
    values = {int(s): float(r) for s, r in table["rmsd"]["downsample"].items()}
    path = sl.write_rmsd(stats_name, FULL_SIZE, values, workdir / "subspace_rmsd.json")
    return values, path


def divergence_floor(data: dict) -> float:
    """The smallest mean D_F over time of any size: the full network's own error on the
    orthogonal part, which D_F cannot resolve below (at high noise that part is Gaussian)."""
    floors = []
    for entry in data.values():
        _, means = cutoff_lib.mean_by_time(entry["t"], entry["err_norm"])
        finite = means[np.isfinite(means)]
        if finite.size:
            floors.append(float(finite.min()))
    if not floors:
        raise ValueError("The divergence has no finite value: check the model and the data.")
    return max(floors)


def choose_threshold(data: dict, paper_threshold: float, floor_factor: float,
                     untrained_floor: float) -> tuple[float | None, str]:
    """The D_F threshold of the cutoffs and why: the paper's when the model's D_F floor is
    well below it, else `floor_factor` times the floor (the cutoff is then where the
    non-Gaussian part of the orthogonal score is comparable to the network's own error there);
    None when the floor is so high that the network has not learned the orthogonal score."""
    floor = divergence_floor(data)
    if floor >= untrained_floor:
        return None, (f"the D_F floor {floor:.3g} shows an untrained network, so fixed cutoffs "
                      "are used")
    if floor_factor * floor <= paper_threshold:
        return paper_threshold, (f"D_F threshold {paper_threshold:g}, the paper's (the model's "
                                 f"D_F floor is {floor:.2g})")
    threshold = float(f"{floor_factor * floor:.2g}")
    return threshold, (f"D_F threshold {threshold:g} = {floor_factor:g} x the D_F floor "
                       f"{floor:.2g} of this small model (the paper's {paper_threshold:g} lies "
                       "below what its own error resolves)")


def divergence_and_cutoffs(full_net: torch.nn.Module, config, rmsd: dict[int, float],
                           settings: DemoSettings, workdir: Path, progress: bool) -> dict:
    """Orthogonal Fisher divergence of the full model on training images, cutoffs per standard
    threshold, and the chosen threshold and cutoffs (JSON, table and plot in `workdir`)."""
    from analysis.plots import plot_divergence, save_figure

    sde, _ = sde_lib.get_sde(config)
    score_fn = mutils.get_score_fn(sde, full_net, train=False, continuous=True)
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    data = fisher_divergence(score_fn, sde, train_ds, rmsd,
                             default_times(settings.divergence_times),
                             centered=bool(config.data.centered),
                             num_images=settings.divergence_images, seed=settings.seed,
                             device=config.device, progress=progress)
    atomic_write_text(workdir / "divergence.json", json.dumps(data))
    table = cutoff_lib.cutoff_table(data, cutoff_lib.DEFAULT_THRESHOLDS)
    threshold, rule = choose_threshold(data, settings.threshold, settings.floor_factor,
                                       settings.untrained_floor)
    chosen: dict[str, float | None] = {}
    if threshold is not None:
        for size, entry in data.items():
            chosen[size] = cutoff_lib.cutoff_time(entry["t"], entry["err_norm"], threshold)
    if threshold is None or any(v is None for v in chosen.values()):
        chosen = {str(s): t for s, t in zip(SUBSPACE_SIZES, settings.fallback_cutoffs)}
        rule += f"; cutoffs {list(settings.fallback_cutoffs)} (fixed fallback)"
    if any(t < settings.subspace_min_time for t in chosen.values()):
        chosen = {s: max(t, settings.subspace_min_time) for s, t in chosen.items()}
        rule += (f"; raised to at least {settings.subspace_min_time:g}, the smallest time the "
                 "subspace models were trained at")
    marks = {size: {repr(float(threshold)): t} for size, t in chosen.items()} if threshold \
        else None
    fig = plot_divergence(data, [threshold] if threshold else (), marks,
                          title=f"{settings.data.title} 32x32, small sub-VP DDPM++, "
                                f"{settings.divergence_images} images")
    save_figure(fig, workdir / "divergence.png")
    means = {}
    for size, entry in data.items():
        times, values = cutoff_lib.mean_by_time(entry["t"], entry["err_norm"])
        means[size] = {f"{t:g}": (float(v) if math.isfinite(v) else None)
                       for t, v in zip(times, values)}
    return {"table": table, "threshold": threshold, "rule": rule,
            "cutoffs": {str(s): float(t) for s, t in chosen.items()}, "mean_divergence": means,
            "images": settings.divergence_images, "times": settings.divergence_times}
