"""End to end: wall-clock seconds per sample, at the quality of the original code's default
sampler, on the demo's committed checkpoints.

Rows, drawn batch by batch in turn (interleaved, so a change of machine load hits every row):
- the original score-SDE code's PC sampler (Euler-Maruyama predictor, no corrector, N = 1000:
  its default for continuous sub-VP DDPM++) imported from `--original PATH` and run on the
  demo's 32 px weights (timing only: its quality is that of this project's PC at N = 1000,
  the same computation by the reference cases; `--original_batches K` times it on the first K
  batches only, its seconds per sample taken over those). The demo network adds a Gaussian DC
  head the original lacks (`config.model.gaussian_dc`), so the original is timed on its
  closest architecture: the same NCSN++ options without that head (weights loaded where names
  match);
- this project's PC at N = 1000, full only;
- the best few-step solver full only, and the best few-step solver with the subspace plan 16, 8
  (rows of bench/bench_samplers.py, `--fast_full` / `--fast_subspace`).
Every network of this project is built with `sampling.precision` and `model.memory_format`
"auto" (what they pick here is printed). Quality: proxy FID with its bootstrap 95 % interval
(`evaluation.proxy_quality`) against the training set, and with `--inception` the FID in the
torch Inception port's features against `--inception_reference` training images, when this
checkout's evaluation.py has it. Prints a Markdown table (and writes it with a JSON file to
`--out`): seconds per sample and per 1000 samples, evaluations per size, quality, the speed-up
over the original per sample and whether the row is at the original's quality (its proxy FID at
most the upper end of PC N = 1000's interval), and the same ratio worked out for a GPU on paper.

    python bench/bench_end_to_end.py --original /path/to/score_sde_pytorch [--num_samples 64]
        [--batch 32] [--original_batches K] [--threads 2] [--inception] [--out runs/end_to_end]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_networks import Original, _original_on_path  # noqa: E402
from bench_samplers import PLAN_SIZES, SAMPLERS, run_sampler  # noqa: E402

import datasets  # noqa: E402
import evaluation  # noqa: E402
import subspace_lib as sl  # noqa: E402
from demo_metrics import first_images, held_out_images, training_features  # noqa: E402
from demo_settings import (  # noqa: E402
    FULL_SIZE,
    DemoSettings,
    checkpoint_path,
    demo_config,
    read_manifest,
)
from files import atomic_write_text  # noqa: E402
from models import utils as mutils  # noqa: E402
from models.checkpoints import load_model_weights  # noqa: E402


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def auto_options(network: torch.nn.Module) -> str:
    """The precision and memory format "auto" gave `network`."""
    layout = mutils.model_memory_format(network)
    return (f"{mutils.network_precision(network, 'auto')} "
            f"{'channels-last' if layout is torch.channels_last else 'contiguous'}")


def load_networks(settings: DemoSettings) -> dict[int, torch.nn.Module]:
    """The demo's committed EMA networks at 32, 16 and 8 px, built with "auto" precision and
    memory format (measured once per machine; here what `create_model` picks)."""
    networks = {}
    for size in (FULL_SIZE,) + PLAN_SIZES:
        config = demo_config(size, settings, device=torch.device("cpu"))
        config.sampling.precision = "auto"
        config.model.memory_format = "auto"
        networks[size] = load_model_weights(mutils.create_model(config),
                                            checkpoint_path(size, "builtin")).eval()
    return networks


def original_sampler(path: str, weights: dict, settings: DemoSettings, batch: int,
                     steps: int):
    """The original code's PC sampler (N = `steps`) and its network, closest to the demo's,
    with the demo weights where the names match; returns (sample(seed, count) -> (seconds,
    network calls), note)."""
    Original(path)  # checks that PATH is a checkout of the original (one sentence if not)
    config = demo_config(FULL_SIZE, settings, device=torch.device("cpu"))
    # Its network indexes a table of 1000 noise levels by the label 999 t (unused without
    # scale_by_sigma) whatever N the sampler takes.
    config.model.num_scales = 1000
    with _original_on_path(Path(path).resolve()):
        original_utils = importlib.import_module("models.utils")
        importlib.import_module("models.ncsnpp")
        sampling = importlib.import_module("sampling")
        sde_lib = importlib.import_module("sde_lib")
    model = original_utils.get_model(config.model.name)(config)
    # The noise-level table `sigmas` is sized by N, not learnt: the original keeps its own.
    own = model.state_dict()
    weights = {k: v for k, v in weights.items() if k not in own or own[k].shape == v.shape}
    result = model.load_state_dict(weights, strict=False)
    model.eval()
    # Its sampler reports N (n_steps + 1) evaluations, counting the empty corrector's too.
    calls = [0]
    model.register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    sde = sde_lib.subVPSDE(beta_min=config.model.beta_min, beta_max=config.model.beta_max,
                           N=steps)

    def pc_sampler(count: int):
        return sampling.get_pc_sampler(
            sde, (count, config.data.num_channels, FULL_SIZE, FULL_SIZE),
            sampling.get_predictor(config.sampling.predictor.lower()),
            sampling.get_corrector(config.sampling.corrector.lower()), lambda x: x,
            snr=config.sampling.snr, n_steps=config.sampling.n_steps_each,
            probability_flow=config.sampling.probability_flow, continuous=True,
            denoise=config.sampling.noise_removal, eps=1e-3, device="cpu")

    fn = pc_sampler(batch)

    def sample(seed: int, count: int) -> tuple[float, int]:
        nonlocal fn
        if count != batch:
            fn = pc_sampler(count)
        torch.manual_seed(seed)
        calls[0] = 0
        began = time.perf_counter()
        fn(model)
        return time.perf_counter() - began, calls[0]

    note = (f"original network: {config.model.name} with the demo's options, without the "
            f"Gaussian DC head; {len(result.missing_keys)} of its tensors not in the demo "
            f"weights ({', '.join(result.missing_keys) or 'none'}), "
            f"{len(result.unexpected_keys)} demo tensors unused "
            f"({', '.join(result.unexpected_keys) or 'none'})")
    return sample, note


def inception_scorer(config, count: int):
    """FID in the torch Inception port's features against `count` training images, with the
    bootstrap interval; None when this checkout's evaluation.py has no torch Inception."""
    if not hasattr(evaluation, "torch_inception_features"):
        return None
    model = evaluation.load_torch_inception("cpu")
    reference = evaluation.torch_inception_features(first_images(config, count, "train"), model)
    mu, sigma = evaluation.gaussian_statistics(reference)
    stats = {"mu": mu, "sigma": sigma}

    def score(uint8: np.ndarray, seed: int) -> dict:
        features = evaluation.torch_inception_features(uint8, model)
        return evaluation.frechet_distance_bootstrap(features, stats, seed=seed)

    return score


