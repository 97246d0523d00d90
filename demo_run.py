"""Orchestration of the demo (`demo.py`): one run in a working directory, phase by phase.

One run trains (or reuses) a small full 32x32 sub-VP DDPM++ score model and 16x16 and 8x8
subspace models (the same config at `data.image_size` 16 and 8), recomputes the dataset's RMSD to
the downsampling subspaces, measures the orthogonal Fisher divergence of the full model and picks
the cutoff times from it (`demo_cutoffs`), then samples with the full model only and with
subspace diffusion (one level 16; two levels 16, 8) at the same number of steps N, and at the
other N of the quality-against-cost curve (`demo_sampling`). It reports the network evaluations
split full/subspace, wall-clock times, the measured cost of one evaluation of each network with
the ideal and achieved speed-ups, the proxy FID (bootstrap 95 % interval) and proxy KID of each
sampler and of as many held-out images, whether the demo's claims hold, and bits/dim of
held-out images through the full model and the implicit subspace scores (`demo_metrics`).
Everything it measures is written to `results.json` and `results.md` in the working directory,
the samples side by side to `samples.png`, the curve to `quality_cost.png` (`demo_report`).
The modes and settings are in `demo_settings`; `export` copies a full run's weights, table and
figures into the repository's assets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import evaluation
import run_lib
import sde_lib
from demo_cutoffs import compute_rmsd, divergence_and_cutoffs
from demo_metrics import (
    bits_per_dim,
    held_out_images,
    inception_reference_info,
    memorisation_entry,
    nearest_training_images,
    quality_entry,
    repo_relative,
    training_features,
    training_images,
)
from demo_report import (
    panel_title,
    results_markdown,
    save_nearest_figure,
    save_quality_cost_figure,
    save_sample_figure,
)
from demo_sampling import ForwardTimer, draw_samples, machine_info, speedups, warn_if_busy
from demo_settings import (
    FULL_SIZE,
    MANIFEST_NAME,
    SUBSPACE_SIZES,
    DemoSettings,
    checkpoint_path,
    demo_config,
    plans,
    read_manifest,
)
from files import (
    atomic_numpy_save,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    save_image_grid,
)
from models import utils as mutils
from models.checkpoints import load_model_weights
from models.subspace_model import build_subspace_model

logger = logging.getLogger(__name__)


def run_demo(settings: DemoSettings, workdir: str | os.PathLike, reuse_committed: bool = False,
             export_assets: bool = False, progress: bool = True,
             device: torch.device | None = None) -> dict:
    """Run the demo in `workdir` and return the results (also written as results.json/.md)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = device if device is not None else mutils.default_device()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    phases: dict[str, float] = {}
    results: dict = {"mode": settings.mode, "machine": machine_info(),
                     "settings": {**dataclasses.asdict(settings),
                                  "config": settings.data.config_module}}
    warn_if_busy(results["machine"])

    began = time.perf_counter()
    models = obtain_models(settings, workdir, device, reuse_committed, progress)
    phases["training"] = time.perf_counter() - began
    results["training"] = {str(s): {k: (str(v) if isinstance(v, Path) else v)
                                    for k, v in info.items() if k != "config"}
                           for s, info in models.items()}
    networks = load_networks(models)
    config = models[FULL_SIZE]["config"]

    print("== RMSD of the training images to the 16x16 and 8x8 subspaces", flush=True)
    began = time.perf_counter()
    rmsd, stats_path = compute_rmsd(config, workdir, progress, settings.data.stats_name)
    phases["statistics"] = time.perf_counter() - began
    results["rmsd"] = {str(k): v for k, v in rmsd.items()}

    if settings.divergence:
        print("== orthogonal Fisher divergence of the full model and cutoff times", flush=True)
        began = time.perf_counter()
        div = divergence_and_cutoffs(networks[FULL_SIZE], config, rmsd, settings, workdir,
                                     progress)
        phases["divergence"] = time.perf_counter() - began
        results["divergence"] = div
        results["cutoffs"] = {"rule": div["rule"], "values": div["cutoffs"]}
    else:
        manifest = read_manifest(settings.dataset)
        results["cutoffs"] = {"rule": "from the committed run: " + manifest["cutoffs"]["rule"],
                              "values": manifest["cutoffs"]["values"]}
    cutoffs = {int(s): float(t) for s, t in results["cutoffs"]["values"].items()}

    began = time.perf_counter()
    results.update(sampling_phase(networks, config, cutoffs, stats_path, settings, workdir,
                                  progress))
    phases["sampling"] = time.perf_counter() - began

    if settings.bpd:
        print("== bits/dim of held-out images (full model, implicit subspace scores)",
              flush=True)
        began = time.perf_counter()
        results["bpd"] = likelihood_phase(networks, config, cutoffs, stats_path, settings,
                                          progress)
        phases["likelihood"] = time.perf_counter() - began

    results["phases"] = phases
    results["total_seconds"] = time.perf_counter() - wall0
    results["total_cpu_seconds"] = time.process_time() - cpu0
    if hasattr(os, "getloadavg"):
        results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    atomic_write_text(workdir / "results.json",
                      json.dumps(results, indent=2, default=_json_default) + "\n")
    atomic_write_text(workdir / "results.md", results_markdown(results))
    if export_assets:
        export(results, models, workdir)
    return results


