"""The laptop demo: the smoke mode end to end on MNIST (Inception and proxy metrics, the
memorisation check), the cutoff rule, the committed checkpoints of both datasets, the layering
of its modules."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import demo_cutoffs
import demo_metrics
import demo_run
import demo_settings
from models import utils as mutils
from models.checkpoints import load_model_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke-mode run on MNIST (a few training steps per model), shared by the tests
    below."""
    workdir = tmp_path_factory.mktemp("demo_smoke")
    settings = demo_settings.DemoSettings.for_mode("smoke", "mnist")
    results = demo_run.run_demo(settings, workdir, progress=False,
                                device=torch.device("cpu"))
    return workdir, settings, results


def test_smoke_writes_the_table_and_the_figure(smoke):
    workdir, settings, results = smoke
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["samplers"].keys() == {"full only", "subspace 16", "subspace 16, 8"}
    assert saved["machine"]["torch_threads"] >= 1 and saved["machine"]["cpu"]
    assert saved["settings"]["num_steps"] == settings.num_steps
    # Untrained networks: D_F stays near 1, so the fixed fallback cutoffs are used, and said so.
    assert saved["cutoffs"]["values"] == {"16": 0.5, "8": 0.6}
    assert "untrained" in saved["cutoffs"]["rule"]
    table = (workdir / "results.md").read_text()
    assert "NOT the paper's Inception FID" in table and "Machine:" in table
    assert "| full only | 10 / 0 / 0 |" in table and "| held-out data (8 images) |" in table
    assert "Inception FID [95 % interval] | KID x 1e3 | proxy FID" in table
    assert "Memorisation check" in table and "| full only (8) |" in table
    # One table row per sampler, one curve row per sampler and N, then the claims.
    assert table.count("| subspace 16 | ") == 1 + len(settings.curve_steps)
    assert "Claims of the demo, as measured in this run:" in table
    assert (workdir / "quality_cost.png").is_file()
    from PIL import Image

    with Image.open(workdir / "samples.png") as figure:
        width, height = figure.size
    assert figure.format == "PNG" and width > 3 * height  # four panels side by side
    for name in ("full_only", "subspace_16", "subspace_16_8"):
        with Image.open(workdir / "samples" / f"{name}.png") as grid:
            assert grid.format == "PNG"
        samples = np.load(workdir / "samples" / f"{name}.npz")["samples"]
        assert samples.shape == (settings.num_samples, 32, 32, 1) and samples.dtype == np.uint8
    for name in ("divergence.png", "divergence.json", "subspace_rmsd.json", "nearest.png"):
        assert (workdir / name).is_file()
    assert saved["rmsd"] == pytest.approx({"16": 0.12967, "8": 0.18726}, abs=1e-5)


def test_smoke_inception_and_memorisation(smoke):
    _, settings, results = smoke
    info = results["inception"]
    assert info["reference_images"] == 2000 and info["network"].startswith("torch-inception")
    rows = [results["data_quality"], *results["samplers"].values()]
    for entry in rows:
        low, high = entry["fid_interval"]
        assert 0 <= low <= entry["fid"] <= high and entry["fid_interval_kind"] == "half-sample"
        assert math.isfinite(entry["kid"]) and entry["kid_std_error"] > 0
        memo = entry["memorisation"]
        assert memo["images"] == settings.num_samples
        quantiles = list(memo["quantiles"].values())
        assert quantiles == sorted(quantiles) and quantiles[0] > 0
    # The held-out images against themselves: the 1 % quantile of 8 values lies between the
    # two smallest, so exactly one image is below it.
    assert results["data_quality"]["memorisation"]["share_below_test_q01"] == 1 / 8
    # Curve points other than the table's N carry no Inception metric (its cost).
    for curve in results["quality_cost"].values():
        assert all("fid" not in point for point in curve.values())
    # Untrained networks draw noise, far from every digit; the test digits are not.
    assert results["samplers"]["full only"]["fid"] > 3 * results["data_quality"]["fid"]


