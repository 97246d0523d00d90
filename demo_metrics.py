"""What the demo measures and whether its claims hold: sample quality against the training
set (`quality_entry`: Inception FID with a bootstrap interval and KID where the dataset's torch
Inception statistics are committed, `inception_reference`; proxy FID and KID always), the
held-out images that give its floor, the memorisation check (each image's distance to its
nearest training image, `nearest_training_images`), bits/dim by the probability-flow ODE, and
the claim checks on a run's results.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

import datasets
import evaluation
import likelihood
import run_lib
import sde_lib
from demo_settings import FLOOR_FACTORS, ROOT, DemoSettings


def first_images(config, count: int, split: str = "test") -> torch.Tensor:
    """The first `count` images of the `split` ("train" or "test") of the configured dataset in
    its evaluation order (one pass, seeded, no flips), float NCHW in [0, 1]."""
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    batches, total = [], 0
    for batch in (train_ds if split == "train" else eval_ds):
        batches.append(batch["image"])
        total += len(batch["image"])
        if total >= count:
            break
    return torch.cat(batches)[:count]


def held_out_images(config, count: int) -> torch.Tensor:
    """The first `count` images of the test split (seeded order), float NCHW in [0, 1]."""
    return first_images(config, count, "test")


def training_images(config) -> np.ndarray:
    """Every training image of the configured dataset (evaluation order), uint8 NHWC."""
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    return np.concatenate([evaluation.to_uint8_nhwc(batch["image"]) for batch in train_ds])


def training_features(config, images: np.ndarray | None = None, batch: int = 1024
                      ) -> np.ndarray:
    """Proxy features of every training image (the reference set of the proxy KID), from
    `images` (uint8 NHWC, default `training_images(config)`)."""
    images = training_images(config) if images is None else images
    return np.concatenate([evaluation.proxy_features(images[i:i + batch])
                           for i in range(0, len(images), batch)])


def inception_reference(config) -> dict:
    """The dataset's committed torch Inception statistics (assets/stats/
    <name>_torch_inception_stats.npz, `compute_dataset_stats.py --inception torch`): the
    features of its training images as float64, their mean `mu`, covariance `sigma` and its
    root `sigma_root` (computed once here, reused by every bootstrap), the feature network and
    resize convention. FileNotFoundError or evaluation.StatisticsMismatchError when missing or
    made by another network."""
    resize = evaluation.inception_resize(config)
    network = evaluation.torch_inception_network(resize)
    path = evaluation.dataset_stats_path(config, "torch_inception")
    stats = evaluation.load_dataset_stats(config, "torch_inception")
    evaluation.check_feature_network(stats, network, path)
    features = stats[evaluation.INCEPTION_FINAL_POOL].astype(np.float64)
    mu, sigma = evaluation.gaussian_statistics(features)
    return {"features": features, "mu": mu, "sigma": sigma,
            "sigma_root": evaluation.symmetric_matrix_sqrt(sigma), "num_images": len(features),
            "path": path, "network": network, "resize": resize}


def repo_relative(path) -> str:
    """`path` relative to the repository when inside it (for reports), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def inception_reference_info(config, wanted: bool | None) -> tuple[dict | None, dict]:
    """The dataset's torch Inception reference (`inception_reference`) when `wanted` (None:
    when its statistics are committed), with what a report records about it; else None and
    why. Asked for explicitly (True), missing statistics raise."""
    if wanted is False:
        return None, {"skipped": "not asked for"}
    try:
        reference = inception_reference(config)
    except (FileNotFoundError, evaluation.StatisticsMismatchError) as error:
        if wanted:
            raise
        return None, {"skipped": str(error).replace(str(ROOT) + "/", "")}
    return reference, {"statistics": repo_relative(reference["path"]),
                       "reference_images": reference["num_images"],
                       "network": reference["network"]}


