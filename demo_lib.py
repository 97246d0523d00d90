"""The main job of the paper on the built-in dataset, sized for a laptop (`demo.py`).

One run trains (or reuses) a small full 32x32 sub-VP DDPM++ score model and 16x16 and 8x8
subspace models (the same config at `data.image_size` 16 and 8), recomputes the dataset's RMSD to
the downsampling subspaces, measures the orthogonal Fisher divergence of the full model and picks
the cutoff times from it, then samples with the full model only and with subspace diffusion (one
level 16; two levels 16, 8) at the same number of steps N, and at the other N of the
quality-against-cost curve. It reports the network evaluations split full/subspace, wall-clock
times, the measured cost of one evaluation of each network with the ideal and achieved
speed-ups, the proxy FID (bootstrap 95 % interval) and proxy KID of each sampler and of as many
held-out images, whether the demo's claims hold, and bits/dim of held-out images through the
full model and the implicit subspace scores. Everything it measures is written to
`results.json` and `results.md` in the working directory, the samples side by side to
`samples.png`, the curve to `quality_cost.png`.

Modes (`DemoSettings.for_mode`): `full` (the measured laptop run), `quick` (sampling and table
from the committed checkpoints of assets/checkpoints/builtin, no training, no likelihood) and
`smoke` (a few training steps and tiny sample counts, for the tests).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import ml_collections
import numpy as np
import torch

import datasets
import evaluation
import likelihood
import run_lib
import sampling
import sde_lib
import subspace_lib as sl
from analysis import cutoffs as cutoff_lib
from analysis.divergence import default_times, fisher_divergence
from analysis.rmsd import rmsd_table
from files import (
    atomic_numpy_save,
    atomic_torch_save,
    atomic_write,
    atomic_write_text,
    make_image_grid,
    save_image_grid,
)
from models import utils as mutils
from models.checkpoints import load_model_weights
from models.subspace_model import build_subspace_model
from subspace_sampling import StageReport, subspace_pc_sample

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
BUILTIN_CHECKPOINTS = ROOT / "assets" / "checkpoints" / "builtin"
DEMO_ASSETS = ROOT / "assets" / "demo"
MANIFEST_NAME = "manifest.json"
CONFIG_MODULE = "configs.builtin.subvp_ddpmpp_small"
STATS_NAME = "builtin"
FULL_SIZE = 32
SUBSPACE_SIZES = (16, 8)
# The samplers compared at the same N: name -> subspace sizes of the plan (empty: full only).
SAMPLERS: dict[str, tuple[int, ...]] = {"full only": (), "subspace 16": (16,),
                                        "subspace 16, 8": (16, 8)}
MODES = ("full", "quick", "smoke")


DEFAULT_LR = 1e-3


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run does, for one mode (`for_mode`)."""

    mode: str
    train: bool
    train_steps: dict[int, int]
    train_batch: int = 32
    # Learning rate per image size (sizes not listed: 1e-3).
    lr: dict[int, float] = dataclasses.field(default_factory=dict)
    warmup: int = 100
    # The 16x16 and 8x8 models only run above their cutoffs, so they train on t in [this, 1]
    # (the cutoffs are raised to it if the divergence puts them lower).
    subspace_min_time: float = 0.2
    num_steps: int = 50
    num_samples: int = 512
    sample_batch: int = 128
    # Step counts of the quality-against-cost curve (empty: no curve); num_steps is reused.
    curve_steps: tuple[int, ...] = (10, 25, 50)
    bootstrap_resamples: int = 200
    grid_samples: int = 64
    divergence: bool = True
    divergence_images: int = 512
    divergence_times: int = 21
    threshold: float = 3e-3
    floor_factor: float = 2.0
    untrained_floor: float = 0.3
    bpd: bool = True
    bpd_images: int = 64
    bpd_batch: int = 32
    bpd_tol: float = 1e-4
    langevin_snr: float = 0.01
    langevin_steps: int = 2
    # Used only for an untrained full model (see `choose_threshold`).
    fallback_cutoffs: tuple[float, float] = (0.5, 0.6)
    seed: int = 42

    @classmethod
    def for_mode(cls, mode: str) -> DemoSettings:
        """The settings of `full`, `quick` or `smoke` (see the module docstring)."""
        if mode == "full":
            # The full model at twice the subspace models' rate: the same bits/dim in 1600
            # steps as in 2400 at 1e-3 (README, "The 15-minute budget").
            return cls(mode, train=True, train_steps={32: 1600, 16: 800, 8: 800},
                       lr={32: 2e-3})
        if mode == "quick":
            return cls(mode, train=False, train_steps={}, divergence=False, bpd=False,
                       curve_steps=())
        if mode == "smoke":
            return cls(mode, train=True, train_steps={32: 4, 16: 4, 8: 4}, train_batch=4,
                       warmup=1, num_steps=25, num_samples=8, sample_batch=4,
                       curve_steps=(10, 25), bootstrap_resamples=20, grid_samples=4,
                       divergence_images=4, divergence_times=3, bpd_images=2, bpd_batch=2,
                       bpd_tol=1e-3)
        raise ValueError(f"Unknown demo mode '{mode}': choose one of {', '.join(MODES)}.")

    def learning_rate(self, image_size: int) -> float:
        """The learning rate of the model at `image_size`."""
        return float(self.lr.get(int(image_size), DEFAULT_LR))

    def training_key(self) -> dict:
        """The settings that determine the trained weights (a workdir keeps one set)."""
        return {"config": CONFIG_MODULE, "train_steps": {str(k): v for k, v in
                                                          self.train_steps.items()},
                "train_batch": self.train_batch,
                "lr": {str(k): self.learning_rate(k) for k in self.train_steps},
                "warmup": self.warmup,
                "subspace_min_time": self.subspace_min_time, "seed": self.seed}


