"""Is it the solvers or the networks' probability-flow ODE? Two checks behind the sampler benchmark.

1. `--part mixture`: every sampler on a model whose score is exact and non-Gaussian at image
   scale, the empirical distribution of K built-in training images (`mixture_score`), with the
   demo's sub-VP SDE at 32x32. A correct sampler ends on the training images: the table gives
   the median and 90th percentile of each sample's RMS distance to its nearest image (data
   scaler units, [-1, 1]), the share of samples within 0.02 of an image, how many distinct images
   were hit, the total variation distance of the hit frequencies from uniform (next to an ideal
   sampler's), the share of samples landing on the same image as RK45 at tolerance 1e-5 from
   the same noise (the accuracy of the ODE map itself), and the proxy FID against the K images.
2. `--part network`: the demo's committed 32x32 network of `--dataset` (builtin, the default,
   or mnist) with RK45 at tolerances 1e-3 and 1e-5, at eps 1e-2, 1e-3 and 1e-5, each scored
   with and without the final denoising step, all from the same prior noise (proxy FID with its
   bootstrap interval against the data statistics; bench/bench_samplers.py gives PC on the same
   checkpoint). The mixture part uses the built-in images whatever `--dataset`.

    python bench/diagnose_ode.py --out runs/diagnose_ode [--part mixture,network]
        [--dataset builtin] [--num_samples 128] [--mixture_samples 512] [--images 64]
        [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
import datasets  # noqa: E402
import evaluation  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from demo_settings import (  # noqa: E402
    FULL_SIZE,
    DemoSettings,
    checkpoint_path,
    demo_config,
    read_manifest,
)
from files import atomic_write_text  # noqa: E402
from mixture_score import EmpiricalScoreNet, nearest_image_distances  # noqa: E402
from models import utils as mutils  # noqa: E402
from models.checkpoints import load_model_weights  # noqa: E402

# name -> (method, options); PC reads N, the solvers count steps as EDM does (with denoising).
MIXTURE_SAMPLERS = {
    "PC N=1000": ("pc", {"N": 1000}),
    "PC N=100": ("pc", {"N": 100}),
    "RK45 tol 1e-5": ("ode", {"tol": 1e-5}),
    "RK45 tol 1e-3": ("ode", {"tol": 1e-3}),
    "Heun 18": ("heun", {"steps": 18}),
    "Heun 25, churn 10": ("heun", {"steps": 25, "churn": 10.0}),
    "DPM-Solver++(2M) 20": ("dpm_solver", {"steps": 20}),
    "DPM-Solver++(2M) 50": ("dpm_solver", {"steps": 50}),
    "DDIM 50": ("ddim", {"steps": 50}),
    "DDIM 50, eta 1": ("ddim", {"steps": 50, "eta": 1.0}),
    "SDE-DPM-Solver++(2M) 20": ("sde_dpm_solver", {"steps": 20}),
    "SDE-DPM-Solver++(2M) 50": ("sde_dpm_solver", {"steps": 50}),
}


def sample(method: str, options: dict, net: torch.nn.Module, sde: sde_lib.SDE, eps: float,
           x_T: torch.Tensor, denoise: bool = True, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Samples (data-scaler space) of one sampler from the prior sample x_T, and its nfe."""
    shape = tuple(x_T.shape)
    torch.manual_seed(seed)
    if method == "pc":
        sde = sde_lib.subVPSDE(sde.beta_0, sde.beta_1, options["N"])
        fn = sampling.get_pc_sampler(sde, shape, sampling.get_predictor("euler_maruyama"),
                                     sampling.get_corrector("none"), lambda x: x, snr=0.16,
                                     continuous=True, denoise=denoise, eps=eps, device="cpu",
                                     progress=False)
        return fn(net, x=x_T.clone())
    if method == "ode":
        fn = sampling.get_ode_sampler(sde, shape, lambda x: x, denoise=denoise,
                                      rtol=options["tol"], atol=options["tol"], eps=eps,
                                      device="cpu")
        return fn(net, z=x_T.clone())
    extra = {k: v for k, v in options.items() if k != "steps"}
    fn = sampling.get_solver_sampler(method, sde, shape, lambda x: x, steps=options["steps"],
                                     denoise=denoise, eps=eps, device="cpu", progress=False,
                                     **extra)
    return fn(net, z=x_T.clone())