def quality_entry(uint8: np.ndarray, proxy_stats: dict, reference: np.ndarray,
                  settings: DemoSettings, inception: dict | None = None) -> dict:
    """The quality entry of a results row for a set of images (uint8 NHWC): proxy FID against
    the training-set statistics `proxy_stats` with its bootstrap 95 % interval, and proxy KID
    against the training features `reference` with its standard error; with `inception`
    (`inception_reference`), the same two in the torch Inception features (`fid`, `kid`)."""
    quality = evaluation.proxy_quality(uint8, proxy_stats, reference,
                                       settings.bootstrap_resamples, seed=settings.seed)
    entry = {"proxy_fid": quality["fid"]["value"],
             "proxy_fid_interval": [quality["fid"]["low"], quality["fid"]["high"]],
             "proxy_kid": quality["kid"]["value"],
             "proxy_kid_std_error": quality["kid"]["std_error"],
             "num_samples": quality["fid"]["samples"]}
    if inception is not None:
        began = time.perf_counter()
        features = evaluation.torch_inception_features(uint8, resize=inception["resize"])
        quality = evaluation.feature_quality(features, inception, inception["features"],
                                             settings.bootstrap_resamples, seed=settings.seed)
        entry.update(fid=quality["fid"]["value"],
                     fid_interval=[quality["fid"]["low"], quality["fid"]["high"]],
                     fid_interval_kind=quality["fid"]["interval"],
                     kid=quality["kid"]["value"], kid_std_error=quality["kid"]["std_error"],
                     inception_seconds=time.perf_counter() - began)
    return entry


def nearest_training_images(images: np.ndarray, training: np.ndarray, batch: int = 256
                            ) -> tuple[np.ndarray, np.ndarray]:
    """For each image (uint8 NHWC), the Euclidean distance (pixels in [0, 1], over all pixels
    and channels) to its nearest image of `training` (uint8 NHWC) and that image's index."""
    flat = torch.from_numpy(np.ascontiguousarray(training)).reshape(len(training), -1)
    flat = flat.float() / 255.0
    norms = (flat ** 2).sum(dim=1)
    distances, indices = [], []
    for start in range(0, len(images), batch):
        query = torch.from_numpy(np.ascontiguousarray(images[start:start + batch]))
        query = query.reshape(len(query), -1).float() / 255.0
        squared = (query ** 2).sum(dim=1, keepdim=True) + norms - 2.0 * query @ flat.T
        best, index = squared.min(dim=1)
        distances.append(best.clamp_min(0.0).sqrt())
        indices.append(index)
    return torch.cat(distances).double().numpy(), torch.cat(indices).numpy()


MEMORISATION_QUANTILES = (0.0, 0.01, 0.05, 0.5)


def memorisation_entry(distances: np.ndarray, test_distances: np.ndarray) -> dict:
    """Quantiles of the nearest-training-image distances of a set of images, and the share of
    them closer to a training image than the closest 1 % of the test images are (about 1 % for
    a model that does not copy its training images, more for one that does)."""
    threshold = float(np.quantile(test_distances, 0.01))
    return {"quantiles": {f"{q:g}": float(np.quantile(distances, q))
                          for q in MEMORISATION_QUANTILES},
            "share_below_test_q01": float(np.mean(distances < threshold)),
            "test_q01": threshold, "images": int(len(distances))}