# --------------------------------------------------------------------------------------------
# Configs, checkpoints, training.

def demo_config(image_size: int, settings: DemoSettings,
                device: torch.device | None = None) -> ml_collections.ConfigDict:
    """The small sub-VP DDPM++ config at `image_size` with the demo's training settings."""
    import importlib

    config = importlib.import_module(CONFIG_MODULE).get_config()
    config.data.image_size = int(image_size)
    steps = settings.train_steps.get(int(image_size), 1)
    config.training.update(n_iters=steps, snapshot_freq=steps, batch_size=settings.train_batch,
                           snapshot_freq_for_preemption=min(100, steps), log_freq=25,
                           eval_freq=max(steps, 1), snapshot_sampling=False)
    config.optim.update(lr=settings.learning_rate(image_size), warmup=settings.warmup)
    if int(image_size) < FULL_SIZE:
        config.training.min_time = settings.subspace_min_time
    config.model.num_scales = settings.num_steps
    config.seed = settings.seed
    config.device = device if device is not None else mutils.default_device()
    return config


def builtin_checkpoint_path(size: int, folder: Path = BUILTIN_CHECKPOINTS) -> Path:
    """Path of the committed EMA weights of the size-`size` model."""
    return Path(folder) / f"subvp_ddpmpp_small_{int(size)}.pth"


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


def obtain_models(settings: DemoSettings, workdir: Path, device: torch.device,
                  reuse_builtin: bool, progress: bool) -> dict[int, dict]:
    """Per size: the checkpoint to use, its config, and where it came from.

    With `reuse_builtin`, or in a mode that does not train, the committed weights are used.
    Otherwise a finished run in `workdir/models/size_S` is reused, or the model is trained with
    `run_lib.train` (which resumes an interrupted run of the same workdir), timed.
    """
    use_builtin = not settings.train or reuse_builtin
    if not use_builtin:
        _check_workdir(workdir, settings)
    models = {}
    for size in (FULL_SIZE,) + SUBSPACE_SIZES:
        config = demo_config(size, settings, device)
        run_dir = workdir / "models" / f"size_{size}"
        final = run_dir / "checkpoints" / "checkpoint_1.pth"
        builtin = builtin_checkpoint_path(size)
        if use_builtin:
            if not builtin.is_file():
                raise FileNotFoundError(
                    f"Committed checkpoint {builtin} does not exist: train the models with "
                    "`python demo.py --mode full` (add --export_assets to commit them).")
            models[size] = {"checkpoint": builtin,
                            "source": "committed (assets/checkpoints/builtin)"}
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


# --------------------------------------------------------------------------------------------
# Dataset statistics, divergence, cutoffs.

def compute_rmsd(config, workdir: Path, progress: bool) -> tuple[dict[int, float], Path]:
    """Downsampling RMSD r_k of the built-in training images (pixels in [0,1]) for 16 and 8,
    written to `workdir/subspace_rmsd.json` (the statistics file the plans of this run read)."""
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    table = rmsd_table(train_ds, SUBSPACE_SIZES, methods=("downsample",), progress=progress)
    values = {int(s): float(r) for s, r in table["rmsd"]["downsample"].items()}
    path = sl.write_rmsd(STATS_NAME, FULL_SIZE, values, workdir / "subspace_rmsd.json")
    return values, path


