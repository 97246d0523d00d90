"""The demo's report and figures: the results table as markdown (`results_markdown`), the
sample grids side by side, and the quality-against-cost figure.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from demo_metrics import claim_checks
from demo_settings import FULL_SIZE, SUBSPACE_SIZES
from files import make_image_grid


def results_markdown(results: dict) -> str:
    """The results table (and the settings and machine it was measured with) as markdown."""
    s, m = results["settings"], results["machine"]
    cut = results["cutoffs"]
    batches = -(-s["num_samples"] // s["sample_batch"])
    lines = [
        f"# Subspace diffusion demo ({results['mode']} mode)", "",
        f"Built-in dataset (32x32 crops of the scikit-image photographs), `{s['config']}` "
        f"(sub-VP SDE, small DDPM++ with the Gaussian DC model), Euler-Maruyama with the same "
        f"N = {s['num_steps']} steps for every sampler, {s['num_samples']} samples each "
        f"({batches} batches of {s['sample_batch']}, seeds {s['seed']}..{s['seed'] + batches - 1}"
        f"); after each upsampling {s['langevin_steps']} conditional Langevin steps (snr "
        f"{s['langevin_snr']}). Cutoffs: "
        + ", ".join(f"{k}x{k} at t = {v:.3f}" for k, v in cut["values"].items())
        + f" ({cut['rule']}).", "",
        "| sampler | network evals 32 / 16 / 8 | time (s) | speed-up achieved | ideal, own-call "
        "costs | ideal, mean costs | ideal, pixel costs | proxy FID [95 % interval] | proxy KID "
        "x 1e3 | bits/dim | bits/dim - full |",
        "|" + "---|" * 11]
    bpd = results.get("bpd", {})
    floor = results.get("data_quality")
    if floor is not None:
        lines.append(f"| held-out data ({floor['num_samples']} images) | - | - | - | - | - | - | "
                     f"{_quality_text(floor)} | - | - |")
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
                     f"{_quality_text(r)} | {bpd_text} | {diff} |")
    for name, why in results.get("skipped_samplers", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | | | | | |")
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
        "feature space to the training-set statistics (assets/stats/builtin_proxy_stats.npz), "
        f"with a basic bootstrap 95 % interval ({s['bootstrap_resamples']} resamples of "
        "the samples); a proxy, NOT the paper's Inception FID, comparable only within this "
        "table. Proxy KID: the unbiased kernel distance (TF-GAN's cubic kernel) in the same "
        "features against every training image, ± its standard error over blocks of 256; "
        "unlike FID it is unbiased at small sample counts and assumes no Gaussian features. "
        f"The first {s['num_samples']} held-out test images give the floor at this sample "
        "count."]
    if bpd:
        first = next(iter(bpd.values()))
        lines.append(
            f"- Bits/dim: the first {first['images']} images of the test split (seeded order; "
            "crops from the held-out right-hand band of each photograph), uniform "
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
                             f"{_fmt(p['seconds'], 1)} | {_quality_text(p)} |")
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


def _quality_text(entry: dict) -> str:
    """'12.3 [11.0, 14.1] | 1.23 ± 0.45' (proxy FID with interval, proxy KID x 1e3)."""
    low, high = entry.get("proxy_fid_interval", (float("nan"), float("nan")))
    kid = entry.get("proxy_kid")
    kid_text = "-" if kid is None else \
        f"{1e3 * kid:.2f} ± {1e3 * entry.get('proxy_kid_std_error', float('nan')):.2f}"
    return f"{_fmt(entry['proxy_fid'], 1)} [{_fmt(low, 1)}, {_fmt(high, 1)}] | {kid_text}"


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
    """The title of a sampler's panel in samples.png: its network evaluations, seconds and
    proxy FID."""
    nfe = info["nfe"]
    return (f"{name}: {nfe.get(str(FULL_SIZE), 0)} full"
            + "".join(f" + {nfe[k]} {k}x{k}" for k in ("16", "8") if k in nfe)
            + f" evals\n{info['seconds']:.1f} s, proxy FID {info['proxy_fid']:.1f}")