def test_nearest_training_images_finds_copies_and_their_index():
    rng = np.random.default_rng(0)
    training = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    copies = training[[7, 3, 41]]
    distances, indices = demo_metrics.nearest_training_images(copies, training, batch=2)
    assert list(indices) == [7, 3, 41] and np.allclose(distances, 0, atol=1e-3)
    # One pixel moved by 51 levels (0.2): the distance is 0.2, to the same training image.
    moved = copies.copy()
    moved[:, 0, 0, 0] = np.where(moved[:, 0, 0, 0] > 127, moved[:, 0, 0, 0] - 51,
                                 moved[:, 0, 0, 0] + 51)
    distances, indices = demo_metrics.nearest_training_images(moved, training)
    assert list(indices) == [7, 3, 41] and np.allclose(distances, 0.2, atol=1e-3)
    # Brute force over the float images for unrelated queries.
    queries = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    distances, indices = demo_metrics.nearest_training_images(queries, training)
    brute = np.linalg.norm(queries.reshape(5, 1, -1) / 255.0
                           - training.reshape(1, 50, -1) / 255.0, axis=2)
    assert list(indices) == list(brute.argmin(axis=1))
    assert np.allclose(distances, brute.min(axis=1), atol=1e-4)
    memo = demo_metrics.memorisation_entry(np.array([0.0, 1.5, 2.0, 3.0]),
                                           np.linspace(1.0, 5.0, 101))
    assert memo["quantiles"]["0"] == 0.0 and memo["quantiles"]["0.5"] == 1.75
    assert memo["share_below_test_q01"] == 0.25  # only the copy is closer than 1.04


def test_smoke_evaluation_split_at_the_same_n(smoke):
    _, settings, results = smoke
    n = settings.num_steps
    full = results["samplers"]["full only"]
    assert full["nfe"] == {"32": n} and full["steps"] == {"32": n}
    for name, sizes in (("subspace 16", (16,)), ("subspace 16, 8", (16, 8))):
        info = results["samplers"][name]
        # The windows visit the same grid of N steps; every upsampling adds Langevin steps of
        # the next-larger network.
        assert sum(info["steps"].values()) == n
        assert set(info["nfe"]) == {"32", *map(str, sizes)}
        assert info["nfe"]["32"] == info["steps"]["32"] + settings.langevin_steps < n
        assert all(info["nfe"][str(s)] > 0 for s in sizes)
        assert math.isfinite(info["proxy_fid"]) and math.isfinite(info["proxy_kid"])
        low, high = info["proxy_fid_interval"]
        assert 0 <= low <= high
        costs = results["network_cost"]
        # The costs were timed inside the samplers' own calls: every call, and only those.
        batches = math.ceil(settings.num_samples / settings.sample_batch)
        for size, cost in costs.items():
            made = sum(point["nfe"].get(size, 0) for curve in results["quality_cost"].values()
                       for point in curve.values())
            assert cost["calls"] == made * batches and cost["seconds"] > 0, size
        ideal = (n * costs["32"]["seconds"]
                 / sum(k * costs[s]["seconds"] for s, k in info["nfe"].items()))
        assert info["speedup"]["ideal_measured_cost"] == pytest.approx(ideal)
        # Each sampler's own calls at the table's N: they add up to the pooled count, and the
        # own-call ideal is the ratio of the two samplers' network seconds.
        own, base = info["network_cost"], full["network_cost"]
        assert {s: c["calls"] for s, c in own.items()} == {
            s: k * batches for s, k in info["nfe"].items()}
        network_seconds = {key: sum(c["seconds"] * c["calls"] for c in cost.values())
                           for key, cost in (("full", base), ("sub", own))}
        assert info["speedup"]["ideal_own_cost"] == pytest.approx(
            network_seconds["full"] / network_seconds["sub"])
        pixels = n / sum(k * (int(s) / 32) ** 2 for s, k in info["nfe"].items())
        assert info["speedup"]["ideal_pixel_cost"] == pytest.approx(pixels)
        assert info["speedup"]["ideal_pixel_cost"] > 1
        assert info["speedup"]["achieved"] == pytest.approx(full["seconds"] / info["seconds"])
    assert math.isfinite(results["data_proxy_fid"])
    # The curve's point at the table's N is the table's run (same seeds, same samples).
    for name, info in results["samplers"].items():
        point = results["quality_cost"][name][str(n)]
        assert set(results["quality_cost"][name]) == {str(k) for k in settings.curve_steps}
        assert point["proxy_fid"] == info["proxy_fid"] and point["nfe"] == info["nfe"]
    assert results["quality_cost"]["full only"][str(n)]["full_equivalent_evals"] == \
        pytest.approx(n)
    checks = demo_metrics.claim_checks(results)
    assert [c["claim"] for c in checks][0] == "full-only Inception FID <= 3x held-out floor"
    assert len(checks) == 1 + 3 * 2  # per subspace sampler: quality, speed-up, bits/dim