def divergence_floor(data: dict) -> float:
    """The smallest mean D_F over time of any size: the full network's own error on the
    orthogonal part, which D_F cannot resolve below (at high noise that part is Gaussian)."""
    floors = []
    for entry in data.values():
        _, means = cutoff_lib.mean_by_time(entry["t"], entry["err_norm"])
        finite = means[np.isfinite(means)]
        if finite.size:
            floors.append(float(finite.min()))
    if not floors:
        raise ValueError("The divergence has no finite value: check the model and the data.")
    return max(floors)


def choose_threshold(data: dict, paper_threshold: float, floor_factor: float,
                     untrained_floor: float) -> tuple[float | None, str]:
    """The D_F threshold of the cutoffs and why: the paper's when the model's D_F floor is
    well below it, else `floor_factor` times the floor (the cutoff is then where the
    non-Gaussian part of the orthogonal score is comparable to the network's own error there);
    None when the floor is so high that the network has not learned the orthogonal score."""
    floor = divergence_floor(data)
    if floor >= untrained_floor:
        return None, (f"the D_F floor {floor:.3g} shows an untrained network, so fixed cutoffs "
                      "are used")
    if floor_factor * floor <= paper_threshold:
        return paper_threshold, (f"D_F threshold {paper_threshold:g}, the paper's (the model's "
                                 f"D_F floor is {floor:.2g})")
    threshold = float(f"{floor_factor * floor:.2g}")
    return threshold, (f"D_F threshold {threshold:g} = {floor_factor:g} x the D_F floor "
                       f"{floor:.2g} of this small model (the paper's {paper_threshold:g} lies "
                       "below what its own error resolves)")


def divergence_and_cutoffs(full_net: torch.nn.Module, config, rmsd: dict[int, float],
                           settings: DemoSettings, workdir: Path, progress: bool) -> dict:
    """Orthogonal Fisher divergence of the full model on training images, cutoffs per standard
    threshold, and the chosen threshold and cutoffs (JSON, table and plot in `workdir`)."""
    from analysis.plots import plot_divergence, save_figure

    sde, _ = sde_lib.get_sde(config)
    score_fn = mutils.get_score_fn(sde, full_net, train=False, continuous=True)
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    data = fisher_divergence(score_fn, sde, train_ds, rmsd,
                             default_times(settings.divergence_times),
                             centered=bool(config.data.centered),
                             num_images=settings.divergence_images, seed=settings.seed,
                             device=config.device, progress=progress)
    atomic_write_text(workdir / "divergence.json", json.dumps(data))
    table = cutoff_lib.cutoff_table(data, cutoff_lib.DEFAULT_THRESHOLDS)
    threshold, rule = choose_threshold(data, settings.threshold, settings.floor_factor,
                                       settings.untrained_floor)
    chosen: dict[str, float | None] = {}
    if threshold is not None:
        for size, entry in data.items():
            chosen[size] = cutoff_lib.cutoff_time(entry["t"], entry["err_norm"], threshold)
    if threshold is None or any(v is None for v in chosen.values()):
        chosen = {str(s): t for s, t in zip(SUBSPACE_SIZES, settings.fallback_cutoffs)}
        rule += f"; cutoffs {list(settings.fallback_cutoffs)} (fixed fallback)"
    if any(t < settings.subspace_min_time for t in chosen.values()):
        chosen = {s: max(t, settings.subspace_min_time) for s, t in chosen.items()}
        rule += (f"; raised to at least {settings.subspace_min_time:g}, the smallest time the "
                 "subspace models were trained at")
    marks = {size: {repr(float(threshold)): t} for size, t in chosen.items()} if threshold \
        else None
    fig = plot_divergence(data, [threshold] if threshold else (), marks,
                          title=f"built-in 32x32, small sub-VP DDPM++, "
                                f"{settings.divergence_images} images")
    save_figure(fig, workdir / "divergence.png")
    means = {}
    for size, entry in data.items():
        times, values = cutoff_lib.mean_by_time(entry["t"], entry["err_norm"])
        means[size] = {f"{t:g}": (float(v) if math.isfinite(v) else None)
                       for t, v in zip(times, values)}
    return {"table": table, "threshold": threshold, "rule": rule,
            "cutoffs": {str(s): float(t) for s, t in chosen.items()}, "mean_divergence": means,
            "images": settings.divergence_images, "times": settings.divergence_times}