def obtain_models(settings: DemoSettings, workdir: Path, device: torch.device,
                  reuse_committed: bool, progress: bool) -> dict[int, dict]:
    """Per size: the checkpoint to use, its config, and where it came from.

    With `reuse_committed`, or in a mode that does not train, the committed weights of the
    run's dataset are used.
    Otherwise a finished run in `workdir/models/size_S` is reused, or the model is trained with
    `run_lib.train` (which resumes an interrupted run of the same workdir), timed.
    """
    use_committed = not settings.train or reuse_committed
    if not use_committed:
        _check_workdir(workdir, settings)
    models = {}
    for size in (FULL_SIZE,) + SUBSPACE_SIZES:
        config = demo_config(size, settings, device)
        run_dir = workdir / "models" / f"size_{size}"
        final = run_dir / "checkpoints" / "checkpoint_1.pth"
        committed = checkpoint_path(size, settings.dataset)
        if use_committed:
            if not committed.is_file():
                raise FileNotFoundError(
                    f"Committed checkpoint {committed} does not exist: train the models with "
                    f"`python demo.py --mode full --dataset {settings.dataset}` (add "
                    "--export_assets to commit them).")
            models[size] = {"checkpoint": committed, "source": "committed (assets/checkpoints/"
                                                                f"{settings.dataset})"}
        elif final.is_file():
            models[size] = {"checkpoint": final, "source": f"reused from {run_dir}"}
        else:
            print(f"== training the {size}x{size} model ({config.training.n_iters} steps of "
                  f"batch {config.training.batch_size})", flush=True)
            _, wall, cpu = _timed(run_lib.train, config, run_dir, progress=progress)
            steps = config.training.n_iters + 1
            models[size] = {"checkpoint": final, "source": "trained in this run",
                            "steps": steps, "seconds": wall, "cpu_seconds": cpu,
                            "seconds_per_step": wall / steps, "cpu_seconds_per_step": cpu / steps}
        models[size]["config"] = config
    return models


def load_networks(models: dict[int, dict]) -> dict[int, torch.nn.Module]:
    """The EMA networks of each size, in eval mode."""
    return {size: load_model_weights(mutils.create_model(info["config"]), info["checkpoint"])
            for size, info in models.items()}


