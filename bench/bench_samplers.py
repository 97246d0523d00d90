"""Quality against cost of the samplers, full-only and with the subspace plan, on the demo models.

Draws the same number of samples from the committed demo checkpoints (`assets/checkpoints/builtin`,
sub-VP DDPM++ at 32, 16 and 8, cutoffs from their manifest) with PC (Euler-Maruyama, N = 35 to
1000), RK45, EDM Heun (with and without churn), DPM-Solver++(2M), SDE-DPM-Solver++(2M) and DDIM
(eta 0 and 1), each full-only and with the subspace plan 16, 8 (conditional Langevin after each
upsampling, as the demo does), from the same prior noise, full and subspace interleaved.
For each it records the network evaluations per size, the wall-clock seconds and the proxy FID
with its bootstrap 95 % interval and the proxy KID against the training images
(`evaluation.proxy_quality`), with the 1-minute load average after each row, and writes a table,
a JSON file and a plot (proxy FID against evaluations and against seconds) to --out.

    python bench/bench_samplers.py --out runs/bench_samplers [--num_samples 128] [--threads 2]
        [--only heun,dpm_solver] [--rows "PC N=100;Heun 18"] [--plans full,subspace]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import evaluation  # noqa: E402
import sde_lib  # noqa: E402
import subspace_lib as sl  # noqa: E402
from demo_metrics import held_out_images, training_features  # noqa: E402
from demo_settings import (  # noqa: E402
    FULL_SIZE,
    STATS_NAME,
    DemoSettings,
    builtin_checkpoint_path,
    demo_config,
    read_manifest,
)
from files import atomic_write, atomic_write_text
from models import utils as mutils  # noqa: E402
from models.checkpoints import load_model_weights
from subspace_sampling import subspace_pc_sample, subspace_solver_sample  # noqa: E402

PLAN_SIZES = (16, 8)
# name -> (method, options): PC uses model.num_scales = N; the solvers count steps as EDM does.
SAMPLERS = {
    "PC N=1000": ("pc", {"num_scales": 1000}),
    "PC N=100": ("pc", {"num_scales": 100}),
    "PC N=50": ("pc", {"num_scales": 50}),
    "PC N=35": ("pc", {"num_scales": 35}),
    "RK45 tol 1e-3": ("ode", {"rtol": 1e-3, "atol": 1e-3}),
    "Heun 18": ("heun", {"steps": 18}),
    "Heun 25": ("heun", {"steps": 25}),
    "Heun 25, churn 40": ("heun", {"steps": 25, "churn": 40.0}),
    "Heun 25, churn 40, split t": ("heun", {"steps": 25, "churn": 40.0, "split": "uniform"}),
    "DPM-Solver++(2M) 20": ("dpm_solver", {"steps": 20}),
    "DPM-Solver++(2M) 35": ("dpm_solver", {"steps": 35}),
    "DDIM 50": ("ddim", {"steps": 50}),
    "DDIM 50, eta 1": ("ddim", {"steps": 50, "eta": 1.0}),
    "SDE-DPM-Solver++(2M) 20": ("sde_dpm_solver", {"steps": 20}),
    "SDE-DPM-Solver++(2M) 35": ("sde_dpm_solver", {"steps": 35}),
    "SDE-DPM-Solver++(2M) 50": ("sde_dpm_solver", {"steps": 50}),
    "SDE-DPM-Solver++(2M) 35, split t": ("sde_dpm_solver", {"steps": 35, "split": "uniform"}),
    "SDE-DPM-Solver++(2M) 50, split t": ("sde_dpm_solver", {"steps": 50, "split": "uniform"}),
    "DPM-Solver++(2M) 35, split t": ("dpm_solver", {"steps": 35, "split": "uniform"}),
    "SDE-DPM-Solver++(2M) 20, edm": ("sde_dpm_solver", {"steps": 20, "schedule": "edm"}),
    "SDE-DPM-Solver++(2M) 35, edm": ("sde_dpm_solver", {"steps": 35, "schedule": "edm"}),
    "SDE-DPM-Solver++(2M) 20, uniform": ("sde_dpm_solver", {"steps": 20,
                                                            "schedule": "uniform"}),
    "SDE-DPM-Solver++(2M) 35, uniform": ("sde_dpm_solver", {"steps": 35,
                                                            "schedule": "uniform"}),
}


def run_sampler(method: str, options: dict, networks: dict, plan: sl.SubspacePlan | None,
                num_samples: int, seed: int, settings: DemoSettings) -> tuple[torch.Tensor, dict]:
    """Samples (data-scaler space) and {nfe per size, seconds} of one sampler, one plan."""
    config = demo_config(FULL_SIZE, settings, device=torch.device("cpu"))
    config.model.num_scales = options.get("num_scales", config.model.num_scales)
    sde, eps = sde_lib.get_sde(config)
    shape = (num_samples, 3, FULL_SIZE, FULL_SIZE)
    sizes = plan.sizes if plan is not None else ()
    nets = [networks[FULL_SIZE]] + [networks[s] for s in sizes]
    # Full only: a plan whose subspace level has cutoff T, so its window is empty and the full
    # network runs the whole window [T, eps] (same code path, no upsampling).
    plan_or_trivial = plan if plan is not None else sl.SubspacePlan(FULL_SIZE, (16,), (1.0,),
                                                                    (1.0,))
    if plan is None:
        nets = nets + [networks[16]]
    common = dict(eps=eps, continuous=True, denoise=True, langevin_snr=settings.langevin_snr,
                  langevin_steps=settings.langevin_steps, device="cpu")
    torch.manual_seed(seed)
    began = time.perf_counter()
    if method == "pc":
        x, reports = subspace_pc_sample(nets, sde, plan_or_trivial, bool(config.data.centered),
                                        shape, predictor=config.sampling.predictor,
                                        corrector=config.sampling.corrector,
                                        snr=config.sampling.snr, **common)
    else:
        extra = {k: v for k, v in options.items() if k != "num_scales"}
        x, reports = subspace_solver_sample(nets, sde, plan_or_trivial,
                                            bool(config.data.centered), shape, method=method,
                                            **extra, **common)
    seconds = time.perf_counter() - began
    nfe: dict[str, int] = {}
    for report in reports:
        nfe[str(report.size)] = nfe.get(str(report.size), 0) + report.nfe
    return x, {"nfe": nfe, "seconds": seconds}


def plot(rows: list[dict], path: Path) -> None:
    """Proxy FID (with its interval) against network evaluations and against seconds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    for axis, key, label in ((figure.add_subplot(1, 2, 1), "nfe_total", "network evaluations"),
                             (figure.add_subplot(1, 2, 2), "seconds", "wall-clock seconds")):
        for plan, marker in (("full only", "o"), ("subspace 16, 8", "s")):
            for row in rows:
                if row["plan"] != plan:
                    continue
                fid = row["proxy_fid"]
                axis.errorbar(row[key], fid["value"], yerr=[[fid["value"] - fid["low"]],
                                                            [fid["high"] - fid["value"]]],
                              marker=marker, color="C0" if plan == "full only" else "C1",
                              capsize=2, linestyle="none")
                axis.annotate(row["sampler"], (row[key], fid["value"]), fontsize=6,
                              xytext=(3, 3), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel("proxy FID (95 % bootstrap interval)")
        axis.plot([], [], "o", color="C0", label="full only")
        axis.plot([], [], "s", color="C1", label="subspace 16, 8")
        axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table with the run's settings."""
    lines = [f"Samplers on the demo checkpoints: {meta['num_samples']} samples each, seed "
             f"{meta['seed']}, {meta['threads']} threads, {meta['machine']}; load average "
             f"before / after: {meta['load_before']} / {meta['load_after']}. Held-out data "
             f"score proxy FID {meta['data_proxy_fid']:.1f}, proxy KID "
             f"{meta['data_proxy_kid']:.3f}.", "",
             "| sampler | plan | network evals 32 / 16 / 8 | time (s) | load | proxy FID [95 % CI] "
             "| proxy KID (s.e.) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        nfe = " / ".join(str(row["nfe"].get(str(s), 0)) for s in (32, 16, 8))
        fid = row["proxy_fid"]
        kid = row["proxy_kid"]
        lines.append(f"| {row['sampler']} | {row['plan']} | {nfe} | {row['seconds']:.1f} | "
                     f"{row['load'].split()[0]} | {fid['value']:.1f} [{fid['low']:.1f}, "
                     f"{fid['high']:.1f}] | {kid['value']:.3f} ({kid['std_error']:.3f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for the table, JSON and plot.")
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="Intra-op threads (on a busy machine, 2 wait on each other).")
    parser.add_argument("--only", default="", help="Comma list of methods to run (pc, ode, "
                        "heun, dpm_solver, sde_dpm_solver, ddim); default: all.")
    parser.add_argument("--rows", default="", help="Semicolon-separated row names (see "
                        "SAMPLERS) to run; default: all rows of the --only methods.")
    parser.add_argument("--plans", default="full,subspace", help="full and/or subspace.")
    args = parser.parse_args()
    if args.num_samples < 2:
        raise SystemExit("error: --num_samples must be at least 2 (the proxy FID needs a "
                         "covariance).")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = DemoSettings.for_mode("quick")
    manifest = read_manifest()
    networks = {}
    for size in (FULL_SIZE,) + PLAN_SIZES:
        config = demo_config(size, settings, device=torch.device("cpu"))
        networks[size] = load_model_weights(mutils.create_model(config),
                                            builtin_checkpoint_path(size))
    cutoffs = tuple(float(manifest["cutoffs"]["values"][str(s)]) for s in PLAN_SIZES)
    plan = sl.SubspacePlan.from_statistics(FULL_SIZE, PLAN_SIZES, cutoffs, STATS_NAME)
    config = demo_config(FULL_SIZE, settings, device=torch.device("cpu"))
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    stats = evaluation.load_dataset_stats(config, "proxy")
    reference = training_features(config)
    data_quality = evaluation.proxy_quality(evaluation.to_uint8_nhwc(
        held_out_images(config, args.num_samples)), stats, reference, seed=args.seed)
    only = {m.strip() for m in args.only.split(",") if m.strip()}
    chosen_rows = {r.strip() for r in args.rows.split(";") if r.strip()}
    unknown = chosen_rows - set(SAMPLERS)
    if unknown:
        raise SystemExit(f"error: unknown --rows {sorted(unknown)}; choose from {list(SAMPLERS)}.")
    chosen_plans = {p.strip() for p in args.plans.split(",") if p.strip()}
    if not chosen_plans or chosen_plans - {"full", "subspace"}:
        raise SystemExit(f"error: --plans takes full and/or subspace; got '{args.plans}'.")
    meta = {"num_samples": args.num_samples, "seed": args.seed, "threads": args.threads,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"torch {torch.__version__}",
            "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "plan": plan.describe(), "data_proxy_fid": data_quality["fid"]["value"],
            "data_proxy_kid": data_quality["kid"]["value"]}
    rows = []
    for name, (method, options) in SAMPLERS.items():
        if (only and method not in only) or (chosen_rows and name not in chosen_rows):
            continue
        for plan_name, chosen in (("full only", None), ("subspace 16, 8", plan)):
            if ("full" if chosen is None else "subspace") not in chosen_plans:
                continue
            if chosen is None and "split" in options:
                continue  # the split of steps over stages changes nothing without stages
            x, info = run_sampler(method, options, networks, chosen, args.num_samples,
                                  args.seed, settings)
            uint8 = evaluation.to_uint8_nhwc(inverse_scaler(x).clamp(0, 1))
            quality = evaluation.proxy_quality(uint8, stats, reference, seed=args.seed)
            fid, kid = quality["fid"], quality["kid"]
            row = {"sampler": name, "plan": plan_name, **info,
                   "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                   "nfe_total": sum(info["nfe"].values()), "proxy_fid": fid, "proxy_kid": kid}
            rows.append(row)
            print(f"{name:22s} {plan_name:15s} nfe {info['nfe']} {info['seconds']:.1f} s "
                  f"proxy FID {fid['value']:.1f} [{fid['low']:.1f}, {fid['high']:.1f}] KID "
                  f"{kid['value']:.3f} +- {kid['std_error']:.3f} load {row['load']}", flush=True)
    meta["load_after"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    atomic_write_text(out / "bench_samplers.md", markdown(rows, meta))
    atomic_write_text(out / "bench_samplers.json",
                      json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, out / "bench_samplers.png")
    print(f"Wrote {out / 'bench_samplers.md'}, .json and .png.")


if __name__ == "__main__":
    main()