# --------------------------------------------------------------------------------------------
# Costs, sampling, likelihood.

class ForwardTimer:
    """Within a `with` block, the wall-clock and CPU seconds spent inside each network's forward
    passes (module hooks, so the samplers run unchanged), and the number of passes; in total
    and per `label` (set it to name whoever is calling the networks, e.g. the sampler)."""

    def __init__(self, networks: dict[int, torch.nn.Module]):
        self.networks = networks
        self.totals = _zero_totals(networks)
        self.label: Hashable | None = None
        self.by_label: dict[Hashable, dict[str, dict]] = {}
        self._handles: list = []

    def __enter__(self) -> ForwardTimer:
        for size, net in self.networks.items():
            started: list[tuple[float, float]] = []
            total = self.totals[str(size)]

            def before(module, inputs, started=started):
                started.append((time.perf_counter(), time.process_time()))

            def after(module, inputs, output, started=started, total=total, size=str(size)):
                wall, cpu = started.pop()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                mine = [total]
                if self.label is not None:
                    mine.append(self.by_label.setdefault(
                        self.label, _zero_totals(self.networks))[size])
                for t in mine:
                    t["seconds"] += wall
                    t["cpu_seconds"] += cpu
                    t["calls"] += 1

            self._handles += [net.register_forward_pre_hook(before),
                              net.register_forward_hook(after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def costs(self, batch: int, label: Hashable | None = None) -> dict[str, dict]:
        """Per size: mean wall-clock and CPU seconds of one forward pass, the number of passes
        and the batch they were made on; over all passes, or over those made under `label`
        (sizes that it never called are left out)."""
        if label is None:
            totals = self.totals
        else:
            totals = {size: t for size, t in self.by_label.get(label, {}).items() if t["calls"]}
        return {size: {"seconds": t["seconds"] / max(t["calls"], 1),
                       "cpu_seconds": t["cpu_seconds"] / max(t["calls"], 1),
                       "calls": t["calls"], "batch": batch} for size, t in totals.items()}


def _zero_totals(networks: dict) -> dict[str, dict]:
    return {str(size): {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0} for size in networks}


def _sampler_kwargs(config) -> dict:
    return dict(predictor=config.sampling.predictor, corrector=config.sampling.corrector,
                snr=config.sampling.snr, n_steps_each=config.sampling.n_steps_each)


def sde_with_steps(config, num_steps: int) -> tuple[sde_lib.SDE, float]:
    """The config's SDE discretised with `num_steps` steps N (the networks do not depend on N)."""
    cfg = copy.deepcopy(config)
    cfg.model.num_scales = int(num_steps)
    return sde_lib.get_sde(cfg)


def sample_full_only(full_net, config, batch: int, num_steps: int, seed: int, progress: bool
                     ) -> tuple[torch.Tensor, dict]:
    """One batch of N-step PC sampling (the config's predictor/corrector), full network only,
    from the prior and increments of `sampling.CommonNoise(seed)`."""
    sde, eps = sde_with_steps(config, num_steps)
    device = config.device
    score_fn = mutils.get_score_fn(sde, full_net, train=False, continuous=True)
    noise = sampling.CommonNoise(seed, (batch, 3, FULL_SIZE, FULL_SIZE))
    torch.manual_seed(seed)
    began = time.perf_counter()
    cpu0 = time.process_time()
    x = noise.prior().to(device=device, dtype=torch.float32)
    x, _, nfe = sampling.pc_sample_window(score_fn, sde, x, sde.T, eps, sde.N,
                                          probability_flow=False, denoise=True,
                                          progress=progress, desc=f"full only, N = {sde.N}",
                                          eps=eps, noise=noise, **_sampler_kwargs(config))
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu0
    return x, {"nfe": {str(FULL_SIZE): nfe}, "steps": {str(FULL_SIZE): sde.N},
               "seconds": seconds, "cpu_seconds": cpu, "stages": []}


def sample_subspace(networks: dict[int, torch.nn.Module], config, sizes: Sequence[int],
                    cutoffs: dict[int, float], stats_path: Path, settings: DemoSettings,
                    batch: int, num_steps: int, seed: int, progress: bool
                    ) -> tuple[torch.Tensor, dict]:
    """One batch of N-step subspace diffusion sampling (`subspace_sampling.subspace_pc_sample`)
    with the plan `sizes` at the given cutoffs, conditional Langevin after each upsampling; its
    prior and increments are the subspace parts of `sample_full_only`'s with the same seed
    (`sampling.CommonNoise`), its upsampling and Langevin noise its own."""
    sde, eps = sde_with_steps(config, num_steps)
    plan = sl.SubspacePlan.from_statistics(FULL_SIZE, tuple(sizes),
                                           tuple(cutoffs[s] for s in sizes), STATS_NAME,
                                           stats_path)
    nets = [networks[FULL_SIZE]] + [networks[s] for s in sizes]
    shape = (batch, 3, FULL_SIZE, FULL_SIZE)
    noise = sampling.CommonNoise(seed, shape)
    prior = noise.prior(plan.halvings_of(plan.num_levels))
    torch.manual_seed(seed)
    cpu0 = time.process_time()
    x, reports = subspace_pc_sample(
        nets, sde, plan, bool(config.data.centered), shape, eps=eps, probability_flow=False,
        continuous=True, denoise=True, langevin_snr=settings.langevin_snr,
        langevin_steps=settings.langevin_steps,
        x=prior.to(device=config.device, dtype=torch.float32), device=config.device,
        progress=progress, noise=noise, **_sampler_kwargs(config))
    cpu = time.process_time() - cpu0
    nfe: dict[str, int] = {}
    steps: dict[str, int] = {}
    for report in reports:
        nfe[str(report.size)] = nfe.get(str(report.size), 0) + report.nfe
        steps[str(report.size)] = steps.get(str(report.size), 0) + report.steps
    return x, {"nfe": nfe, "steps": steps, "seconds": sum(r.seconds for r in reports),
               "cpu_seconds": cpu, "plan": plan.describe(),
               "stages": [_stage_dict(r) for r in reports]}


def draw_samples(networks: dict[int, torch.nn.Module], config,
                 samplers: dict[str, Sequence[int]], cutoffs: dict[int, float],
                 stats_path: Path, settings: DemoSettings, num_steps: int,
                 progress: bool, timer: ForwardTimer | None = None
                 ) -> dict[str, tuple[np.ndarray, dict]]:
    """`settings.num_samples` samples (uint8 NHWC) of each sampler (name -> subspace sizes of
    its plan, empty for full only) at N = `num_steps`, drawn in batches of
    `settings.sample_batch`: batch b is seeded with seed + b, and every sampler of a batch
    draws its prior and increments from the same `sampling.CommonNoise` (common random
    numbers), so that they differ by what they do, not by their noise. The samplers take turns
    batch by batch, so that a drift of the machine's speed hits them alike. Network
    evaluations are per batch; times are summed. A `timer` files each sampler's network calls
    under the label (name, num_steps)."""
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    batches = -(-settings.num_samples // settings.sample_batch)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in samplers}
    infos: dict[str, dict] = {}
    for b in range(batches):
        batch = min(settings.sample_batch, settings.num_samples - b * settings.sample_batch)
        seed = settings.seed + b
        for name, sizes in samplers.items():
            if timer is not None:
                timer.label = (name, int(num_steps))
            if sizes:
                x, part = sample_subspace(networks, config, sizes, cutoffs, stats_path,
                                          settings, batch, num_steps, seed, progress)
            else:
                x, part = sample_full_only(networks[FULL_SIZE], config, batch, num_steps, seed,
                                           progress)
            if timer is not None:
                timer.label = None
            chunks[name].append(evaluation.to_uint8_nhwc(inverse_scaler(x).clamp(0, 1).cpu()))
            if name not in infos:
                infos[name] = part
            else:
                infos[name]["seconds"] += part["seconds"]
                infos[name]["cpu_seconds"] += part["cpu_seconds"]
    for info in infos.values():
        info.update(batches=batches, sample_batch=settings.sample_batch,
                    num_steps=int(num_steps))
    return {name: (np.concatenate(chunks[name]), infos[name]) for name in samplers}


def _stage_dict(report: StageReport) -> dict:
    return {"size": report.size, "t_start": report.t_start, "t_end": report.t_end,
            "steps": report.steps, "nfe": report.nfe, "langevin_nfe": report.langevin_nfe,
            "seconds": report.seconds}


def speedups(result: dict, baseline: dict, costs: dict[str, dict]) -> dict[str, float]:
    """Speed-ups of a sampler over the full-only one: achieved (wall clock); ideal from the
    per-evaluation costs `costs` measured over the whole run; ideal from the costs measured in
    each sampler's own calls (its "network_cost" entry, when present), which a drift of the
    machine's speed between the samplers' turns moves as it moves their times; and ideal if a
    call cost its share of the pixels."""
    def weighted(nfe: dict[str, int], cost: Callable[[str], float]) -> float:
        return sum(n * cost(size) for size, n in nfe.items())

    def measured(size: str) -> float:
        return costs[size]["seconds"]

    def pixels(size: str) -> float:
        return (int(size) / FULL_SIZE) ** 2

    out = {"achieved": baseline["seconds"] / result["seconds"],
           "ideal_measured_cost": weighted(baseline["nfe"], measured)
           / weighted(result["nfe"], measured),
           "ideal_pixel_cost": weighted(baseline["nfe"], pixels) / weighted(result["nfe"], pixels)}
    if "network_cost" in result and "network_cost" in baseline:
        out["ideal_own_cost"] = (
            weighted(baseline["nfe"], lambda size: baseline["network_cost"][size]["seconds"])
            / weighted(result["nfe"], lambda size: result["network_cost"][size]["seconds"]))
    return out


def bits_per_dim(model: torch.nn.Module, config, settings: DemoSettings, progress: bool
                 ) -> tuple[np.ndarray, dict]:
    """Bits/dim of the first `bpd_images` images of the test split (seeded order, uniform
    dequantization, seeded Hutchinson noise) through `model` by the probability-flow ODE (RK45
    at rtol = atol = `bpd_tol`): the per-image values and a summary."""
    import copy

    sde, _ = sde_lib.get_sde(config)
    cfg = copy.deepcopy(config)
    cfg.eval.batch_size = settings.bpd_batch
    cfg.eval.bpd_dataset = "test"
    likelihood_fn = likelihood.get_likelihood_fn(
        sde, datasets.get_data_inverse_scaler(cfg), rtol=settings.bpd_tol, atol=settings.bpd_tol)
    batches = -(-settings.bpd_images // settings.bpd_batch)
    torch.manual_seed(settings.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    bpds, ode_nfe = run_lib.compute_bpd(likelihood_fn, model, cfg, datasets.get_data_scaler(cfg),
                                        cfg.device, num_repeats=1, progress=progress,
                                        max_batches=batches)
    bpds = bpds[: settings.bpd_images].astype(np.float64)
    return bpds, {"bpd": float(bpds.mean()),
                  "std_error": (float(bpds.std(ddof=1) / math.sqrt(len(bpds)))
                                if len(bpds) > 1 else float("nan")),
                  "images": int(len(bpds)), "ode_nfe": int(ode_nfe),
                  "seconds": time.perf_counter() - wall0,
                  "cpu_seconds": time.process_time() - cpu0}


# --------------------------------------------------------------------------------------------
# Outputs.

def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(mutils.default_device())}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def warn_if_busy(machine: dict) -> None:
    """Say so when other work competes for the cores: the demo's timings (and speed-ups) are
    then slower and noisier, and fewer torch threads often run faster."""
    load = (machine.get("load_average_at_start") or [0.0])[0]
    cores = machine.get("logical_cpus") or 1
    if load > 0.5 * cores:
        print(f"note: the machine is busy (load average {load:.1f} on {cores} logical CPUs): "
              "timings will be slower and noisier than on an idle machine; with other jobs "
              "running, `--threads 1` is often faster (make demo DEMO_ARGS=\"--threads 1\").",
              flush=True)


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


# --------------------------------------------------------------------------------------------
# The whole run.

def plans(cutoffs: dict[int, float]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The samplers that the cutoffs allow, and why any other was left out (a nested plan
    needs the 8x8 cutoff after the 16x16 one)."""
    chosen, skipped = {}, {}
    for name, sizes in SAMPLERS.items():
        times = [cutoffs[s] for s in sizes]
        if all(a < b for a, b in zip(times, times[1:])):
            chosen[name] = sizes
        else:
            skipped[name] = (f"cutoffs {times} for sizes {list(sizes)} do not increase, so the "
                             "smaller level would never run")
    return chosen, skipped


def held_out_images(config, count: int) -> torch.Tensor:
    """The first `count` images of the test split (seeded order), float NCHW in [0, 1]."""
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    batches, total = [], 0
    for batch in eval_ds:
        batches.append(batch["image"])
        total += len(batch["image"])
        if total >= count:
            break
    return torch.cat(batches)[:count]


def training_features(config) -> np.ndarray:
    """Proxy features of every training image (the reference set of the proxy KID)."""
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    return np.concatenate([evaluation.proxy_features(batch["image"]) for batch in train_ds])


def _quality_entry(uint8: np.ndarray, proxy_stats: dict, reference: np.ndarray,
                   settings: DemoSettings) -> dict:
    quality = evaluation.proxy_quality(uint8, proxy_stats, reference,
                                       settings.bootstrap_resamples, seed=settings.seed)
    return {"proxy_fid": quality["fid"]["value"],
            "proxy_fid_interval": [quality["fid"]["low"], quality["fid"]["high"]],
            "proxy_kid": quality["kid"]["value"],
            "proxy_kid_std_error": quality["kid"]["std_error"],
            "num_samples": quality["fid"]["samples"]}


def _title(name: str, info: dict) -> str:
    nfe = info["nfe"]
    return (f"{name}: {nfe.get(str(FULL_SIZE), 0)} full"
            + "".join(f" + {nfe[k]} {k}x{k}" for k in ("16", "8") if k in nfe)
            + f" evals\n{info['seconds']:.1f} s, proxy FID {info['proxy_fid']:.1f}")


def sampling_phase(networks: dict[int, torch.nn.Module], config, cutoffs: dict[int, float],
                   stats_path: Path, settings: DemoSettings, workdir: Path,
                   progress: bool) -> dict:
    """Every sampler at N = num_steps (the table) and at each N of the quality-against-cost
    curve, interleaved (N outer, then batch, then sampler) so that a change of machine load
    hits every sampler alike; proxy FID with bootstrap interval and proxy KID of each, and of
    as many held-out images (the floor); the per-evaluation cost of each network, timed
    inside the samplers' calls; the grids and figures. Returns the results entries."""
    # The cost of one evaluation of each network is timed inside the samplers' own calls, so
    # that it sees the inputs and the machine as they did.
    timer = ForwardTimer({s: networks[s] for s in (FULL_SIZE,) + SUBSPACE_SIZES})
    proxy_stats = evaluation.load_dataset_stats(config, "proxy")
    reference = training_features(config)
    held_out = held_out_images(config, settings.num_samples)
    floor = _quality_entry(evaluation.to_uint8_nhwc(held_out), proxy_stats, reference, settings)
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
            info.update(_quality_entry(uint8, proxy_stats, reference, settings))
            curve[name][str(num_steps)] = {k: info[k] for k in (
                "nfe", "seconds", "proxy_fid", "proxy_fid_interval", "proxy_kid",
                "proxy_kid_std_error")}
            if num_steps == settings.num_steps:
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

    panels = [(f"held-out data\nproxy FID {floor['proxy_fid']:.1f}",
               held_out[: settings.grid_samples])]
    for name, info in samplers.items():
        grid = images[name][: settings.grid_samples]
        panels.append((_title(name, info), grid))
        save_image_grid(grid, workdir / "samples" / f"{_slug(name)}.png")
    save_sample_figure(panels, workdir / "samples.png")
    if len(settings.curve_steps) > 1:
        save_quality_cost_figure(curve, floor, workdir / "quality_cost.png")
    return {"network_cost": costs, "samplers": samplers, "skipped_samplers": skipped,
            "data_proxy_fid": floor["proxy_fid"], "data_quality": floor,
            "quality_cost": curve}


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


def claim_checks(results: dict) -> list[dict]:
    """The demo's claims, each with its measured value and whether it holds: full-only proxy
    FID at most 2x the held-out floor; each subspace sampler inside the full-only bootstrap
    interval or better, and at most 1.15x its proxy FID; bits/dim within 0.05 of the full
    model's; achieved speed-up at least 97 % of the ideal from the measured costs."""
    checks = []
    samplers = results["samplers"]
    full = samplers.get("full only")
    if full is None:
        return checks
    floor = results["data_proxy_fid"]
    checks.append({"claim": "full-only proxy FID <= 2x held-out floor",
                   "value": f"{full['proxy_fid']:.1f} vs {2 * floor:.1f}",
                   "holds": full["proxy_fid"] <= 2 * floor})
    for name, info in samplers.items():
        if name == "full only":
            continue
        ratio = info["proxy_fid"] / full["proxy_fid"]
        inside = info["proxy_fid"] <= full["proxy_fid_interval"][1]
        checks.append({"claim": f"{name}: proxy FID within the full-only interval or better, "
                                "and <= 1.15x full-only",
                       "value": f"{info['proxy_fid']:.1f} (full-only interval "
                                f"{full['proxy_fid_interval'][0]:.1f}-"
                                f"{full['proxy_fid_interval'][1]:.1f}), ratio {ratio:.2f}",
                       "holds": bool(inside and ratio <= 1.15)})
        sp = info["speedup"]
        pooled = sp["achieved"] / sp["ideal_measured_cost"]
        if "ideal_own_cost" in sp:
            share = sp["achieved"] / sp["ideal_own_cost"]
            value = (f"{sp['achieved']:.2f}x of {sp['ideal_own_cost']:.2f}x at the costs of "
                     f"its own calls ({100 * share:.0f} %); {sp['ideal_measured_cost']:.2f}x at "
                     f"the run's mean costs ({100 * pooled:.0f} %)")
        else:
            share = pooled
            value = (f"{sp['achieved']:.2f}x of {sp['ideal_measured_cost']:.2f}x "
                     f"({100 * share:.0f} %)")
        checks.append({"claim": f"{name}: achieved speed-up >= 97 % of the ideal",
                       "value": value, "holds": share >= 0.97})
        b = results.get("bpd", {}).get(name)
        if b is not None and "difference_to_full" in b:
            checks.append({"claim": f"{name}: bits/dim within 0.05 of the full model's",
                           "value": f"{b['difference_to_full']:+.4f} ± "
                                    f"{b['difference_std_error']:.4f}",
                           "holds": abs(b["difference_to_full"]) <= 0.05})
    return checks


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
                                         [cutoffs[s] for s in sizes], STATS_NAME,
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


def run_demo(settings: DemoSettings, workdir: str | os.PathLike, reuse_builtin: bool = False,
             export_assets: bool = False, progress: bool = True,
             device: torch.device | None = None) -> dict:
    """Run the demo in `workdir` and return the results (also written as results.json/.md)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    device = device if device is not None else mutils.default_device()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    phases: dict[str, float] = {}
    results: dict = {"mode": settings.mode, "machine": machine_info(),
                     "settings": {**dataclasses.asdict(settings), "config": CONFIG_MODULE}}
    warn_if_busy(results["machine"])

    began = time.perf_counter()
    models = obtain_models(settings, workdir, device, reuse_builtin, progress)
    phases["training"] = time.perf_counter() - began
    results["training"] = {str(s): {k: (str(v) if isinstance(v, Path) else v)
                                    for k, v in info.items() if k != "config"}
                           for s, info in models.items()}
    networks = load_networks(models)
    config = models[FULL_SIZE]["config"]

    print("== RMSD of the training images to the 16x16 and 8x8 subspaces", flush=True)
    began = time.perf_counter()
    rmsd, stats_path = compute_rmsd(config, workdir, progress)
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
        manifest = read_manifest()
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


def _slug(name: str) -> str:
    return name.replace(",", "").replace(" ", "_")


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def read_manifest(folder: Path = BUILTIN_CHECKPOINTS) -> dict:
    """The manifest of the committed checkpoints (how they were produced, their cutoffs)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: produce the committed checkpoints with `python demo.py "
            "--mode full --export_assets`.")
    return json.loads(path.read_text())


def export(results: dict, models: dict[int, dict], workdir: Path,
           folder: Path = BUILTIN_CHECKPOINTS, assets: Path = DEMO_ASSETS) -> None:
    """Copy the EMA weights (bare state dicts), their manifest, and the results table and
    figures of this run into the repository's assets."""
    import shutil

    if results["mode"] != "full":
        raise ValueError("Only a full-mode run may replace the committed assets: run "
                         "`python demo.py --mode full --export_assets`.")
    files = {}
    for size, info in models.items():
        out = export_ema_weights(info["checkpoint"], info["config"], builtin_checkpoint_path(
            size, folder))
        files[str(size)] = {"file": out.name, "sha256": _sha256(out),
                            "bytes": out.stat().st_size, "source": info["source"],
                            "steps": info.get("steps")}
    manifest = {"config": CONFIG_MODULE, "command": "python demo.py --mode full --export_assets",
                "training": results["settings"]["train_steps"], "files": files,
                "cutoffs": results["cutoffs"], "rmsd": results["rmsd"]}
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    assets.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "results.md", "samples.png", "divergence.png",
                 "quality_cost.png"):
        if (workdir / name).is_file():
            with atomic_write(assets / name, "wb") as handle:
                with open(workdir / name, "rb") as source:
                    shutil.copyfileobj(source, handle)