def batches(total: int, batch: int) -> list[int]:
    """Batch sizes that add up to `total`."""
    return [min(batch, total - start) for start in range(0, total, batch)]


def gpu_ratio(original_calls: float, nfe: dict[str, float]) -> tuple[float, float]:
    """The original's calls over a row's, counting every call as a full one (latency-bound,
    small batches) and weighting each by its pixel count (throughput-bound, large batches)."""
    calls = sum(nfe.values())
    pixels = sum(n * (int(size) / FULL_SIZE) ** 2 for size, n in nfe.items())
    return original_calls / calls, original_calls / pixels


def _fmt_fid(fid: dict | None) -> str:
    if fid is None:
        return "-"
    return f"{fid['value']:.1f} [{fid['low']:.1f}, {fid['high']:.1f}]"


def markdown(rows: list[dict], meta: dict) -> str:
    """The table and its reading."""
    ORIGINAL_ROW, BASELINE_ROW = meta["original_row"], meta["baseline_row"]  # noqa: N806
    base = next(r for r in rows if r["name"] == BASELINE_ROW)
    orig = next((r for r in rows if r["name"] == ORIGINAL_ROW), None)
    yardstick = orig or base
    bound = base["proxy_fid"]["high"]
    inception = any(r.get("inception_fid") for r in rows)
    timed = meta.get("original_samples", meta["num_samples"])
    first = (f"first {meta['original_batches']} batches" if meta.get("original_batches", 1) > 1
             else "first batch")
    lines = [
        f"{meta['num_samples']} samples per row in batches of {meta['batch']}"
        + (f" (the original: {timed}, its {first})"
           if orig and timed != meta["num_samples"] else "") + f", seed "
        f"{meta['seed']}, {meta['threads']} threads, {meta['machine']}; load average before / "
        f"after: {meta['load_before']} / {meta['load_after']}. `auto` picked: {meta['auto']}. "
        f"Held-out images score proxy FID {meta['data_proxy_fid']:.1f} at this count.", "",
        "| sampler | plan | evals 32 / 16 / 8 | s per sample (CPU s) | s per 1000 samples "
        "| proxy FID "
        "[95 %]" + (" | Inception FID [95 %]" if inception else "")
        + f" | speed-up over {'the original' if orig else BASELINE_ROW}, wall (CPU) "
        "| at its quality |",
        "|---|---|---|---|---|---" + ("|---" if inception else "") + "|---|---|"]
    for row in rows:
        nfe = " / ".join(f"{row['nfe'].get(str(s), 0):g}" for s in (32, 16, 8))
        same = f"(= {BASELINE_ROW})"
        quality = same if row["name"] == ORIGINAL_ROW else _fmt_fid(row["proxy_fid"])
        inception_cell = (same if row["name"] == ORIGINAL_ROW
                          else _fmt_fid(row.get("inception_fid")))
        ratio = yardstick["seconds_per_sample"] / row["seconds_per_sample"]
        equal = ("yes" if row["name"] == ORIGINAL_ROW or row["proxy_fid"]["value"] <= bound
                 else "no")
        lines.append(
            f"| {row['name']} | {row['plan']} | {nfe} | {row['seconds_per_sample']:.3f} "
            f"({row['cpu_per_sample']:.3f}) | "
            f"{1000 * row['seconds_per_sample']:.0f} | {quality}"
            + (f" | {inception_cell}" if inception else "")
            + f" | {ratio:.1f}x ({yardstick['cpu_per_sample'] / row['cpu_per_sample']:.1f}x) "
            f"| {equal} |")
    fast = [r for r in rows if r["name"] not in (ORIGINAL_ROW, BASELINE_ROW)
            and r["proxy_fid"]["value"] <= bound]
    lines.append("")
    if fast:
        best = min(fast, key=lambda r: r["seconds_per_sample"])
        ratio = yardstick["seconds_per_sample"] / best["seconds_per_sample"]
        calls, pixels = gpu_ratio(sum(yardstick["nfe"].values()), best["nfe"])
        lines.append(
            f"At the quality of {'the original' if orig else BASELINE_ROW} (proxy FID at most "
            f"{bound:.1f}, the upper end of {BASELINE_ROW}'s interval), the fastest row is "
            f"{best['name']} ({best['plan']}): {ratio:.1f}x fewer seconds per sample "
            f"({'meets' if ratio >= 40 else 'misses'} the 40x target). On a GPU, by the same "
            f"arithmetic (per-call costs scale, the number of calls does not), the ratio lies "
            f"between {calls:.1f}x (every call as costly as a full one: small, latency-bound "
            f"batches) and {pixels:.1f}x (cost proportional to pixels: large batches); CPU "
            f"seconds (the steadier measure on a shared machine) give "
            f"{yardstick['cpu_per_sample'] / best['cpu_per_sample']:.1f}x here.")
    else:
        lines.append(f"No few-step row reached proxy FID {bound:.1f} (the upper end of "
                     f"{BASELINE_ROW}'s interval) in this run.")
    if meta.get("original_note"):
        lines.append("")
        partial = ""
        if timed != meta["num_samples"]:
            partial = (f"timed on its {first} of {meta['num_batches']} ({timed} samples, "
                       f"interleaved with the other rows' first batches), its seconds per "
                       f"sample and speed-ups taken over those; ")
        lines.append(f"Original: {partial}{meta['original_note']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", default=None,
                        help="Checkout of yang-song/score_sde_pytorch, timed side by side "
                             "(without it, speed-ups are over this project's PC N=1000).")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--original_batches", type=int, default=None,
                        help="Time the original (timing only) on the first K batches only "
                             "(default: all); its seconds per sample are over those.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="Intra-op threads (1 on a busy machine: 2 wait on each other).")
    parser.add_argument("--fast_full", default="Heun 25, churn 40",
                        help="bench_samplers row run full only.")
    parser.add_argument("--fast_subspace", default="Heun 25, churn 40, split t",
                        help="bench_samplers row run with the subspace plan 16, 8.")
    parser.add_argument("--pc_steps", type=int, default=1000,
                        help="N of both PC rows (1000: the original's default; fewer only for "
                             "a quick check of the script).")
    parser.add_argument("--inception", action="store_true",
                        help="Also the FID in the torch Inception port's features.")
    parser.add_argument("--inception_reference", type=int, default=1000,
                        help="Training images behind the Inception statistics.")
    parser.add_argument("--out", default=None, help="Folder for end_to_end.md and .json.")
    args = parser.parse_args()
    if args.num_samples < 2 or args.batch < 1 or args.pc_steps < 2:
        raise SystemExit("error: --num_samples must be at least 2 (the FID needs a covariance), "
                         "--batch at least 1 and --pc_steps at least 2.")
    sizes = batches(args.num_samples, args.batch)
    if args.original_batches is not None:
        if not args.original:
            raise SystemExit("error: --original_batches needs --original (the row it limits).")
        if not 1 <= args.original_batches <= len(sizes):
            raise SystemExit(f"error: --original_batches must be between 1 and the number of "
                             f"batches, {len(sizes)} (--num_samples {args.num_samples} in "
                             f"batches of {args.batch}); got {args.original_batches}.")
    original_batches = (len(sizes) if args.original_batches is None
                        else args.original_batches)
    for flag in ("fast_full", "fast_subspace"):
        if getattr(args, flag) not in SAMPLERS:
            raise SystemExit(f"error: --{flag} '{getattr(args, flag)}' is not a row of "
                             f"bench/bench_samplers.py; choose from {list(SAMPLERS)}.")
    torch.set_num_threads(args.threads)
    settings = DemoSettings.for_mode("quick", "builtin")
    networks = load_networks(settings)
    manifest = read_manifest("builtin")
    cutoffs = tuple(float(manifest["cutoffs"]["values"][str(s)]) for s in PLAN_SIZES)
    plan = sl.SubspacePlan.from_statistics(FULL_SIZE, PLAN_SIZES, cutoffs, "builtin")
    config = demo_config(FULL_SIZE, settings, device=torch.device("cpu"))
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    stats = evaluation.load_dataset_stats(config, "proxy")
    reference = training_features(config)
    scorer = None
    if args.inception:
        scorer = inception_scorer(config, args.inception_reference)
        if scorer is None:
            print("note: this checkout's evaluation.py has no torch Inception; proxy FID only.")

    ORIGINAL_ROW = f"original PC N={args.pc_steps} (score_sde_pytorch)"  # noqa: N806
    BASELINE_ROW = f"PC N={args.pc_steps}"  # noqa: N806
    rows = {BASELINE_ROW: ("pc", {"num_scales": args.pc_steps}, None, "full only"),
            args.fast_full: (*SAMPLERS[args.fast_full], None, "full only"),
            args.fast_subspace: (*SAMPLERS[args.fast_subspace], plan, "subspace 16, 8")}
    original = None
    meta = {"num_samples": args.num_samples, "batch": args.batch, "seed": args.seed,
            "threads": args.threads,
            "machine": f"{mutils.machine_kind()}, {os.cpu_count()} cores, "
                       f"torch {torch.__version__}",
            "auto": ", ".join(f"{size} px {auto_options(net)}" for size, net in networks.items()),
            "load_before": _load(), "original_row": ORIGINAL_ROW, "baseline_row": BASELINE_ROW,
            "pc_steps": args.pc_steps, "num_batches": len(sizes)}
    if args.original:
        original, meta["original_note"] = original_sampler(
            args.original, networks[FULL_SIZE].state_dict(), settings, args.batch,
            args.pc_steps)
        meta["original_batches"] = original_batches
        meta["original_samples"] = sum(sizes[:original_batches])
    names = ([ORIGINAL_ROW] if original is not None else []) + list(rows)
    results = {name: {"seconds": 0.0, "cpu": 0.0, "nfe": {}, "x": [], "samples": 0,
                      "batches": 0} for name in names}
    for index, count in enumerate(sizes):
        seed = args.seed + index
        for name in results:
            if name == ORIGINAL_ROW and index >= original_batches:
                continue
            cpu_began = time.process_time()
            if name == ORIGINAL_ROW:
                seconds, nfe = original(seed, count)
                info = {"seconds": seconds, "nfe": {str(FULL_SIZE): nfe}}
            else:
                method, options, chosen, _ = rows[name]
                with mutils.network_options(precision="auto"):
                    x, info = run_sampler(method, options, networks, chosen, count, seed,
                                          settings)
                results[name]["x"].append(
                    evaluation.to_uint8_nhwc(inverse_scaler(x).clamp(0, 1)))
            results[name]["seconds"] += info["seconds"]
            results[name]["cpu"] += time.process_time() - cpu_began
            results[name]["samples"] += count
            results[name]["batches"] += 1
            for size, n in info["nfe"].items():
                results[name]["nfe"][size] = results[name]["nfe"].get(size, 0) + n
            print(f"batch {index + 1}/{len(sizes)} {name}: {info['seconds']:.1f} s, "
                  f"evaluations {info['nfe']}, load {_load()}", flush=True)
    meta["load_after"] = _load()
    meta["data_proxy_fid"] = evaluation.proxy_quality(evaluation.to_uint8_nhwc(
        held_out_images(config, args.num_samples)), stats, seed=args.seed)["fid"]["value"]
    table = []
    for name, result in results.items():
        row = {"name": name, "plan": rows[name][3] if name in rows else "full only",
               "samples": result["samples"], "batches": result["batches"],
               "seconds": result["seconds"],
               "seconds_per_sample": result["seconds"] / result["samples"],
               "cpu_per_sample": result["cpu"] / result["samples"],
               "nfe": {size: n / result["batches"] for size, n in result["nfe"].items()}}
        if result["x"]:
            uint8 = np.concatenate(result["x"])
            quality = evaluation.proxy_quality(uint8, stats, reference, seed=args.seed)
            row["proxy_fid"], row["proxy_kid"] = quality["fid"], quality["kid"]
            if scorer is not None:
                row["inception_fid"] = scorer(uint8, args.seed)
        table.append(row)
    text = markdown(table, meta)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "end_to_end.md", text)
        atomic_write_text(out / "end_to_end.json",
                          json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
        print(f"Wrote {out / 'end_to_end.md'} and .json.")


if __name__ == "__main__":
    main()