def sampling_phase(networks: dict[int, torch.nn.Module], config, cutoffs: dict[int, float],
                   stats_path: Path, settings: DemoSettings, workdir: Path,
                   progress: bool) -> dict:
    """Every sampler at N = num_steps (the table) and at each N of the quality-against-cost
    curve, interleaved (N outer, then batch, then sampler) so that a change of machine load
    hits every sampler alike; proxy FID with bootstrap interval and proxy KID of each, and of
    as many held-out images (the floor), and for the table's rows Inception FID and KID where
    the dataset's statistics are committed, and each image's distance to its nearest training
    image (memorisation); the per-evaluation cost of each network, timed inside the samplers'
    calls; the grids and figures. Returns the results entries."""
    # The cost of one evaluation of each network is timed inside the samplers' own calls, so
    # that it sees the inputs and the machine as they did.
    timer = ForwardTimer({s: networks[s] for s in (FULL_SIZE,) + SUBSPACE_SIZES})
    proxy_stats = evaluation.load_dataset_stats(config, "proxy")
    train_uint8 = training_images(config)
    reference = training_features(config, train_uint8[: settings.kid_reference_images])
    inception, inception_info = inception_reference_info(
        config, None if settings.inception else False)
    held_out = held_out_images(config, settings.num_samples)
    held_uint8 = evaluation.to_uint8_nhwc(held_out)
    print("== quality of the held-out images (the floor)", flush=True)
    floor = quality_entry(held_uint8, proxy_stats, reference, settings, inception)
    floor_distances, floor_nearest = nearest_training_images(held_uint8, train_uint8)
    floor["memorisation"] = memorisation_entry(floor_distances, floor_distances)
    nearest_panels = [_nearest_panel("held-out test images", held_uint8, floor_distances,
                                     floor_nearest, train_uint8, settings)]
    chosen, skipped = plans(cutoffs)
    samplers: dict[str, dict] = {}
    curve: dict[str, dict[str, dict]] = {name: {} for name in chosen}
    images = {}
    for num_steps in sorted(set(settings.curve_steps) | {settings.num_steps}):
        print(f"== sampling, N = {num_steps} steps each, {settings.num_samples} samples",
              flush=True)
        with timer:
            drawn = draw_samples(networks, config, chosen, cutoffs, stats_path, settings,
                                 num_steps, progress, timer=timer)
        for name, sizes in chosen.items():
            uint8, info = drawn[name]
            table_row = num_steps == settings.num_steps
            info.update(quality_entry(uint8, proxy_stats, reference, settings,
                                      inception if table_row else None))
            curve[name][str(num_steps)] = {k: info[k] for k in (
                "nfe", "seconds", "proxy_fid", "proxy_fid_interval", "proxy_kid",
                "proxy_kid_std_error")}
            if table_row:
                distances, nearest = nearest_training_images(uint8, train_uint8)
                info["memorisation"] = memorisation_entry(distances, floor_distances)
                nearest_panels.append(_nearest_panel(name, uint8, distances, nearest,
                                                     train_uint8, settings))
                atomic_numpy_save(workdir / "samples" / f"{_slug(name)}.npz", samples=uint8)
                info["cutoffs"] = {str(s): cutoffs[s] for s in sizes}
                info["network_cost"] = timer.costs(settings.sample_batch, (name, num_steps))
                samplers[name] = info
                images[name] = evaluation.to_float_nchw(uint8)
    costs = timer.costs(settings.sample_batch)
    baseline = samplers["full only"]
    for name, info in samplers.items():
        if name != "full only":
            info["speedup"] = speedups(info, baseline, costs)
        for point in curve[name].values():
            point["full_equivalent_evals"] = sum(
                n * costs[size]["seconds"] for size, n in point["nfe"].items()) \
                / costs[str(FULL_SIZE)]["seconds"]

    panels = [(panel_title("held-out data", floor), held_out[: settings.grid_samples])]
    for name, info in samplers.items():
        grid = images[name][: settings.grid_samples]
        panels.append((panel_title(name, info), grid))
        save_image_grid(grid, workdir / "samples" / f"{_slug(name)}.png")
    save_sample_figure(panels, workdir / "samples.png")
    save_nearest_figure(nearest_panels, workdir / "nearest.png")
    if len(settings.curve_steps) > 1:
        save_quality_cost_figure(curve, floor, workdir / "quality_cost.png")
    return {"network_cost": costs, "samplers": samplers, "skipped_samplers": skipped,
            "data_proxy_fid": floor["proxy_fid"], "data_quality": floor,
            "quality_cost": curve, "inception": inception_info,
            "proxy_stats": repo_relative(evaluation.dataset_stats_path(config, "proxy")),
            "training_images": int(len(train_uint8))}


