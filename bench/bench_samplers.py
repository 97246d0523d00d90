"""Quality against cost of the samplers, full-only and with the subspace plan, on the demo models.

Draws the same number of samples from the committed demo checkpoints of `--dataset` (builtin,
the default, or mnist: `assets/checkpoints/<dataset>`, sub-VP DDPM++ at 32, 16 and 8, cutoffs
from their manifest) with PC (Euler-Maruyama, N = 35 to 1000), RK45, EDM Heun (with and without
churn), DPM-Solver++(2M), SDE-DPM-Solver++(2M) and DDIM (eta 0 and 1), each full-only and with
the subspace plan 16, 8 (conditional Langevin after each upsampling, as the demo does), from the
same prior noise (`--seed`), full and subspace interleaved.
For each it records the network evaluations per size, the wall-clock seconds and the sample
quality as the demo measures it (`demo_metrics.quality_entry`, bootstrap seed and resamples of
the quick demo): proxy FID with its bootstrap 95 % interval and proxy KID against the first
`kid_reference_images` training images, and, where the dataset's torch Inception statistics
are committed (MNIST), Inception FID with its 95 % interval and KID (`--no_inception` skips
them: 0.1-0.7 s per image on a laptop CPU), with the 1-minute load average after each row, and
writes a table, a JSON file and a plot (Inception FID where measured, else proxy FID, against
evaluations and against seconds) to --out.

    python bench/bench_samplers.py --out runs/bench_samplers [--dataset builtin] [--num_samples 128]
        [--threads 2] [--only heun,dpm_solver] [--rows "PC N=100;Heun 18"]
        [--plans full,subspace] [--no_inception]
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
import sde_lib  # noqa: E402
import subspace_lib as sl  # noqa: E402
from demo_metrics import (  # noqa: E402
    held_out_images,
    inception_reference_info,
    quality_entry,
    training_features,
    training_images,
)
from demo_report import quality_text  # noqa: E402
from demo_settings import (  # noqa: E402
    FULL_SIZE,
    ROOT,
    DemoSettings,
    checkpoint_path,
    demo_config,
    plans,
    read_manifest,
)
from files import atomic_write, atomic_write_text  # noqa: E402
from models import utils as mutils  # noqa: E402
from models.checkpoints import load_model_weights  # noqa: E402
from subspace_sampling import subspace_pc_sample, subspace_solver_sample  # noqa: E402

PLAN_SIZES = (16, 8)
SUBSPACE_PLAN = "subspace 16, 8"  # the name of the plan of PLAN_SIZES in demo_settings.SAMPLERS
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
    shape = (num_samples, config.data.num_channels, FULL_SIZE, FULL_SIZE)
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


def plot(rows: list[dict], floor: dict, path: Path) -> None:
    """FID (Inception where measured, else proxy) with its interval against network evaluations
    and against seconds, over the held-out images' interval (the floor at this count). Points
    carry the number of their sampler; the key under the panels names them (names written
    beside the points overlap where the samplers cluster)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key = "fid" if "fid" in floor else "proxy_fid"
    name = "Inception FID" if key == "fid" else "proxy FID"
    kind = floor.get("fid_interval_kind", "bootstrap") if key == "fid" else "bootstrap"
    number = {sampler: i + 1 for i, sampler in enumerate(dict.fromkeys(r["sampler"] for r in rows))}
    key_rows = -(-len(number) // 3)
    figure = Figure(figsize=(11, 4.2 + 0.13 * key_rows))
    FigureCanvasAgg(figure)
    for axis, x_key, label in ((figure.add_subplot(1, 2, 1), "nfe_total", "network evaluations"),
                               (figure.add_subplot(1, 2, 2), "seconds", "wall-clock seconds")):
        axis.axhspan(*floor[f"{key}_interval"], color="0.9", label="held-out data (95 %)")
        for plan, marker in (("full only", "o"), (SUBSPACE_PLAN, "s")):
            for row in rows:
                if row["plan"] != plan:
                    continue
                fid, (low, high) = row[key], row[f"{key}_interval"]
                axis.errorbar(row[x_key], fid, yerr=[[max(fid - low, 0.0)],
                                                     [max(high - fid, 0.0)]],
                              marker=marker, color="C0" if plan == "full only" else "C1",
                              capsize=2, linestyle="none")
                axis.annotate(str(number[row["sampler"]]), (row[x_key], fid), fontsize=7,
                              xytext=(3, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(f"{name} (95 % {kind} interval)")
        axis.plot([], [], "o", color="C0", label="full only")
        axis.plot([], [], "s", color="C1", label=SUBSPACE_PLAN)
        axis.legend(fontsize=7)
    names = [f"{i}  {sampler}" for sampler, i in number.items()]
    key_height = (0.13 * key_rows + 0.2) / figure.get_figheight()
    for column in range(3):
        figure.text(0.06 + 0.31 * column, key_height - 0.02,
                    "\n".join(names[column * key_rows:(column + 1) * key_rows]),
                    fontsize=7, va="top", family="monospace")
    figure.tight_layout(rect=(0, key_height, 1, 1))
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table with the run's settings."""
    floor = meta["data_quality"]
    with_inception = "fid" in floor
    inception = meta["inception"]
    quality_header = ("Inception FID [95 % interval] | KID x 1e3 | " if with_inception else "") \
        + "proxy FID [95 % interval] | proxy KID x 1e3"
    note = (f"Inception FID ({floor.get('fid_interval_kind', 'bootstrap')} interval) and KID "
            f"against the first {inception['reference_images']} training images "
            f"({inception['statistics']})" if with_inception
            else f"no Inception FID ({inception['skipped'].rstrip('.')})")
    used, total = meta["kid_reference_images"], meta["training_images"]
    reference = (f"all {total} training images" if used >= total else
                 f"the first {used} of the {total} training images")
    lines = [f"Samplers on the {meta['dataset']} demo checkpoints ({meta['checkpoints']}): "
             f"{meta['num_samples']} samples each, seed {meta['seed']}, {meta['threads']} "
             f"threads, {meta['machine']}; load average before / after: {meta['load_before']} "
             f"/ {meta['load_after']}. Proxy KID against {reference}; "
             f"{note}; bootstrap {meta['bootstrap_resamples']} resamples, seed "
             f"{meta['bootstrap_seed']}.", "",
             f"| sampler | plan | network evals 32 / 16 / 8 | time (s) | load | {quality_header} "
             "|",
             "|" + "---|" * (7 + 2 * with_inception),
             f"| held-out data ({floor['num_samples']} images) | - | - | - | - | "
             f"{quality_text(floor, with_inception)} |"]
    for row in rows:
        nfe = " / ".join(str(row["nfe"].get(str(s), 0)) for s in (FULL_SIZE,) + PLAN_SIZES)
        lines.append(f"| {row['sampler']} | {row['plan']} | {nfe} | {row['seconds']:.1f} | "
                     f"{row['load'].split()[0]} | {quality_text(row, with_inception)} |")
    return "\n".join(lines) + "\n"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, as the rows record them."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Folder for the table, JSON and plot.")
    parser.add_argument("--dataset", default="builtin", help="Demo dataset whose committed "
                        "checkpoints are sampled: builtin or mnist (demo_settings.DEMO_DATASETS).")
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the prior noise.")
    parser.add_argument("--threads", type=int, default=1,
                        help="Intra-op threads (on a busy machine, 2 wait on each other).")
    parser.add_argument("--only", default="", help="Comma list of methods to run (pc, ode, "
                        "heun, dpm_solver, sde_dpm_solver, ddim); default: all.")
    parser.add_argument("--rows", default="", help="Semicolon-separated row names (see "
                        "SAMPLERS) to run; default: all rows of the --only methods.")
    parser.add_argument("--plans", default="full,subspace", help="full and/or subspace.")
    inception = parser.add_mutually_exclusive_group()
    inception.add_argument("--inception", dest="inception", action="store_true",
                           help="Inception FID and KID too (an error where the dataset has no "
                           "torch Inception statistics); default: where it has them.")
    inception.add_argument("--no_inception", dest="inception", action="store_false",
                           help="Proxy FID and KID only.")
    parser.set_defaults(inception=None)
    args = parser.parse_args()
    if args.num_samples < 2:
        raise SystemExit("error: --num_samples must be at least 2 (the proxy FID needs a "
                         "covariance).")
    if args.threads < 1:
        raise SystemExit(f"error: --threads must be at least 1; got {args.threads}.")
    chosen_rows = {r.strip() for r in args.rows.split(";") if r.strip()}
    unknown = chosen_rows - set(SAMPLERS)
    if unknown:
        raise SystemExit(f"error: unknown --rows {sorted(unknown)}; choose from {list(SAMPLERS)}.")
    chosen_plans = {p.strip() for p in args.plans.split(",") if p.strip()}
    if not chosen_plans or chosen_plans - {"full", "subspace"}:
        raise SystemExit(f"error: --plans takes full and/or subspace; got '{args.plans}'.")
    only = {m.strip() for m in args.only.split(",") if m.strip()}
    # (row name, plan name): the split of steps over stages changes nothing without stages.
    runs = [(name, plan_name) for name, (method, options) in SAMPLERS.items()
            if not (only and method not in only) and not (chosen_rows and name not in chosen_rows)
            for plan_name, key in (("full only", "full"), (SUBSPACE_PLAN, "subspace"))
            if key in chosen_plans and not (key == "full" and "split" in options)]
    if not runs:
        raise SystemExit(f"error: no row of --only '{args.only}', --rows '{args.rows}' and "
                         f"--plans '{args.plans}' is left to run.")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = DemoSettings.for_mode("quick", args.dataset)
    data = settings.data
    manifest = read_manifest(data.name)
    cutoff_of = {s: float(manifest["cutoffs"]["values"][str(s)]) for s in PLAN_SIZES}
    plan = None
    if "subspace" in chosen_plans:
        _, skipped = plans(cutoff_of)
        if SUBSPACE_PLAN in skipped:
            raise SystemExit(f"error: the {data.name} checkpoints' manifest has no {SUBSPACE_PLAN}"
                             f" plan ({skipped[SUBSPACE_PLAN]}); run with --plans full.")
        plan = sl.SubspacePlan.from_statistics(FULL_SIZE, PLAN_SIZES,
                                               tuple(cutoff_of[s] for s in PLAN_SIZES),
                                               data.stats_name)
    networks = {}
    for size in (FULL_SIZE,) + PLAN_SIZES:
        config = demo_config(size, settings, device=torch.device("cpu"))
        networks[size] = load_model_weights(mutils.create_model(config),
                                            checkpoint_path(size, data.name))
    config = demo_config(FULL_SIZE, settings, device=torch.device("cpu"))
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    inception, inception_info = inception_reference_info(config, args.inception)
    stats = evaluation.load_dataset_stats(config, "proxy")
    train_uint8 = training_images(config)
    reference = training_features(config, train_uint8[: settings.kid_reference_images])
    data_quality = quality_entry(evaluation.to_uint8_nhwc(
        held_out_images(config, args.num_samples)), stats, reference, settings,
        inception)
    meta = {"dataset": data.name, "checkpoints": str(data.checkpoints.relative_to(ROOT)),
            "num_samples": args.num_samples, "seed": args.seed, "threads": args.threads,
            "machine": f"{mutils.machine_kind()}, {os.cpu_count()} cores, "
                       f"torch {torch.__version__}",
            "load_before": load_average(),
            "plan": plan.describe() if plan is not None else None,
            "bootstrap_resamples": settings.bootstrap_resamples,
            "bootstrap_seed": settings.seed, "training_images": int(len(train_uint8)),
            "kid_reference_images": int(len(reference)), "inception": inception_info,
            "data_quality": data_quality}
    columns = ("Inception FID [95 %] | KID x 1e3 | " if inception is not None else "") + \
        "proxy FID [95 %] | proxy KID x 1e3"
    print(f"{data.name} checkpoints, {len(runs)} rows; columns {columns}"
          + ("" if inception is not None else f" (no Inception: {inception_info['skipped']})")
          + f"\nheld-out data {quality_text(data_quality, inception is not None)}", flush=True)
    rows = []
    for name, plan_name in runs:
        method, options = SAMPLERS[name]
        x, info = run_sampler(method, options, networks,
                              None if plan_name == "full only" else plan, args.num_samples,
                              args.seed, settings)
        uint8 = evaluation.to_uint8_nhwc(inverse_scaler(x).clamp(0, 1))
        quality = quality_entry(uint8, stats, reference, settings, inception)
        row = {"sampler": name, "plan": plan_name, **info, "load": load_average(),
               "nfe_total": sum(info["nfe"].values()), **quality}
        rows.append(row)
        print(f"{name:22s} {plan_name:15s} nfe {info['nfe']} {info['seconds']:.1f} s "
              f"{quality_text(row, inception is not None)} load {row['load']}", flush=True)
    meta["load_after"] = load_average()
    atomic_write_text(out / "bench_samplers.md", markdown(rows, meta))
    atomic_write_text(out / "bench_samplers.json",
                      json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    plot(rows, data_quality, out / "bench_samplers.png")
    print(f"Wrote {out / 'bench_samplers.md'}, .json and .png.")


if __name__ == "__main__":
    cli.run_entry_point(main)
