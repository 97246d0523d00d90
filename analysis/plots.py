"""Figures of the subspace analyses (matplotlib's object API with the Agg canvas; atomic saves).

No pyplot state is touched, so importing this module changes no backend; in a notebook the
returned figures display as usual.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.cutoffs import mean_by_time
from files import atomic_write

_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write `fig` to `path` (format from the suffix: .png, .pdf or .svg) atomically."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"Cannot tell the figure format of {path}: use a .png, .pdf or .svg file name.")
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format=fmt, dpi=dpi, bbox_inches="tight")
    return path


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _size_key(size: str):
    return -int(size) if str(size).isdigit() else 0


def plot_divergence(data: Mapping[str, Mapping[str, Sequence[float]]],
                    thresholds: Sequence[float] = (),
                    cutoffs: Mapping[str, Mapping[str, float | None]] | None = None,
                    title: str | None = None, band: tuple[float, float] | None = (10, 90),
                    ax=None) -> Figure:
    """D_F against time on a log scale, one line (mean over samples) per subspace size.

    Horizontal dashed lines mark `thresholds`; `cutoffs` ({size: {repr(threshold): t}}, as from
    `analysis.cutoffs.cutoff_table`) are marked by vertical lines in the size's colour. `band`
    shades the given percentiles of the per-sample values (None to omit).
    """
    fig = ax.figure if ax is not None else _new_figure((5.0, 3.5))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    colours = {}
    for size in sorted(data, key=_size_key):
        entry = data[size]
        times, means = mean_by_time(entry["t"], entry["err_norm"])
        finite = np.isfinite(means) & (means > 0)
        (line,) = ax.plot(times[finite], means[finite], marker="o", markersize=3,
                          label=f"{size}x{size}" if str(size).isdigit() else str(size))
        colours[str(size)] = line.get_color()
        if band is not None:
            t = np.asarray(entry["t"], dtype=np.float64)
            values = np.asarray(entry["err_norm"], dtype=np.float64)
            low, high = [], []
            for time in times[finite]:
                sample = values[(t == time) & np.isfinite(values)]
                low.append(np.percentile(sample, band[0]))
                high.append(np.percentile(sample, band[1]))
            ax.fill_between(times[finite], low, high, color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.set_yscale("log")
    for threshold in thresholds:
        ax.axhline(threshold, ls="--", color="k", lw=0.8)
    if cutoffs:
        bottom, top = ax.get_ylim()
        for size, row in cutoffs.items():
            for key, t_cut in row.items():
                if t_cut is None or (thresholds and float(key) not in
                                     [float(v) for v in thresholds]):
                    continue
                ax.plot([t_cut, t_cut], [bottom, float(key)], ls=":", lw=1.0,
                        color=colours.get(str(size), "k"))
        ax.set_ylim(bottom, top)
    ax.set_xlim(0, 1)
    ax.set_xlabel("time t")
    ax.set_ylabel("$D_F$")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(title="subspace")
    return fig


def plot_rmsd(table: Mapping, title: str | None = None, ax=None) -> Figure:
    """Per-dimension RMSD against subspace size, one line per method, from `rmsd_table`."""
    fig = ax.figure if ax is not None else _new_figure((5.0, 3.5))
    ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
    for method, values in table["rmsd"].items():
        pairs = sorted((int(s), v) for s, v in values.items() if v is not None)
        if pairs:
            sizes, rmsd = zip(*pairs)
            ax.plot(sizes, rmsd, marker="o", label=method)
    if "mean_distance" in table:
        ax.axhline(table["mean_distance"], ls="--", color="k", lw=0.8, label="distance to mean")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("subspace size")
    ax.set_ylabel("RMSD per orthogonal dimension")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.4)
    ax.legend()
    return fig
