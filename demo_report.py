"""The demo's report and figures: the results table as markdown (`results_markdown`), the
sample grids side by side, the closest samples beside their nearest training images, and the
quality-against-cost figure.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from demo_metrics import MEMORISATION_QUANTILES, claim_checks
from demo_settings import FULL_SIZE, SUBSPACE_SIZES, demo_dataset
from files import make_image_grid


def results_markdown(results: dict) -> str:
    """The results table (and the settings and machine it was measured with) as markdown."""
    s, m = results["settings"], results["machine"]
    cut = results["cutoffs"]
    batches = -(-s["num_samples"] // s["sample_batch"])
    data = demo_dataset(s.get("dataset", "builtin"))
    with_inception = "fid" in results["samplers"].get("full only", {})
    quality_header = ("Inception FID [95 % interval] | KID x 1e3 | " if with_inception else "") \
        + "proxy FID [95 % interval] | proxy KID x 1e3"
    columns = 11 + 2 * with_inception
    lines = [
        f"# Subspace diffusion demo ({results['mode']} mode)", "",
        f"{data.description[0].upper()}{data.description[1:]}, `{s['config']}` "
        f"(sub-VP SDE, small DDPM++ with the Gaussian DC model), Euler-Maruyama with the same "
        f"N = {s['num_steps']} steps for every sampler, {s['num_samples']} samples each "
        f"({batches} batches of {s['sample_batch']}, seeds {s['seed']}..{s['seed'] + batches - 1}"
        f"); after each upsampling {s['langevin_steps']} conditional Langevin steps (snr "
        f"{s['langevin_snr']}). Cutoffs: "
        + ", ".join(f"{k}x{k} at t = {v:.3f}" for k, v in cut["values"].items())
        + f" ({cut['rule']}).", "",
        "| sampler | network evals 32 / 16 / 8 | time (s) | speed-up achieved | ideal, own-call "
        f"costs | ideal, mean costs | ideal, pixel costs | {quality_header} | bits/dim | "
        "bits/dim - full |",
        "|" + "---|" * columns]
    bpd = results.get("bpd", {})
    floor = results.get("data_quality")
    if floor is not None:
        lines.append(f"| held-out data ({floor['num_samples']} images) | - | - | - | - | - | - | "
                     f"{quality_text(floor, with_inception)} | - | - |")
    for name, r in results["samplers"].items():
        nfe = r["nfe"]
        evals = " / ".join(str(nfe.get(k, 0)) for k in (str(FULL_SIZE),) + tuple(
            str(x) for x in SUBSPACE_SIZES))
        sp = r.get("speedup", {"achieved": 1.0, "ideal_own_cost": 1.0,
                               "ideal_measured_cost": 1.0, "ideal_pixel_cost": 1.0})
        own = f"{sp['ideal_own_cost']:.2f}x" if "ideal_own_cost" in sp else "-"
        b = bpd.get(name)
        bpd_text = "-" if b is None else f"{b['bpd']:.3f} ± {b['std_error']:.3f}"
        diff = "-" if b is None or "difference_to_full" not in b else \
            f"{b['difference_to_full']:+.4f} ± {b['difference_std_error']:.4f}"
        lines.append(f"| {name} | {evals} | {_fmt(r['seconds'], 1)} | {sp['achieved']:.2f}x | "
                     f"{own} | {sp['ideal_measured_cost']:.2f}x | {sp['ideal_pixel_cost']:.2f}x | "
                     f"{quality_text(r, with_inception)} | {bpd_text} | {diff} |")
    for name, why in results.get("skipped_samplers", {}).items():
        lines.append(f"| {name} | skipped: {why} |" + " |" * (columns - 2))
    costs = results["network_cost"]
    lines += [
        "",
        "- Network evals: batched calls of each network, the 2 Langevin steps after an "
        "upsampling included (they use the next-larger network). Time: wall clock of the "
        "sampler. Ideal speed-ups: full-only cost over this sampler's cost, counting only "
        "network calls, at per-call costs timed inside the samplers' calls in this run (batch "
        f"{costs[str(FULL_SIZE)]['batch']}): each sampler's at the costs of its own calls "
        "(own-call; a drift of the machine's speed between the samplers' turns moves these "
        "costs as it moves the times, so achieved / ideal measures what the sampler spends "
        "outside network calls: the claim below), or all at the mean over all samplers and N ("
        + ", ".join(f"{k}x{k} {1e3 * v['seconds']:.1f} ms" for k, v in costs.items())
        + "), or at costs proportional to the pixel count.",
        f"- Proxy FID: Frechet distance of {s['num_samples']} samples in a fixed random-conv "
        "feature space to the training-set statistics "
        f"({results.get('proxy_stats', 'assets/stats/builtin_proxy_stats.npz')}), "
        f"with a basic bootstrap 95 % interval ({s['bootstrap_resamples']} resamples of "
        "the samples); a proxy, NOT the paper's Inception FID, comparable only within this "
        "table. Proxy KID: the unbiased kernel distance (TF-GAN's cubic kernel) in the same "
        f"features against {_kid_reference_text(results, s)}, ± its standard error over "
        "blocks of 256; "
        "unlike FID it is unbiased at small sample counts and assumes no Gaussian features. "
        f"The first {s['num_samples']} held-out test images give the floor at this sample "
        "count."]
    lines.append(_inception_note(results, s))
    if bpd:
        first = next(iter(bpd.values()))
        lines.append(
            f"- Bits/dim: the first {first['images']} images of the test split (seeded order), "
            "uniform "
            f"dequantization, probability-flow ODE with RK45 at rtol = atol = {s['bpd_tol']:g}"
            ", the same Hutchinson noise for every row; subspace rows use the implicit "
            "full-space score (subspace network above the cutoff, Gaussian orthogonal part). "
            "± is the standard error over images; the last column is the paired difference.")
    else:
        lines.append("- Bits/dim: not computed in this mode (`python demo.py --mode full`).")
    curve = results.get("quality_cost") or {}
    if any(len(points) > 1 for points in curve.values()):
        lines += ["", f"Quality against cost ({s['num_samples']} samples per point; the figure "
                  "is quality_cost.png):", "",
                  "| sampler | N | network evals 32 / 16 / 8 | full-equivalent evals | "
                  "time (s) | proxy FID [95 % interval] | proxy KID x 1e3 |",
                  "|" + "---|" * 7]
        for name, points in curve.items():
            for n in sorted(points, key=int):
                p = points[n]
                evals = " / ".join(str(p["nfe"].get(k, 0)) for k in (str(FULL_SIZE),) + tuple(
                    str(x) for x in SUBSPACE_SIZES))
                lines.append(f"| {name} | {n} | {evals} | "
                             f"{_fmt(p.get('full_equivalent_evals'), 1)} | "
                             f"{_fmt(p['seconds'], 1)} | {quality_text(p)} |")
    lines += _memorisation_lines(results)
    checks = claim_checks(results)
    if checks:
        lines += ["", "Claims of the demo, as measured in this run:", ""]
        lines += [f"- {'holds' if c['holds'] else 'FAILS'}: {c['claim']} ({c['value']})"
                  for c in checks]
    lines += ["", "| model | weights | steps | time (s) | s / step | CPU s / step |",
              "|---|---|---|---|---|---|"]
    for size, t in results["training"].items():
        lines.append(f"| {size}x{size} | {t['source']} | {t.get('steps', '-')} | "
                     f"{_fmt(t.get('seconds'), 0)} | {_fmt(t.get('seconds_per_step'), 3)} | "
                     f"{_fmt(t.get('cpu_seconds_per_step'), 3)} |")
    rmsd = results["rmsd"]
    lines += ["", "RMSD of the training images to the downsampling subspaces (per orthogonal "
              "dimension, pixels in [0,1]): "
              + ", ".join(f"{k}x{k} {v:.5f}" for k, v in rmsd.items()) + "."]
    if "divergence" in results:
        div = results["divergence"]
        lines.append(f"Orthogonal Fisher divergence: {div['images']} training images at "
                     f"{div['times']} times; cutoffs per standard threshold: "
                     + "; ".join(f"{size}x{size} " + ", ".join(
                         f"{float(k):g}: {_fmt(v, 3)}" for k, v in row.items())
                         for size, row in div["table"].items()) + ".")
    lines += ["", f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['torch_threads']} "
              f"torch thread(s), torch {m['torch']}, Python {m['python']}, {m['device']}; load "
              f"average (1, 5, 15 min) at start {m.get('load_average_at_start')}, at end "
              f"{m.get('load_average_at_end')}.",
              f"Total wall clock {results['total_seconds']:.0f} s (process CPU "
              f"{results['total_cpu_seconds']:.0f} s); phases: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in results["phases"].items()) + "."]
    return "\n".join(lines) + "\n"


def quality_text(entry: dict, with_inception: bool = False) -> str:
    """'12.3 [11.0, 14.1] | 1.23 ± 0.45' (proxy FID with interval, proxy KID x 1e3), after the
    same two in Inception features when `with_inception` ('-' where the entry has none)."""
    cells = []
    for prefix in (("", "proxy_") if with_inception else ("proxy_",)):
        fid = entry.get(f"{prefix}fid")
        low, high = entry.get(f"{prefix}fid_interval", (float("nan"), float("nan")))
        kid = entry.get(f"{prefix}kid")
        kid_text = "-" if kid is None else \
            f"{1e3 * kid:.2f} ± {1e3 * entry.get(f'{prefix}kid_std_error', float('nan')):.2f}"
        cells.append("- | -" if fid is None else
                     f"{_fmt(fid, 1)} [{_fmt(low, 1)}, {_fmt(high, 1)}] | {kid_text}")
    return " | ".join(cells)


def _kid_reference_text(results: dict, s: dict) -> str:
    total = results.get("training_images")
    limit = s.get("kid_reference_images")
    if total is None or limit is None or limit >= total:
        return "every training image"
    return f"the first {limit} of the {total} training images"


def _inception_note(results: dict, s: dict) -> str:
    """The table's note on the Inception metrics: what they were computed against, or why
    there are none."""
    info = results.get("inception") or {}
    if "statistics" not in info:
        return ("- Inception FID and KID: none in this run ("
                + info.get("skipped", "no statistics recorded").rstrip(".") + ").")
    full = results["samplers"].get("full only", {})
    kind = full.get("fid_interval_kind", "half-sample")
    interval = ("half-sample 95 % interval (v ± 1.96 sd of the FID of random halves of the "
                "samples: with fewer samples than the 2048 feature dimensions, bootstrap "
                "resamples are biased far above the estimate; on the wide side, docs/mnist.md)"
                if kind == "half-sample" else "basic bootstrap 95 % interval")
    return (f"- Inception FID and KID: torch Inception features ({info['network']}; grey "
            "repeated to 3 channels, bilinear resize to 299) of the samples against those of "
            f"the first {info['reference_images']} training images ({info['statistics']}, "
            "float16, made by `compute_dataset_stats.py --inception torch`), FID with a "
            f"{interval} over {s['bootstrap_resamples']} resamples, KID ± its standard error. "
            "Computed for the table's rows and the floor; the curve below is proxy-only. At "
            f"{s['num_samples']} samples FID carries a large small-sample bias, the same for "
            "every row and for the floor: compare within this table, not with published "
            "50,000-sample FIDs.")


def _memorisation_lines(results: dict) -> list[str]:
    """The memorisation table: quantiles of each set's distance to its nearest training
    image, against the held-out test images'."""
    rows = [("held-out data", results.get("data_quality", {}).get("memorisation"))]
    rows += [(name, r.get("memorisation")) for name, r in results["samplers"].items()]
    rows = [(name, entry) for name, entry in rows if entry]
    if not rows:
        return []
    quantiles = [f"{q:g}" for q in MEMORISATION_QUANTILES]
    header = " | ".join("min" if q == "0" else ("median" if q == "0.5" else f"{100 * float(q):g} %")
                        for q in quantiles)
    lines = ["", f"Memorisation check: distance of each image to its nearest of the "
             f"{results.get('training_images', 'all')} training images (Euclidean, pixels in "
             "[0, 1]; nearest.png shows the closest ones beside their neighbours). A model that "
             "copied its training images would have many samples closer than the held-out test "
             "images are.", "",
             f"| images | {header} | share closer than the test images' 1 % quantile |",
             "|" + "---|" * (len(quantiles) + 2)]
    for name, entry in rows:
        lines.append(f"| {name} ({entry['images']}) | "
                     + " | ".join(f"{entry['quantiles'][q]:.2f}" for q in quantiles)
                     + f" | {100 * entry['share_below_test_q01']:.1f} % |")
    return lines


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def save_sample_figure(panels: Sequence[tuple[str, torch.Tensor]], path: Path) -> Path:
    """The sample grids side by side, one titled panel each (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from analysis.plots import save_figure

    fig = Figure(figsize=(3.2 * len(panels), 3.7))
    FigureCanvasAgg(fig)
    for i, (title, images) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(make_image_grid(images, nrow=None), interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def save_quality_cost_figure(curve: dict[str, dict[str, dict]], floor: dict,
                             path: Path) -> Path:
    """Proxy FID (bootstrap 95 % interval as error bars) against wall-clock seconds and against
    full-model-equivalent network evaluations, one line per sampler, points labelled by N."""
    import matplotlib.ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from analysis.plots import save_figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for name, points in curve.items():
        steps = sorted(points, key=int)
        fid = np.array([points[n]["proxy_fid"] for n in steps])
        low = np.array([points[n]["proxy_fid_interval"][0] for n in steps])
        high = np.array([points[n]["proxy_fid_interval"][1] for n in steps])
        for ax, key in zip(axes, ("seconds", "full_equivalent_evals")):
            xs = np.array([points[n][key] for n in steps])
            ax.errorbar(xs, fid, yerr=[fid - low, high - fid], marker="o", capsize=3,
                        label=name)
            for x, y, n in zip(xs, fid, steps):
                ax.annotate(f"N={n}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    for ax, xlabel in zip(axes, ("wall-clock seconds per sample set",
                                 "full-model-equivalent network evaluations per batch")):
        ax.axhspan(*floor["proxy_fid_interval"], color="0.85", label="held-out data (95 %)")
        # Log axes: the few-step points sit 10-30x above the converged ones. Plain numbers
        # on them (matplotlib's minor labels 2x10^1, 3x10^1 collide).
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
                lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("proxy FID (lower is better)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Quality against cost, {floor['num_samples']} samples per point "
                 "(error bars: bootstrap 95 % interval)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def panel_title(name: str, info: dict) -> str:
    """The title of a panel in samples.png: a sampler's network evaluations and seconds (none
    for data), and its FID (Inception where measured, else proxy)."""
    quality = (f"FID {info['fid']:.1f}" if "fid" in info else
               f"proxy FID {info['proxy_fid']:.1f}")
    if "nfe" not in info:
        return f"{name}\n{quality}"
    nfe = info["nfe"]
    return (f"{name}: {nfe.get(str(FULL_SIZE), 0)} full"
            + "".join(f" + {nfe[k]} {k}x{k}" for k in ("16", "8") if k in nfe)
            + f" evals\n{info['seconds']:.1f} s, {quality}")


def save_nearest_figure(panels: Sequence[tuple], path: Path) -> Path:
    """One panel per image set (title, images, their nearest training images, distances; uint8
    NHWC): the set's closest images in the top row, each one's nearest training image below it
    (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from analysis.plots import save_figure

    fig = Figure(figsize=(3.2 * len(panels), 1.9))
    FigureCanvasAgg(fig)
    for i, (title, images, neighbours, distances) in enumerate(panels):
        pairs = torch.from_numpy(np.concatenate([images, neighbours])).permute(0, 3, 1, 2)
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(make_image_grid(pairs.float() / 255.0, nrow=len(images)),
                  interpolation="nearest")
        ax.set_title(f"{title}\ndistance {distances.min():.2f}-{distances.max():.2f}",
                     fontsize=8)
        ax.axis("off")
    fig.suptitle("The closest images of each set (top) and their nearest training images "
                 "(bottom)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