def training_images(count: int) -> torch.Tensor:
    """The first `count` built-in training images (32x32, float NCHW in [0, 1])."""
    return evaluation.to_float_nchw(datasets.builtin_arrays()["train_images"][:count])


def _tv_from_uniform(index: torch.Tensor, count: int) -> torch.Tensor:
    """Total variation distance between the frequencies of `index` over `count` classes and the
    uniform distribution."""
    frequencies = torch.bincount(index, minlength=count).double() / len(index)
    return 0.5 * (frequencies - 1.0 / count).abs().sum()


def mixture_part(args, config, sde, eps) -> list[dict]:
    images01 = training_images(args.images)
    scaler = datasets.get_data_scaler(config)
    inverse = datasets.get_data_inverse_scaler(config)
    images = scaler(images01)
    net = EmpiricalScoreNet(sde, images)
    reference = evaluation.proxy_features(images01)
    # Leave-one-out nearest-image distance among the images themselves: the scale of "far".
    flat = images.flatten(1).double()
    pairwise = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    pairwise.fill_diagonal_(float("inf"))
    spacing = float(pairwise.min(1).values.median())
    print(f"{len(images)} images {tuple(images.shape[1:])}; median distance of an image to its "
          f"nearest other image {spacing:.3f}", flush=True)
    torch.manual_seed(args.seed)
    x_T = sde.prior_sampling((args.mixture_samples,) + tuple(images.shape[1:]))
    # The ideal sampler's hit counts are multinomial(num_samples, uniform over K): the total
    # variation distance of its empirical frequencies from uniform, for comparison.
    draws = torch.randint(len(images), (200, args.mixture_samples),
                          generator=torch.Generator().manual_seed(1))
    ideal_tv = float(torch.stack([_tv_from_uniform(d, len(images)) for d in draws]).mean())
    print(f"an ideal sampler's hit frequencies are {ideal_tv:.3f} (total variation) from uniform",
          flush=True)
    rows, reference_index = [], None
    for name, (method, options) in MIXTURE_SAMPLERS.items():
        began = time.perf_counter()
        x, nfe = sample(method, options, net, sde, eps, x_T, seed=args.seed)
        seconds = time.perf_counter() - began
        distance, index = nearest_image_distances(x, images)
        if reference_index is None and method == "ode":
            reference_index = index  # the tightest RK45 run, first in the table
        fid = evaluation.frechet_distance_from_activations(
            evaluation.proxy_features(inverse(x).clamp(0, 1)), reference)
        row = {"sampler": name, "nfe": int(nfe), "seconds": seconds,
               "median_distance": float(distance.median()),
               "p90_distance": float(distance.quantile(0.9)),
               "on_image": float((distance < 0.02).double().mean()),
               "distinct_images": int(index.unique().numel()),
               "tv_from_uniform": float(_tv_from_uniform(index, len(images))),
               "ideal_tv_from_uniform": ideal_tv,
               "same_image_as_rk45": (float((index == reference_index).double().mean())
                                      if reference_index is not None else None),
               "proxy_fid_vs_images": fid, "image_spacing": spacing}
        rows.append(row)
        same = row["same_image_as_rk45"]
        print(f"{name:26s} nfe {nfe:5d} median {row['median_distance']:.4f} p90 "
              f"{row['p90_distance']:.4f} on-image {row['on_image']:.2f} distinct "
              f"{row['distinct_images']:3d} TV {row['tv_from_uniform']:.3f} same-as-RK45 "
              f"{'-' if same is None else f'{same:.2f}'} proxy FID vs images {fid:.2f}",
              flush=True)
    return rows


