"""Subspace sampling and inpainting runs behind `subspace_sample.py` and
`subspace_inpainting.py` (the sibling of `run_lib`, which serves `main.py`).

The entry scripts parse and check their flags and call `sample` or `inpaint` with explicit
arguments; everything after that (the plan from the dataset statistics, loading the networks, the
resumable rounds, metrics, the inpainting grid) happens here.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import controllable_generation as cg
import datasets
import distributed
import evaluation
import sample_settings
import sampling
import sde_lib
import solvers
import subspace_lib as sl
from files import save_image_grid
from models import utils as mutils
from models.checkpoints import load_model_weights
from models.subspace_model import SubspaceScore, subspace_configs
from sample_rounds import Round, RoundSampler, check_finite
from subspace_sampling import (
    StageReport,
    check_split,
    format_stage_reports,
    subspace_pc_sample,
    subspace_solver_sample,
)

logger = logging.getLogger(__name__)

# The reference script's final sampling time, for every SDE.
LEGACY_EPS = 1e-5


def load_networks(config, plan: sl.SubspacePlan, ckpt_full: str | os.PathLike,
                  ckpt_subspace: Sequence[str | os.PathLike]) -> list[torch.nn.Module]:
    """The full network and one network per plan size, with their EMA weights, in eval mode."""
    networks = [load_model_weights(mutils.create_model(config), ckpt_full)]
    networks += [load_model_weights(mutils.create_model(cfg), path)
                 for cfg, path in zip(subspace_configs(config, plan.sizes), ckpt_subspace)]
    return networks


def _add_reports(totals: list[StageReport] | None,
                 reports: list[StageReport]) -> list[StageReport]:
    """Per-stage sums of network evaluations, steps and seconds over rounds."""
    if totals is None:
        return reports
    for total, report in zip(totals, reports):
        total.nfe += report.nfe
        total.langevin_nfe += report.langevin_nfe
        total.steps += report.steps
        total.seconds += report.seconds
    return totals


def sample(config, sizes: Sequence[int], cutoffs: Sequence[float], ckpt_full: str,
           ckpt_subspace: Sequence[str], eval_folder: str | os.PathLike, save_name: str,
           number_samples: int, batch: int, *, dataset: str | None = None,
           sampler: str = "pc", steps: int | None = None, eps: float | None = None,
           legacy: bool = False, langevin_steps: int = 2, langevin_snr: float = 0.22,
           conditional_langevin: bool = True, legacy_langevin: bool = False,
           seed: int | None = None, progress: bool = True) -> np.ndarray | None:
    """Sample by subspace diffusion (Jing et al. 2022, Algorithm 1 with nested subspaces) and
    save uint8 NHWC samples to EVAL_FOLDER/SAVE_NAME.npy; print the per-stage network
    evaluations and the metrics when the dataset's statistics exist.

    Rounds of `batch` samples (the last one cut to give `number_samples`) go to
    EVAL_FOLDER/SAVE_NAME/samples_{r}.npz through the resumable round sampler, round r seeded
    with `seed + r` (default seed: config.seed). `sampler` is "pc" (the paper's, N =
    model.num_scales steps; `legacy` reproduces the reference script), "ode" (RK45) or a
    few-step solver of `solvers.SOLVERS` with `steps` over all stages (default:
    config.sampling.steps). `eps` defaults to 1e-5 with `legacy`, else the SDE's. Returns the
    samples on rank 0 and None on other ranks.
    """
    network_options = dict(
        precision=mutils.check_precision_setting(config.sampling.get("precision", "fp32"),
                                                 mutils.config_device(config)),
        compile=config.sampling.get("compile", False))
    steps = steps if steps is not None else config.sampling.get("steps")
    # Steps, schedule and solver options, before the settings file or any network.
    sampling.check_sampling_config(config, method=sampler, steps=steps)
    dataset = sl.stats_name_from_flag(dataset, config)
    plan = sl.SubspacePlan.from_statistics(config.data.image_size, sizes, cutoffs, dataset)
    evaluation.inception_choice(config)  # a bad eval.inception fails before any sampling
    sde, default_eps = sde_lib.get_sde(config)
    if eps is None:
        eps = LEGACY_EPS if legacy else default_eps
    seed = config.seed if seed is None else seed
    main = distributed.is_main_process()
    folder = Path(eval_folder) / save_name
    settings = {
        "command": "subspace_sample", "config": sample_settings.config_digest(config),
        "plan": {"full_size": plan.full_size, "sizes": list(plan.sizes),
                 "cutoffs": list(plan.cutoffs), "rmsds": list(plan.rmsds)},
        "ckpt_full": sample_settings.checkpoint_entries([ckpt_full])[0],
        "ckpt_subspace": sample_settings.checkpoint_entries(ckpt_subspace),
        "sampler": {"eps": eps, "langevin_snr": langevin_snr, "langevin_steps": langevin_steps,
                    "conditional_langevin": conditional_langevin,
                    "legacy_langevin": legacy_langevin, "legacy": legacy, "method": sampler,
                    "steps": steps, **network_options},
        "seed": seed, "batch": batch}
    if sampler in solvers.SOLVERS:
        check_split(config.sampling.get("split"))  # before any file is written
    size, channels = config.data.image_size, config.data.num_channels
    rounds = RoundSampler(folder, number_samples, batch, lambda r: seed + r, settings,
                          output=folder.with_name(f"{save_name}.npy"),
                          image_shape=(size, size, channels), count_name="--number_samples")
    networks = load_networks(config, plan, ckpt_full, ckpt_subspace)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    logger.info("Plan %s.", plan.describe())
    common = dict(continuous=config.training.continuous, denoise=config.sampling.noise_removal,
                  langevin_snr=langevin_snr, langevin_steps=langevin_steps,
                  conditional_langevin_steps=conditional_langevin,
                  legacy_langevin=legacy_langevin, device=config.device,
                  progress=progress and main)
    if sampler == "pc":
        sample_fn = dict(
            function=subspace_pc_sample, predictor=config.sampling.predictor,
            corrector=config.sampling.corrector, snr=config.sampling.snr,
            n_steps_each=config.sampling.n_steps_each,
            probability_flow=config.sampling.probability_flow, legacy=legacy)
    else:
        options = (solvers.solver_options(sampler, config.sampling) if sampler in solvers.SOLVERS
                   else dict(rtol=config.sampling.get("rtol", 1e-5),
                             atol=config.sampling.get("atol", 1e-5)))
        sample_fn = dict(function=subspace_solver_sample, method=sampler, steps=steps,
                         schedule=config.sampling.get("schedule"),
                         split=config.sampling.get("split"), **options)

    source = "from " + ", ".join(map(str, [ckpt_full, *ckpt_subspace]))

    def draw(r: int, count: int) -> Round:
        # The last round draws only the samples still missing.
        kwargs = dict(sample_fn)
        function = kwargs.pop("function")
        with mutils.network_options(**network_options):
            x, reports = function(networks, sde, plan, config.data.centered,
                                  (count, channels, size, size), eps=eps, **kwargs, **common)
        check_finite(x, r, source)
        return Round(evaluation.to_uint8_nhwc(inverse_scaler(x).cpu()), info=reports)

    result = rounds.run(draw)
    if not main:
        return None
    totals = None
    for _, reports in result.drawn:
        totals = _add_reports(totals, reports)
    if totals is not None:
        world = distributed.get_world_size()
        print(f"Network evaluations and time per stage, {len(result.drawn)} round(s)"
              + (f" over {world} processes (seconds summed):" if world > 1 else ":"))
        print(format_stage_reports(totals))
    metrics = evaluation.evaluate_samples(result.samples, config, progress=progress)
    if metrics:
        print(f"metrics over {len(result.samples)} samples: " + " ".join(
            f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}"
            for key, value in metrics.items()))
    return result.samples


def inpaint(config, sizes: Sequence[int], cutoff_columns: Sequence[Sequence[float]],
            ckpt_full: str, ckpt_subspace: Sequence[str], image_path: str | os.PathLike,
            rows: int, mask: str = "right_half", *, dataset: str | None = None,
            seed: int | None = None, progress: bool = True) -> torch.Tensor:
    """Inpaint the first `rows` evaluation images through the implicit subspace score (the
    conditional PC sampler of Song et al. 2021, App. I, on `SubspaceScore`) once per cutoff
    column, and save the grid (original, masked input, one inpainting per column) as a PNG at
    `image_path`; every column starts from `seed` (default config.seed). Returns the grid's
    images (NCHW in [0, 1])."""
    dataset = sl.stats_name_from_flag(dataset, config)
    plans = [sl.SubspacePlan.from_statistics(config.data.image_size, sizes, column, dataset)
             for column in cutoff_columns]
    config.eval.batch_size = rows
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    images = next(iter(eval_ds))["image"][:rows]
    if len(images) < rows:
        raise ValueError(f"--batch_size {rows} asks for more rows than the evaluation set's "
                         f"{len(images)} images; use --batch_size {len(images)} or less.")
    sde, eps = sde_lib.get_sde(config)
    device = mutils.config_device(config)
    images = images.to(device)
    full, *subs = load_networks(config, plans[0], ckpt_full, ckpt_subspace)
    region = cg.inpainting_mask(mask, images.shape).to(device)
    scaler = datasets.get_data_scaler(config)
    inpainter = cg.get_pc_inpainter(
        sde, config.sampling.predictor, config.sampling.corrector,
        datasets.get_data_inverse_scaler(config), snr=config.sampling.snr,
        n_steps=config.sampling.n_steps_each, probability_flow=config.sampling.probability_flow,
        continuous=config.training.continuous, denoise=config.sampling.noise_removal, eps=eps,
        progress=progress)
    seed = config.seed if seed is None else seed

    columns = [images.cpu(), (images * region).cpu()]
    for plan in plans:
        model = SubspaceScore(sde, full, subs, plan, config.data.centered)
        torch.manual_seed(seed)
        columns.append(inpainter(model, scaler(images), region).cpu())
        counts = ", ".join(f"{size}x{size} network {n}"
                           for size, n in zip(plan.sizes, model.nfe_subspace))
        print(f"cutoff {','.join(f'{t:g}' for t in plan.cutoffs)}: full network "
              f"{model.nfe_full}, {counts} evaluations")
    grid = torch.stack(columns, dim=1).flatten(0, 1).clamp(0, 1)
    save_image_grid(grid, image_path, nrow=len(columns))
    logger.info("Saved %d x %d grid to %s.", len(images), len(columns), image_path)
    return grid