def test_smoke_bits_per_dim(smoke):
    _, settings, results = smoke
    bpd = results["bpd"]
    assert bpd.keys() == {"full only", "subspace 16", "subspace 16, 8"}
    for info in bpd.values():
        assert math.isfinite(info["bpd"]) and info["bpd"] > 0
        assert info["images"] == settings.bpd_images and info["ode_nfe"] > 0
    # The implicit score calls the full network near t = eps and the coarsest subspace network
    # near t = T (the ODE's two ends), and its evaluations add up to the ODE's. The adaptive
    # RK45 solver may step over the narrow middle band (16x16 on [0.5, 0.6] here) altogether.
    for name in ("subspace 16", "subspace 16, 8"):
        info = bpd[name]
        assert info["num_full"] > 0 and info["num_subspace"][-1] > 0
        assert info["num_full"] + sum(info["num_subspace"]) == info["ode_nfe"]
        assert math.isfinite(info["difference_to_full"])
        assert info["difference_to_full"] == pytest.approx(info["bpd"] - bpd["full only"]["bpd"],
                                                           abs=1e-4)


def test_workdir_models_are_reused_and_settings_guarded(smoke):
    workdir, settings, _ = smoke
    models = demo_run.obtain_models(settings, workdir, torch.device("cpu"), False, False)
    assert all(info["source"].startswith("reused") for info in models.values())
    other = dataclasses.replace(settings, lr={32: settings.learning_rate(32) / 2})
    with pytest.raises(ValueError, match="trained with other settings"):
        demo_run.obtain_models(other, workdir, torch.device("cpu"), False, False)


def test_exported_weights_load_strictly_and_match_the_ema(smoke, tmp_path):
    workdir, settings, _ = smoke
    checkpoint = workdir / "models" / "size_16" / "checkpoints" / "checkpoint_1.pth"
    config = demo_settings.demo_config(16, settings, torch.device("cpu"))
    out = demo_run.export_ema_weights(checkpoint, config, tmp_path / "w.pth")
    assert "optimizer" not in torch.load(out, weights_only=True)
    assert out.stat().st_size < checkpoint.stat().st_size / 2
    exported = load_model_weights(mutils.create_model(config), out)
    original = load_model_weights(mutils.create_model(config), checkpoint, use_ema=True)
    x = torch.randn(2, config.data.num_channels, 16, 16)
    labels = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(exported(x, labels), original(x, labels), rtol=0, atol=0)


