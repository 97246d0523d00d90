r"""Subspace sampling from the command line (Jing et al. 2022).

    python subspace_sample.py --config configs/ve/cifar10_ncsnpp_continuous.py --dataset cifar \
        --subspace 16 --time 0.5 --langevin_snr 0.22 --ckpt_subspace SUB.pth --ckpt_full FULL.pth \
        --eval_folder samples --save_name run1

Several nested levels: `--subspace 16,8 --time 0.5,0.6 --ckpt_subspace S16.pth,S8.pth`. Few-step
ODE solvers per stage: `--sampler heun --steps 18` (or dpm_solver, ddim; `ode` is RK45). Samples
(uint8 NHWC) are saved to EVAL_FOLDER/SAVE_NAME.npy; every round is saved as it is drawn, to
EVAL_FOLDER/SAVE_NAME/samples_{r}.npz, so an interrupted run resumes where it stopped and a larger
--number_samples extends the samples; FID/IS/KID are computed when the dataset's statistics exist.
The work happens in `subspace_run.sample`; this script defines and checks the flags.
"""
from __future__ import annotations

from pathlib import Path

from absl import flags

import cli
from cli import UsageError, run_entry_point

FLAGS = flags.FLAGS
cli.define_config_file(
    "config", "configs/ve/cifar10_ncsnpp_continuous.py", "Configuration of the full model "
    "(subspace models use it with data.image_size set to their size).")
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
                     "config.sampling.steps, else the solver's default. Refused with pc, which "
                     "takes N = --config.model.num_scales steps, and with ode (adaptive).")
flags.DEFINE_float("eps", None, "Final sampling time; default: 1e-5 (VE, and every SDE with "
                   "--legacy) or 1e-3 (VP, sub-VP).")
flags.DEFINE_integer("seed", None, "Random seed (round r uses seed + r); default: config.seed.")
flags.DEFINE_boolean("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["eval_folder", "save_name", "ckpt_subspace", "ckpt_full"])

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
    """Sample by subspace diffusion as the flags say (`subspace_run.sample`)."""
    import sampling
    import subspace_run

    sizes, times, ckpts = check_flags(config.data.image_size)
    # --steps and the config's sampler settings, before the settings file or any network.
    sampling.check_sampling_config(config, method=FLAGS.sampler, steps=FLAGS.steps,
                                   steps_field="--steps")
    subspace_run.sample(
        config, sizes, times, FLAGS.ckpt_full, ckpts, FLAGS.eval_folder, FLAGS.save_name,
        FLAGS.number_samples, FLAGS.batch, dataset=FLAGS.dataset, sampler=FLAGS.sampler,
        steps=FLAGS.steps, eps=FLAGS.eps, legacy=FLAGS.legacy, langevin_steps=FLAGS.langevin_steps,
        langevin_snr=FLAGS.langevin_snr, conditional_langevin=FLAGS.conditional_langevin,
        legacy_langevin=FLAGS.legacy_langevin, seed=FLAGS.seed, progress=FLAGS.progress)


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
