"""Cutoff times from divergence JSONs (analysis.cutoffs) and the divergence plot."""
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from script_runner import run_python

from analysis import cutoffs
from analysis.plots import plot_divergence, save_figure


def _expected(reference_dir):
    return json.loads((reference_dir / "divergence" / "expected_cutoffs.json").read_text())


def test_reference_cutoff_tables_match_exactly(reference_dir):
    expected = _expected(reference_dir)
    assert expected["cutoffs"], "the expected table is empty"
    for name, by_dim in expected["cutoffs"].items():
        data = cutoffs.load_divergence(reference_dir / "divergence" / name)
        table = cutoffs.cutoff_table(data, expected["thresholds"])
        # Exact float equality, including artefacts such as 0.41600000000000004.
        assert table == by_dim, name
    # The paper's published cutoff table, rounded to the grid.
    assert expected["cutoffs"]["cifar10_ncsnpp_continuous.json"]["16"]["0.003"] == 0.516
    assert expected["cutoffs"]["cifar10_ddpmpp_continuous.json"]["8"]["0.003"] == 0.446


def test_reference_means_per_time_and_nan_rows(reference_dir):
    expected = _expected(reference_dir)
    name = "cifar10_ddpmpp_continuous.json"
    data = cutoffs.load_divergence(reference_dir / "divergence" / name)
    for dim, extra in expected["extra"][name].items():
        times, means = cutoffs.mean_by_time(data[dim]["t"], data[dim]["err_norm"])
        assert times.tolist() == extra["t_grid"]
        ref = np.array([np.nan if v is None else v for v in extra["mean_err_norm"]])
        assert np.isnan(means[0]) and np.isnan(ref[0])  # sub-VP: sigma(0) = 0
        np.testing.assert_allclose(means[1:], ref[1:], rtol=1e-13, atol=0)


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m analysis.cutoffs ARGS` as a user runs it."""
    return run_python(["-m", "analysis.cutoffs", *args],
                      cwd=Path(__file__).resolve().parents[1], timeout=300)


def test_cli_prints_and_saves_table(reference_dir, tmp_path):
    expected = _expected(reference_dir)
    names = ["cifar10_ncsnpp_continuous.json", "cifar10_ddpmpp_deep_continuous.json"]
    out = tmp_path / "table.json"
    result = _cli(*[str(reference_dir / "divergence" / n) for n in names],
                  "--thresholds", "1e-4,3e-3,3e-2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["thresholds"] == [1e-4, 3e-3, 3e-2]
    for name in names:
        for dim in ("8", "16"):
            want = {k: v for k, v in expected["cutoffs"][name][dim].items()
                    if k in ("0.0001", "0.003", "0.03")}
            assert saved["cutoffs"][name][dim] == want
    printed = result.stdout
    assert "cifar10_ncsnpp_continuous.json" in printed and "0.416" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # no temporary leftovers


def _synthetic(times, log_values, per_time=3):
    t, err = [], []
    for time, value in zip(times, log_values):
        t.extend([time] * per_time)
        err.extend([math.exp(value)] * per_time)
    return t, err


def test_interpolation_rule_on_synthetic_curve():
    # log D_F linear in t from log(1) at t=0 to log(1e-4) at t=1: D_F < 1e-2 first for t > 0.5.
    times = np.linspace(0, 1, 11)
    t, err = _synthetic(times, np.log(1e-4) * times)
    assert cutoffs.cutoff_time(t, err, 1e-2) == np.linspace(0, 1, 1001)[501]
    assert cutoffs.cutoff_time(t, err, 1e-5) is None  # never reached
    assert cutoffs.cutoff_time(t, err, 2.0) == 0.0


def test_nan_rows_are_skipped_and_nan_times_never_count():
    times = [0.0, 0.1, 0.2, 0.3]
    t = [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    err = [np.nan, np.nan, 1e-3, np.nan, 1e-3, 3e-3, 1e-4, 1e-4]
    grid_times, means = cutoffs.mean_by_time(t, err)
    assert grid_times.tolist() == times
    assert np.isnan(means[0])
    np.testing.assert_allclose(means[1:], [1e-3, 2e-3, 1e-4])
    # Below the threshold from t = 0.1 on, but [0, 0.1) is interpolated from the NaN at t = 0.
    assert cutoffs.cutoff_time(t, err, 1e-2) == 0.1


def test_bad_input_messages(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        cutoffs.cutoff_time([0.0, 1.0], [1.0, 0.1], 0.0)
    with pytest.raises(ValueError, match="lacks column"):
        cutoffs.cutoff_table({"16": {"t": [0.0]}})
    with pytest.raises(FileNotFoundError, match="analysis.divergence"):
        cutoffs.load_divergence(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="comma-separated"):
        cutoffs.parse_thresholds("1e-4,abc")
    with pytest.raises(ValueError, match="one or more divergence JSONs"):
        cutoffs.write_cutoff_tables([], [1e-3])
    # One real process (the exit status the shell sees); the other bad input of the command
    # line runs in tests/test_entry_errors.py.
    result = _cli(str(tmp_path / "missing.json"), "--thresholds", "1e-3")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "analysis.divergence" in lines[0]


def test_divergence_plot_written_atomically(tmp_path):
    times = np.linspace(0, 1, 11)
    data = {}
    for size, slope in (("16", 8.0), ("8", 6.0)):
        rng = np.random.default_rng(int(size))
        t = np.repeat(times, 5)
        data[size] = {"t": t.tolist(),
                      "err_norm": np.exp(-slope * t + 0.1 * rng.standard_normal(t.size)).tolist()}
    data["16"]["err_norm"][0] = float("nan")
    table = cutoffs.cutoff_table(data, [1e-3, 3e-2])
    fig = plot_divergence(data, thresholds=[1e-3, 3e-2], cutoffs=table, title="synthetic")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["16x16", "8x8"]
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
        path = save_figure(fig, tmp_path / f"divergence{suffix}")
        assert path.read_bytes()[:4] == magic
    with pytest.raises(ValueError, match="png"):
        save_figure(fig, tmp_path / "divergence.jpeg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["divergence.pdf", "divergence.png"]