NETWORK_RUNS = [
    # (name, tolerance, eps): each ODE solve is scored as it ends and after the final denoising
    ("RK45 1e-3, eps 1e-3", 1e-3, 1e-3),
    ("RK45 1e-5, eps 1e-3", 1e-5, 1e-3),
    ("RK45 1e-3, eps 1e-5", 1e-3, 1e-5),
    ("RK45 1e-3, eps 1e-2", 1e-3, 1e-2),
]


def network_part(args, config, sde, eps) -> list[dict]:
    net = load_model_weights(mutils.create_model(config),
                             checkpoint_path(FULL_SIZE, args.dataset))
    score_fn = mutils.get_score_fn(sde, net, train=False, continuous=True)
    inverse = datasets.get_data_inverse_scaler(config)
    stats = evaluation.load_dataset_stats(config, "proxy")
    torch.manual_seed(args.seed)
    x_T = sde.prior_sampling((args.num_samples, config.data.num_channels, FULL_SIZE, FULL_SIZE))
    rows = []
    for name, tol, run_eps in NETWORK_RUNS:
        began = time.perf_counter()
        with torch.no_grad():
            x, nfe = sampling.ode_sample_window(score_fn, sde, x_T.clone(), sde.T, run_eps,
                                                rtol=tol, atol=tol)
            denoised = sampling.denoise_update(score_fn, sde, x, run_eps)
        seconds = time.perf_counter() - began
        for label, images, count in (("no denoise", x, nfe), ("denoise", denoised, nfe + 1)):
            fid = evaluation.proxy_fid_bootstrap(inverse(images).clamp(0, 1), stats,
                                                 seed=args.seed)
            rows.append({"run": f"{name}, {label}", "nfe": int(count), "seconds": seconds,
                         "proxy_fid": fid,
                         "load": " ".join(f"{v:.2f}" for v in os.getloadavg())})
            print(f"{name + ', ' + label:34s} nfe {count:5d} {seconds:6.1f} s proxy FID "
                  f"{fid['value']:.1f} [{fid['low']:.1f}, {fid['high']:.1f}]", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for the JSON results.")
    parser.add_argument("--part", default="mixture,network")
    parser.add_argument("--dataset", default="builtin", help="Demo dataset whose committed "
                        "32x32 checkpoint the network part runs: builtin or mnist.")
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--mixture_samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    if not parts or parts - {"mixture", "network"}:
        raise SystemExit(f"error: --part takes mixture and/or network; got '{args.part}'.")
    if min(args.num_samples, args.mixture_samples, args.images) < 2:
        raise SystemExit("error: --num_samples, --mixture_samples and --images must be at least "
                         "2.")
    network_settings = DemoSettings.for_mode("quick", args.dataset)
    if "network" in parts:
        read_manifest(args.dataset)  # a missing checkpoint set is an error before any work
    torch.set_num_threads(args.threads)
    result = {"num_samples": args.num_samples, "mixture_samples": args.mixture_samples,
              "images": args.images, "seed": args.seed, "dataset": args.dataset,
              "threads": args.threads,
              "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    # The mixture's images are the built-in ones; the network part's config is its dataset's.
    for part, settings, run in (("mixture", DemoSettings.for_mode("quick", "builtin"),
                                 mixture_part),
                                ("network", network_settings, network_part)):
        if part in parts:
            config = demo_config(FULL_SIZE, settings, device=torch.device("cpu"))
            sde, eps = sde_lib.get_sde(config)
            result[part] = run(args, config, sde, eps)
    result["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    name = "diagnose_ode_" + "_".join(sorted(parts)) + ".json"
    atomic_write_text(Path(args.out) / name, json.dumps(result, indent=2) + "\n")
    print(f"Wrote {Path(args.out) / name}.")


if __name__ == "__main__":
    cli.run_entry_point(main)
