"""Cutoff times from the orthogonal Fisher divergence D_F(t) of a full model (docs/maths.md 6).

The rule of the reference notebooks: average the per-sample `err_norm` (D_F) at each time, take
its logarithm, interpolate it piecewise-linearly onto a grid of 1001 equally spaced times in
[0, 1], exponentiate, and return the first grid time where the value is below the threshold.
NaN samples (sub-VP at t = 0, where sigma = 0) are skipped within a time; a time whose samples are
all NaN keeps a NaN mean, and grid times interpolated from it never count as below a threshold.

Command line:
    python -m analysis.cutoffs D.json [D2.json ...] [--thresholds 1e-4,3e-4,...] [--out t.json]
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

DEFAULT_THRESHOLDS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
GRID_POINTS = 1001
COLUMNS = ("t", "err_norm", "gauss_norm", "score_norm")


def mean_by_time(t: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct times and the mean of `values` at each; NaN values are skipped (a time
    whose values are all NaN gets NaN)."""
    t = np.asarray(t, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if t.shape != values.shape or t.ndim != 1:
        raise ValueError(
            f"Times and values must be 1-D and of equal length; got shapes {t.shape} and "
            f"{values.shape}.")
    if t.size == 0:
        raise ValueError("No samples were given: the divergence entry is empty.")
    times, inverse = np.unique(t, return_inverse=True)
    valid = ~np.isnan(values)
    sums = np.bincount(inverse[valid], weights=values[valid], minlength=times.size)
    counts = np.bincount(inverse[valid], minlength=times.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return times, means


def interpolated_divergence(times: np.ndarray, mean_divergence: np.ndarray,
                            grid_points: int = GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """D_F on `grid_points` equally spaced times of [0, 1], log-linearly interpolated."""
    grid = np.linspace(0, 1, grid_points)
    with np.errstate(invalid="ignore", divide="ignore"):
        log_values = np.log(mean_divergence)
    return grid, np.exp(np.interp(grid, times, log_values))


def cutoff_time(t: Sequence[float], err_norm: Sequence[float], threshold: float,
                grid_points: int = GRID_POINTS) -> float | None:
    """First grid time where the interpolated mean D_F is below `threshold` (None if never)."""
    if not threshold > 0:
        raise ValueError(f"Divergence thresholds must be positive; got {threshold}.")
    times, means = mean_by_time(t, err_norm)
    grid, values = interpolated_divergence(times, means, grid_points)
    below = np.flatnonzero(values < threshold)
    return float(grid[below[0]]) if below.size else None


def _sort_key(size: str):
    return (0, -int(size)) if size.isdigit() else (1, size)


def cutoff_table(data: Mapping[str, Mapping[str, Sequence[float]]],
                 thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
                 grid_points: int = GRID_POINTS) -> dict[str, dict[str, float | None]]:
    """Cutoff per subspace size and threshold: {size: {repr(threshold): t_cutoff or None}}."""
    thresholds = list(thresholds)
    table = {}
    for size in sorted(data, key=lambda s: _sort_key(str(s))):
        entry = data[size]
        missing = [c for c in ("t", "err_norm") if c not in entry]
        if missing:
            raise ValueError(
                f"Divergence entry '{size}' lacks column(s) {', '.join(missing)}: expected the "
                "layout {size: {t, err_norm, gauss_norm, score_norm}} of `python -m "
                "analysis.divergence`.")
        table[str(size)] = {repr(float(thr)): cutoff_time(entry["t"], entry["err_norm"], thr,
                                                          grid_points)
                            for thr in thresholds}
    return table


def load_divergence(path: str | os.PathLike) -> dict:
    """Read a divergence JSON ({size: {t, err_norm, gauss_norm, score_norm}}, NaN allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Divergence file {path} does not exist: compute it with `python -m "
            "analysis.divergence`.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"Divergence file {path} is not valid JSON ({error}).") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(
            f"Divergence file {path} is not of the form {{size: {{t, err_norm, ...}}}}.")
    return data


def format_cutoff_tables(tables: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> str:
    """Plain-text table: one row per (file, subspace size), one column per threshold."""
    thresholds = []
    for by_size in tables.values():
        for row in by_size.values():
            thresholds.extend(k for k in row if k not in thresholds)
    name_width = max([len("model")] + [len(n) for n in tables])
    header = f"{'model':<{name_width}}  {'size':>5}  " + "  ".join(
        f"{float(k):>8g}" for k in thresholds)
    lines = [header, "-" * len(header)]
    for name, by_size in tables.items():
        for size, row in by_size.items():
            cells = []
            for k in thresholds:
                value = row.get(k)
                cells.append(f"{'-':>8}" if value is None else f"{value:>8.3f}")
            lines.append(f"{name:<{name_width}}  {size:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def parse_thresholds(text: str) -> list[float]:
    """Comma-separated positive thresholds, e.g. '1e-4,3e-3'."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"Thresholds '{text}' are not comma-separated numbers, e.g. 1e-4,3e-3.") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"Thresholds '{text}' must be positive finite numbers, e.g. 1e-4,3e-3.")
    return values


def write_cutoff_tables(files: Sequence[str | os.PathLike], thresholds: Sequence[float],
                        grid_points: int = GRID_POINTS,
                        out: str | os.PathLike | None = None) -> Path:
    """Print the cutoff table of each divergence JSON and save {thresholds, grid_points,
    cutoffs: {file name: {size: {threshold: cutoff}}}} atomically to `out` (default:
    cutoffs.json beside the first file); returns the path written."""
    from files import atomic_write_text

    if grid_points < 2:
        raise ValueError(f"grid_points must be at least 2; got {grid_points}.")
    if not files:
        raise ValueError("Give one or more divergence JSONs of `python -m analysis.divergence`.")
    tables = {Path(file).name: cutoff_table(load_divergence(file), thresholds, grid_points)
              for file in files}
    print(format_cutoff_tables(tables))
    out = Path(out) if out else Path(files[0]).parent / "cutoffs.json"
    atomic_write_text(out, json.dumps({"thresholds": list(thresholds), "grid_points": grid_points,
                                       "cutoffs": tables}, indent=2) + "\n")
    print(f"saved {out}")
    return out


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("thresholds", ",".join(repr(t) for t in DEFAULT_THRESHOLDS),
                        "Comma-separated D_F thresholds.")
    flags.DEFINE_integer("grid_points", GRID_POINTS, "Number of grid times in [0, 1].")
    flags.DEFINE_string("out", None, "JSON to write {file: {size: {threshold: cutoff}}} to "
                        "(default: cutoffs.json beside the first file).")


def _cli(argv: Sequence[str]) -> None:
    """python -m analysis.cutoffs DIV.json [MORE.json ...] [--thresholds ...] [--out ...]"""
    from absl import flags

    import cli
    from analysis.cli import UsageError

    FLAGS = flags.FLAGS
    files = list(argv[1:])
    if not files:
        raise UsageError("Give one or more divergence JSONs of `python -m analysis.divergence` "
                         "as arguments.")
    cli.check_range(FLAGS.grid_points, "--grid_points", low=2)
    try:
        thresholds = parse_thresholds(FLAGS.thresholds)
    except ValueError as error:
        raise UsageError(f"--thresholds: {error}") from None
    if FLAGS.out:
        cli.check_writable(FLAGS.out, "--out", is_dir=False)
    write_cutoff_tables(files, thresholds, FLAGS.grid_points, FLAGS.out)


if __name__ == "__main__":
    import cli
    from analysis.cli import run

    _define_flags()
    cli.start(lambda argv: run(_cli, argv))