def bits_per_dim(model: torch.nn.Module, config, settings: DemoSettings, progress: bool
                 ) -> tuple[np.ndarray, dict]:
    """Bits/dim of the first `bpd_images` images of the test split (seeded order, uniform
    dequantization, seeded Hutchinson noise) through `model` by the probability-flow ODE (RK45
    at rtol = atol = `bpd_tol`): the per-image values and a summary."""
    import copy

    sde, _ = sde_lib.get_sde(config)
    cfg = copy.deepcopy(config)
    cfg.eval.batch_size = settings.bpd_batch
    cfg.eval.bpd_dataset = "test"
    likelihood_fn = likelihood.get_likelihood_fn(
        sde, datasets.get_data_inverse_scaler(cfg), rtol=settings.bpd_tol, atol=settings.bpd_tol)
    batches = -(-settings.bpd_images // settings.bpd_batch)
    torch.manual_seed(settings.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    bpds, ode_nfe = run_lib.compute_bpd(likelihood_fn, model, cfg, datasets.get_data_scaler(cfg),
                                        cfg.device, num_repeats=1, progress=progress,
                                        max_batches=batches)
    bpds = bpds[: settings.bpd_images].astype(np.float64)
    return bpds, {"bpd": float(bpds.mean()),
                  "std_error": (float(bpds.std(ddof=1) / math.sqrt(len(bpds)))
                                if len(bpds) > 1 else float("nan")),
                  "images": int(len(bpds)), "ode_nfe": int(ode_nfe),
                  "seconds": time.perf_counter() - wall0,
                  "cpu_seconds": time.process_time() - cpu0}


def quality_metric(results: dict) -> tuple[str, str]:
    """The key and name of the metric the claims use: Inception FID where the run has it,
    else the proxy FID."""
    full = results["samplers"].get("full only", {})
    return ("fid", "Inception FID") if "fid" in full else ("proxy_fid", "proxy FID")


def claim_checks(results: dict) -> list[dict]:
    """The demo's claims, each with its measured value and whether it holds: full-only FID at
    most FLOOR_FACTORS times the held-out floor's at the same count (Inception FID where the
    run has it: 3x; else the proxy's: 2x); each subspace sampler inside the full-only bootstrap
    interval or better, and at most 1.15x its FID; bits/dim within 0.05 of the full model's;
    achieved speed-up at least 97 % of the ideal from the measured costs."""
    checks = []
    samplers = results["samplers"]
    full = samplers.get("full only")
    if full is None:
        return checks
    key, metric = quality_metric(results)
    factor = FLOOR_FACTORS[key]
    floor = results["data_quality"][key]
    checks.append({"claim": f"full-only {metric} <= {factor:g}x held-out floor",
                   "value": f"{full[key]:.1f} vs {factor:g} x {floor:.1f} = "
                            f"{factor * floor:.1f} (ratio {full[key] / floor:.2f})",
                   "holds": full[key] <= factor * floor})
    for name, info in samplers.items():
        if name == "full only":
            continue
        ratio = info[key] / full[key]
        low, high = full[f"{key}_interval"]
        inside = info[key] <= high
        checks.append({"claim": f"{name}: {metric} within the full-only interval or better, "
                                "and <= 1.15x full-only",
                       "value": f"{info[key]:.1f} (full-only interval {low:.1f}-{high:.1f}), "
                                f"ratio {ratio:.2f}",
                       "holds": bool(inside and ratio <= 1.15)})
        sp = info["speedup"]
        pooled = sp["achieved"] / sp["ideal_measured_cost"]
        if "ideal_own_cost" in sp:
            share = sp["achieved"] / sp["ideal_own_cost"]
            value = (f"{sp['achieved']:.2f}x of {sp['ideal_own_cost']:.2f}x at the costs of "
                     f"its own calls ({100 * share:.0f} %); {sp['ideal_measured_cost']:.2f}x at "
                     f"the run's mean costs ({100 * pooled:.0f} %)")
        else:
            share = pooled
            value = (f"{sp['achieved']:.2f}x of {sp['ideal_measured_cost']:.2f}x "
                     f"({100 * share:.0f} %)")
        checks.append({"claim": f"{name}: achieved speed-up >= 97 % of the ideal",
                       "value": value, "holds": share >= 0.97})
        b = results.get("bpd", {}).get(name)
        if b is not None and "difference_to_full" in b:
            checks.append({"claim": f"{name}: bits/dim within 0.05 of the full model's",
                           "value": f"{b['difference_to_full']:+.4f} ± "
                                    f"{b['difference_std_error']:.4f}",
                           "holds": abs(b["difference_to_full"]) <= 0.05})
    return checks
