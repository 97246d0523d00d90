r"""Subspace sampling from the command line (Jing et al. 2022).

    python subspace_sample.py --config configs/ve/cifar10_ncsnpp_continuous.py --dataset cifar \
        --subspace 16 --time 0.5 --langevin_snr 0.22 --ckpt_subspace SUB.pth --ckpt_full FULL.pth \
        --eval_folder samples --save_name run1

Several nested levels: `--subspace 16,8 --time 0.5,0.6 --ckpt_subspace S16.pth,S8.pth`. Few-step
ODE solvers per stage: `--sampler heun --steps 18` (or dpm_solver, ddim; `ode` is RK45). Samples
(uint8 NHWC) are saved to EVAL_FOLDER/SAVE_NAME.npy after every round, so an interrupted run
resumes where it stopped; FID/IS/KID are computed when the dataset's statistics exist.
"""
from __future__ import annotations

import glob
import logging
from pathlib import Path

from absl import flags
from ml_collections.config_flags import config_flags

import cli
from cli import UsageError, run_entry_point

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", "configs/ve/cifar10_ncsnpp_continuous.py", "Configuration of the full model "
    "(subspace models use it with data.image_size set to their size).", lock_config=True)
flags.DEFINE_string("eval_folder", None, "Folder for the samples.")
flags.DEFINE_string("save_name", None, "Samples are saved as EVAL_FOLDER/SAVE_NAME.npy.")
flags.DEFINE_integer("number_samples", 50000, "Number of samples.")
flags.DEFINE_integer("batch", 1000, "Batch size (samples per round).")
flags.DEFINE_integer("langevin_steps", 2, "Langevin steps after each upsampling.")
flags.DEFINE_boolean("conditional_langevin", True,
                     "Move only the newly added band in the Langevin steps after upsampling.")
flags.DEFINE_float("langevin_snr", 0.22, "Signal-to-noise ratio of the Langevin steps after "
                   "upsampling.")
flags.DEFINE_string("time", "0.5", "Cutoff time(s), one per subspace size, e.g. 0.5 or 0.5,0.6.")
flags.DEFINE_string("subspace", "16", "Subspace size(s), e.g. 16 or 16,8.")
flags.DEFINE_string("ckpt_subspace", None, "Subspace checkpoint(s), one per size, comma list.")
flags.DEFINE_string("ckpt_full", None, "Full model checkpoint.")
flags.DEFINE_string("dataset", None, "Name of the RMSD statistics (cifar, celeba, church, "
                    "builtin, ...); default: the config's dataset.")
flags.DEFINE_boolean("legacy_langevin", False, "Reproduce the reference code: the Langevin steps "
                     "after upsampling get the raw network as their score.")
flags.DEFINE_boolean("legacy", False, "Reproduce the reference script exactly: its per-window "
                     "grids (int(N (start - end)) steps each, the cutoff time evaluated by both "
                     "windows), eps 1e-5 for every SDE, upsampling noise at the cutoff, "
                     "--legacy_langevin with alpha = 1, the sub-VP CIFAR-10 offsets.")
flags.DEFINE_enum("sampler", "pc",
                  ["pc", "ode", "heun", "dpm_solver", "sde_dpm_solver", "ddim"],
                  "Sampler of every plan stage: PC (N = model.num_scales steps, the paper's), "
                  "adaptive RK45 ('ode'), or a few-step solver (sde_dpm_solver: stochastic).")
flags.DEFINE_integer("steps", None, "Solver steps over all stages, the last being the "
                     "denoising step (heun, dpm_solver, sde_dpm_solver, ddim); default: "
                     "config.sampling.steps, else the solver's default.")
flags.DEFINE_float("eps", None, "Final sampling time; default: 1e-5 (VE, and every SDE with "
                   "--legacy) or 1e-3 (VP, sub-VP).")