def _nearest_panel(name: str, images: np.ndarray, distances: np.ndarray, nearest: np.ndarray,
                   training: np.ndarray, settings: DemoSettings) -> tuple:
    """The `nearest_panel` images of a set closest to a training image, their nearest
    training images and distances (a panel of nearest.png)."""
    order = np.argsort(distances)[: settings.nearest_panel]
    return name, images[order], training[nearest[order]], distances[order]


def likelihood_phase(networks: dict[int, torch.nn.Module], config, cutoffs: dict[int, float],
                     stats_path: Path, settings: DemoSettings, progress: bool) -> dict:
    """Bits/dim of the same held-out images through the full network and through the implicit
    full-space score of each subspace plan, with the paired difference to the full model."""
    sde, _ = sde_lib.get_sde(config)
    chosen, _ = plans(cutoffs)
    per_image, results = {}, {}
    for name, sizes in chosen.items():
        if sizes:
            model = build_subspace_model(config, sde, networks[FULL_SIZE],
                                         [networks[s] for s in sizes], sizes,
                                         [cutoffs[s] for s in sizes], settings.data.stats_name,
                                         stats_path).eval()
        else:
            model = networks[FULL_SIZE]
        values, info = bits_per_dim(model, config, settings, progress)
        if sizes:
            info.update(num_full=model.num_full, num_subspace=list(model.nfe_subspace))
            diff = values - per_image["full only"]
            info["difference_to_full"] = float(diff.mean())
            info["difference_std_error"] = (float(diff.std(ddof=1) / math.sqrt(len(diff)))
                                            if len(diff) > 1 else float("nan"))
        per_image[name] = values
        results[name] = info
    return results


def _check_workdir(workdir: Path, settings: DemoSettings) -> None:
    """A workdir holds models of one set of training settings; refuse to mix them."""
    path = workdir / "demo_settings.json"
    key = settings.training_key()
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != key:
            raise ValueError(
                f"{workdir} holds demo models trained with other settings ({path}): choose "
                "another --workdir or delete that folder.")
    else:
        atomic_write_text(path, json.dumps(key, indent=2) + "\n")


def _timed(fn: Callable, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _slug(name: str) -> str:
    return name.replace(",", "").replace(" ", "_")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def export(results: dict, models: dict[int, dict], workdir: Path, folder: Path | None = None,
           assets: Path | None = None) -> None:
    """Copy the EMA weights (bare state dicts), their manifest, and the results table and
    figures of this run into the repository's assets (default: the committed checkpoints and
    results folders of the run's dataset)."""
    import shutil

    settings = results["settings"]
    data = DemoSettings.for_mode("full", settings["dataset"]).data
    folder = data.checkpoints if folder is None else Path(folder)
    assets = data.assets if assets is None else Path(assets)
    if results["mode"] != "full":
        raise ValueError("Only a full-mode run may replace the committed assets: run "
                         "`python demo.py --mode full --export_assets`.")
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for size, info in models.items():
        out = export_ema_weights(info["checkpoint"], info["config"],
                                 checkpoint_path(size, data.name, folder))
        files[str(size)] = {"file": out.name, "sha256": _sha256(out),
                            "bytes": out.stat().st_size, "source": info["source"],
                            "steps": info.get("steps")}
    manifest = {"config": data.config_module, "dataset": data.name,
                "command": f"python demo.py --mode full --dataset {data.name} --export_assets",
                "training": settings["train_steps"], "files": files,
                "cutoffs": results["cutoffs"], "rmsd": results["rmsd"]}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "samples.png", "nearest.png", "divergence.png",
                 "quality_cost.png"):
        if (workdir / name).is_file():
            with atomic_write(assets / name, "wb") as handle:
                with open(workdir / name, "rb") as source:
                    shutil.copyfileobj(source, handle)


def export_ema_weights(checkpoint: str | os.PathLike, config, out: str | os.PathLike) -> Path:
    """Write the EMA weights of a training checkpoint as a bare state dict (no optimizer state,
    no raw weights: a quarter of the size) that `load_model_weights` loads strictly."""
    model = load_model_weights(mutils.create_model(config), checkpoint, use_ema=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out)
    return Path(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