def test_cli_reports_bad_input_in_one_line(smoke, capsys):
    import demo

    workdir, _, _ = smoke
    # The smoke workdir holds smoke models; the full settings differ.
    assert demo.main(["--mode", "full", "--workdir", str(workdir), "--no_progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "other settings" in err[0]
    with pytest.raises(SystemExit):
        demo.parse_args(["--mode", "quick", "--export_assets"])


def _curve(floor: float, scale: float) -> dict:
    """Synthetic D_F at t = 0, 0.05, ..., 1: NaN at t = 0, then scale * exp(-20 t) + floor (two
    samples per time)."""
    times = np.linspace(0, 1, 21)
    values = [math.nan if t == 0 else scale * math.exp(-20 * t) + floor for t in times]
    return {"t": [float(t) for t in times for _ in range(2)],
            "err_norm": [v for v in values for _ in range(2)]}


def test_threshold_is_the_papers_unless_the_model_error_floor_is_above_it():
    data = {"16": _curve(1e-4, 10.0), "8": _curve(2e-4, 20.0)}
    threshold, rule = demo_cutoffs.choose_threshold(data, 3e-3, 2.0, 0.3)
    assert threshold == 3e-3 and "paper" in rule
    data = {"16": _curve(0.018, 10.0), "8": _curve(0.019, 20.0)}
    threshold, rule = demo_cutoffs.choose_threshold(data, 3e-3, 2.0, 0.3)
    assert threshold == pytest.approx(0.038) and "floor" in rule
    data = {"16": _curve(0.99, 1.0), "8": _curve(1.0, 1.0)}
    assert demo_cutoffs.choose_threshold(data, 3e-3, 2.0, 0.3)[0] is None


def test_nested_plan_needs_increasing_cutoffs():
    chosen, skipped = demo_settings.plans({16: 0.4, 8: 0.3})
    assert list(chosen) == ["full only", "subspace 16"] and list(skipped) == ["subspace 16, 8"]
    chosen, skipped = demo_settings.plans({16: 0.3, 8: 0.4})
    assert len(chosen) == 3 and not skipped


@pytest.mark.parametrize("dataset", sorted(demo_settings.DEMO_DATASETS))
def test_committed_checkpoints_and_results(dataset, tmp_path):
    data = demo_settings.demo_dataset(dataset)
    manifest_path = data.checkpoints / demo_settings.MANIFEST_NAME
    if not manifest_path.is_file():
        pytest.skip(f"no committed {dataset} demo checkpoints (run `python demo.py --mode full "
                    f"--dataset {dataset} --export_assets`)")
    manifest = demo_settings.read_manifest(dataset)
    total = 0
    for entry in manifest["files"].values():
        path = data.checkpoints / entry["file"]
        assert demo_run._sha256(path) == entry["sha256"]
        total += path.stat().st_size
    assert total < 8 * 2**20
    committed = json.loads((data.assets / "results.json").read_text())
    assert committed["mode"] == "full" and committed["cutoffs"] == manifest["cutoffs"]
    n = committed["settings"]["num_steps"]
    full = committed["samplers"]["full only"]["nfe"]["32"]
    assert full == n
    for name in ("subspace 16", "subspace 16, 8"):
        assert committed["samplers"][name]["nfe"]["32"] < full
    assert all(math.isfinite(b["bpd"]) for b in committed["bpd"].values())
    # The quick mode's path on 4 samples: committed weights (strict), manifest cutoffs. N stays
    # at the committed value (the networks hold a buffer of N noise levels).
    # Without Inception metrics: the smoke run checks them, and the reference's root costs
    # seconds.
    # A proxy KID reference of 256 training images instead of thousands (its proxy features
    # cost seconds; the smoke run checks the metric).
    settings = dataclasses.replace(demo_settings.DemoSettings.for_mode("quick", dataset),
                                   num_samples=4, grid_samples=4, inception=False,
                                   kid_reference_images=256)
    results = demo_run.run_demo(settings, tmp_path, progress=False, device=torch.device("cpu"))
    assert results["cutoffs"]["values"] == manifest["cutoffs"]["values"]
    assert all(t["source"].startswith("committed") for t in results["training"].values())
    assert results["samplers"]["subspace 16, 8"]["nfe"]["32"] < n
    assert "bpd" not in results and (tmp_path / "samples.png").is_file()


# Which demo modules each demo module may import: settings at the bottom, orchestration on top,
# the report reads the claims from the metrics; nothing else crosses.
DEMO_LAYERS = {
    "demo_settings": set(),
    "demo_cutoffs": {"demo_settings"},
    "demo_sampling": {"demo_settings"},
    "demo_metrics": {"demo_settings"},
    "demo_report": {"demo_settings", "demo_metrics"},
    "demo_run": {"demo_settings", "demo_cutoffs", "demo_sampling", "demo_metrics",
                 "demo_report"},
}


def test_demo_modules_import_one_way():
    from test_import_layers import imported_modules

    modules = {p.stem for p in ROOT.glob("demo_*.py")}
    assert modules == DEMO_LAYERS.keys(), "place every demo_*.py module in DEMO_LAYERS"
    for name, allowed in DEMO_LAYERS.items():
        demo_imports = {m.split(".")[0] for m in imported_modules(ROOT / f"{name}.py")} & (
            modules | {"demo"})
        assert demo_imports <= allowed, f"{name} imports {sorted(demo_imports - allowed)}"
    # Only the entry script runs the demo: no library module imports the demo's modules.
    for path in ROOT.glob("*.py"):
        if path.stem not in modules | {"demo"}:
            assert not {m.split(".")[0] for m in imported_modules(path)} & modules, path.name