flags.DEFINE_integer("seed", None, "Random seed (round r uses seed + r); default: config.seed.")
flags.DEFINE_boolean("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["eval_folder", "save_name", "ckpt_subspace", "ckpt_full"])

# The reference script's final sampling time, for every SDE.
LEGACY_EPS = 1e-5


def _existing_samples(path: Path, batch: int, number: int, image_shape: tuple[int, int, int]):
    """Samples saved by an earlier run with the same settings (or None), cut to whole rounds
    when this run needs more: the earlier run's last round was cut to its own sample count."""
    import numpy as np

    if not path.is_file():
        return None
    try:
        done = np.load(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{path} is not a readable .npy sample file ({error}): choose another "
                         "--save_name or delete it.") from None
    if done.ndim != 4 or tuple(done.shape[1:]) != image_shape or done.dtype != np.uint8:
        raise UsageError(
            f"{path} holds samples of shape {done.shape} ({done.dtype}), not uint8 "
            f"[N, {', '.join(map(str, image_shape))}]: choose another --save_name or delete it.")
    if len(done) < number:
        done = done[: len(done) // batch * batch]
    return done


def check_flags(full_size: int) -> tuple[tuple[int, ...], tuple[float, ...], list[str]]:
    """Check every flag before anything expensive; returns sizes, cutoff times, checkpoints."""
    cli.check_range(FLAGS.number_samples, "--number_samples", low=1)
    cli.check_range(FLAGS.batch, "--batch", low=1)
    cli.check_range(FLAGS.langevin_steps, "--langevin_steps", low=0)
    cli.check_range(FLAGS.langevin_snr, "--langevin_snr", low=0, low_open=True)
    cli.check_range(FLAGS.eps, "--eps", low=0, high=1, low_open=True, high_open=True)
    cli.check_range(FLAGS.seed, "--seed", low=0)
    cli.check_range(FLAGS.steps, "--steps", low=1)
    if FLAGS.legacy and FLAGS.sampler != "pc":
        raise UsageError(f"--legacy reproduces the reference PC sampler; it cannot be combined "
                         f"with --sampler {FLAGS.sampler}.")
    sizes, times, ckpts = cli.parse_plan(FLAGS.subspace, FLAGS.time, FLAGS.ckpt_subspace,
                                         FLAGS.ckpt_full, full_size)
    if not FLAGS.save_name.strip() or Path(FLAGS.save_name).name != FLAGS.save_name:
        raise UsageError(f"--save_name '{FLAGS.save_name}' must be a plain file name without "
                         "folders; put the folder in --eval_folder.")
    cli.check_writable(FLAGS.eval_folder, "--eval_folder")
    return sizes, times, ckpts


def run(config) -> None:
    """Sample by subspace diffusion as the flags say, save the samples, report metrics."""
    import numpy as np
    import torch

    import datasets
    import distributed
    import evaluation
    import sample_settings
    import sde_lib
    import solvers
    import subspace_lib as sl
    from models import utils as mutils
    from models.subspace_model import subspace_configs
    from subspace_sampling import (
        StageReport,
        format_stage_reports,
        subspace_pc_sample,
        subspace_solver_sample,
    )
    from utils import atomic_numpy_save, load_model_weights

    sizes, times, ckpts = check_flags(config.data.image_size)
    network_options = dict(
        precision=mutils.check_precision(config.sampling.get("precision", "fp32")),
        compile=config.sampling.get("compile", False))
    steps = FLAGS.steps if FLAGS.steps is not None else config.sampling.get("steps")
    if FLAGS.sampler in solvers.SOLVERS:
        solvers.full_steps(FLAGS.sampler, steps, config.sampling.noise_removal)  # checks steps
    dataset = sl.stats_name_from_flag(FLAGS.dataset, config)
    plan = sl.SubspacePlan.from_statistics(config.data.image_size, sizes, times, dataset)
    sde, default_eps = sde_lib.get_sde(config)
    if FLAGS.eps is not None:
        eps = FLAGS.eps
    else:
        eps = LEGACY_EPS if FLAGS.legacy else default_eps
    device = config.device
    seed = config.seed if FLAGS.seed is None else FLAGS.seed
    main = distributed.is_main_process()
    path = Path(FLAGS.eval_folder) / f"{FLAGS.save_name}.npy"
    settings = {
        "command": "subspace_sample", "config": sample_settings.config_digest(config),
        "plan": {"full_size": plan.full_size, "sizes": list(plan.sizes),
                 "cutoffs": list(plan.cutoffs), "rmsds": list(plan.rmsds)},
        "ckpt_full": sample_settings.checkpoint_entries([FLAGS.ckpt_full])[0],
        "ckpt_subspace": sample_settings.checkpoint_entries(ckpts),
        "sampler": {"eps": eps, "langevin_snr": FLAGS.langevin_snr,
                    "langevin_steps": FLAGS.langevin_steps,
                    "conditional_langevin": FLAGS.conditional_langevin,
                    "legacy_langevin": FLAGS.legacy_langevin, "legacy": FLAGS.legacy,
                    "method": FLAGS.sampler, "steps": steps, **network_options},
        "seed": seed, "batch": FLAGS.batch}
    problem = distributed.broadcast_from_main(
        sample_settings.settings_problem(path, settings, path.is_file()) if main else None)
    if problem:
        raise sample_settings.SettingsMismatchError(problem)
    networks = [load_model_weights(mutils.create_model(config), FLAGS.ckpt_full)]
    networks += [load_model_weights(mutils.create_model(cfg), p)
                 for cfg, p in zip(subspace_configs(config, plan.sizes), ckpts)]
    inverse_scaler = datasets.get_data_inverse_scaler(config)

    size, channels = config.data.image_size, config.data.num_channels
    if main:
        # What a killed run left while writing this name's files (never anything else).
        from run_lib import remove_stale_temporaries

        for name in (path.name, sample_settings.settings_path(path).name):
            for stale in remove_stale_temporaries(path.parent, glob.escape(name)):
                logging.info("Removed %s, left by an interrupted write.", stale)
        if not path.is_file():
            sample_settings.record_settings(path, settings)
    done = (_existing_samples(path, FLAGS.batch, FLAGS.number_samples, (size, size, channels))
            if main else None)
    num_rounds = (FLAGS.number_samples - 1) // FLAGS.batch + 1
    first = distributed.broadcast_from_main(
        0 if done is None else -(-len(done) // FLAGS.batch))
    logging.info("Plan %s; %d rounds of %d samples, %d already in %s.", plan.describe(),
                 num_rounds, FLAGS.batch, 0 if done is None else len(done), path)

    def draw(r: int):
        # Round r draws the same samples whichever process runs it; the last round is cut to
        # give exactly --number_samples.
        torch.manual_seed(seed + r)
        batch = min(FLAGS.batch, FLAGS.number_samples - r * FLAGS.batch)
        with mutils.network_options(**network_options):
            common = dict(continuous=config.training.continuous,
                          denoise=config.sampling.noise_removal, langevin_snr=FLAGS.langevin_snr,
                          langevin_steps=FLAGS.langevin_steps,
                          conditional_langevin_steps=FLAGS.conditional_langevin,
                          legacy_langevin=FLAGS.legacy_langevin, device=device,
                          progress=FLAGS.progress and main)
            shape = (batch, channels, size, size)
            if FLAGS.sampler == "pc":
                x, reports = subspace_pc_sample(
                    networks, sde, plan, config.data.centered, shape, eps=eps,
                    predictor=config.sampling.predictor, corrector=config.sampling.corrector,
                    snr=config.sampling.snr, n_steps_each=config.sampling.n_steps_each,
                    probability_flow=config.sampling.probability_flow, legacy=FLAGS.legacy,
                    **common)
            else:
                options = (solvers.solver_options(FLAGS.sampler, config.sampling)
                           if FLAGS.sampler in solvers.SOLVERS else
                           dict(rtol=config.sampling.get("rtol", 1e-5),
                                atol=config.sampling.get("atol", 1e-5)))
                x, reports = subspace_solver_sample(
                    networks, sde, plan, config.data.centered, shape, eps=eps,
                    method=FLAGS.sampler, steps=steps, schedule=config.sampling.get("schedule"),
                    **options, **common)
        return evaluation.to_uint8_nhwc(inverse_scaler(x).cpu()), reports

    totals: list[StageReport] | None = None

    def keep(r: int, result) -> None:
        nonlocal done, totals
        images, reports = result
        done = images if done is None else np.concatenate([done, images])
        atomic_numpy_save(path, samples=done)
        if totals is None:
            totals = reports
        else:
            for total, report in zip(totals, reports):
                total.nfe += report.nfe
                total.langevin_nfe += report.langevin_nfe
                total.steps += report.steps
                total.seconds += report.seconds
        logging.info("Round %d/%d saved to %s.", r + 1, num_rounds, path)

    distributed.map_rounds(num_rounds, draw, on_result=keep, first=first)
    if not main:
        return
    if totals is not None:
        world = distributed.get_world_size()
        print(f"Network evaluations and time per stage, {num_rounds - first} round(s)"
              + (f" over {world} processes (seconds summed):" if world > 1 else ":"))
        print(format_stage_reports(totals))
    samples = done[:FLAGS.number_samples]
    metrics = evaluation.evaluate_samples(samples, config)
    if metrics:
        print(f"metrics over {len(samples)} samples: "
              + " ".join(f"{key} {value:.6g}" for key, value in metrics.items()))


def _run_in_session(config) -> None:
    import distributed

    with distributed.session(config.device) as device:
        config.device = device
        run(config)


def main(argv) -> None:
    del argv
    run_entry_point(_run_in_session, FLAGS.config)


if __name__ == "__main__":
    cli.start(main)
