"""What the demo measures and whether its claims hold: sample quality against the training
set (proxy FID with a bootstrap interval and proxy KID, `quality_entry`; a second metric plugs
in there), the held-out images that give its floor, bits/dim by the probability-flow ODE, and
the claim checks on a run's results.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

import datasets
import evaluation
import likelihood
import run_lib
import sde_lib
from demo_settings import DemoSettings


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


def training_features(config) -> np.ndarray:
    """Proxy features of every training image (the reference set of the proxy KID)."""
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    return np.concatenate([evaluation.proxy_features(batch["image"]) for batch in train_ds])


def quality_entry(uint8: np.ndarray, proxy_stats: dict, reference: np.ndarray,
                  settings: DemoSettings) -> dict:
    """The quality entry of a results row for a set of images (uint8 NHWC): proxy FID against
    the training-set statistics `proxy_stats` with its bootstrap 95 % interval, and proxy KID
    against the training features `reference` with its standard error."""
    quality = evaluation.proxy_quality(uint8, proxy_stats, reference,
                                       settings.bootstrap_resamples, seed=settings.seed)
    return {"proxy_fid": quality["fid"]["value"],
            "proxy_fid_interval": [quality["fid"]["low"], quality["fid"]["high"]],
            "proxy_kid": quality["kid"]["value"],
            "proxy_kid_std_error": quality["kid"]["std_error"],
            "num_samples": quality["fid"]["samples"]}


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


def claim_checks(results: dict) -> list[dict]:
    """The demo's claims, each with its measured value and whether it holds: full-only proxy
    FID at most 2x the held-out floor; each subspace sampler inside the full-only bootstrap
    interval or better, and at most 1.15x its proxy FID; bits/dim within 0.05 of the full
    model's; achieved speed-up at least 97 % of the ideal from the measured costs."""
    checks = []
    samplers = results["samplers"]
    full = samplers.get("full only")
    if full is None:
        return checks
    floor = results["data_proxy_fid"]
    checks.append({"claim": "full-only proxy FID <= 2x held-out floor",
                   "value": f"{full['proxy_fid']:.1f} vs {2 * floor:.1f}",
                   "holds": full["proxy_fid"] <= 2 * floor})
    for name, info in samplers.items():
        if name == "full only":
            continue
        ratio = info["proxy_fid"] / full["proxy_fid"]
        inside = info["proxy_fid"] <= full["proxy_fid_interval"][1]
        checks.append({"claim": f"{name}: proxy FID within the full-only interval or better, "
                                "and <= 1.15x full-only",
                       "value": f"{info['proxy_fid']:.1f} (full-only interval "
                                f"{full['proxy_fid_interval'][0]:.1f}-"
                                f"{full['proxy_fid_interval'][1]:.1f}), ratio {ratio:.2f}",
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
