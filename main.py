"""Entry point: `python main.py --config C --workdir W --mode train|eval|eval_subspace`.

Several GPUs or nodes: replace `python` by
`torchrun --nproc_per_node=K [--nnodes=N --node_rank=I --master_addr=HOST --master_port=P]`;
each process then takes one device and its share of the work (see `distributed.py`).
"""
from __future__ import annotations

from pathlib import Path

from absl import flags
from ml_collections.config_flags import config_flags

import cli
from cli import UsageError, run_entry_point

FLAGS = flags.FLAGS

config_flags.DEFINE_config_file("config", None, "Training/evaluation configuration.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Working directory (checkpoints, samples, logs).")
flags.DEFINE_enum("mode", None, ["train", "eval", "eval_subspace"], "Running mode.")
flags.DEFINE_string("eval_folder", "eval", "Folder name (inside workdir) for evaluation results.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_float("dist_timeout_minutes", 120.0, "Under torchrun: how long a rank waits for the "
                   "others in a collective operation before the run fails.")
# Subspace evaluation (`--mode eval_subspace`), with the original spellings.
flags.DEFINE_string("subspace", None, "Subspace size(s), e.g. 16 or 16,8.")
flags.DEFINE_string("time", None, "Cutoff time(s), one per subspace size, e.g. 0.5 or 0.5,0.6.")
flags.DEFINE_string("dataset", None, "Name of the RMSD statistics (cifar, celeba, church, "
                    "builtin, ...); default: the config's dataset.")
flags.DEFINE_string("save_name", None, "Name of the output files of eval_subspace.")
flags.DEFINE_string("ckpt_full", None, "Checkpoint of the full model.")
flags.DEFINE_string("ckpt_subspace", None, "Checkpoint(s) of the subspace model(s), comma list.")
flags.DEFINE_string("checkpoint_full", None, "Alias of --ckpt_full.")
flags.DEFINE_string("checkpoint_subspace", None, "Alias of --ckpt_subspace.")
flags.DEFINE_bool("snapshot_sampling", False, "Training: draw a sample grid at every snapshot. "
                  "Off by default, as in the subspace-diffusion main.py (at 256 px with N = 2000 "
                  "it costs hours); config.training.snapshot_sampling is ignored.")
flags.mark_flags_as_required(["workdir", "config", "mode"])


def _run(argv) -> None:
    del argv
    import distributed
    import run_lib  # imported here so that --help works without loading torch

    config = FLAGS.config
    subspace_args = _check_flags(config)
    with distributed.session(config.device, FLAGS.dist_timeout_minutes) as device:
        config.device = device
        _dispatch(config, run_lib, subspace_args)


def _check_flags(config) -> dict | None:
    """Check the flags and the config before anything is built; the parsed eval_subspace
    arguments (or None)."""
    from run_lib import check_config

    cli.check_range(FLAGS.dist_timeout_minutes, "--dist_timeout_minutes", low=0, low_open=True)
    if FLAGS.mode == "train":
        config.training.snapshot_sampling = FLAGS.snapshot_sampling
    check_config(config, FLAGS.mode)
    if not FLAGS.eval_folder.strip():
        raise UsageError("--eval_folder is empty: give a folder name (inside --workdir).")
    cli.check_writable(FLAGS.workdir, "--workdir")
    if FLAGS.mode == "train":
        from run_lib import resume_checkpoint_path

        resume = resume_checkpoint_path(FLAGS.workdir)
        if resume.is_file():
            cli.check_checkpoint_files([resume], "--workdir's resume checkpoint")
    else:
        cli.check_writable(Path(FLAGS.workdir) / FLAGS.eval_folder, "--eval_folder")
    if FLAGS.mode != "eval_subspace":
        return None
    ckpt_full = FLAGS.ckpt_full or FLAGS.checkpoint_full
    ckpt_subspace = FLAGS.ckpt_subspace or FLAGS.checkpoint_subspace
    missing = [name for name, value in (("--subspace", FLAGS.subspace), ("--time", FLAGS.time),
                                        ("--ckpt_full", ckpt_full),
                                        ("--ckpt_subspace", ckpt_subspace)) if not value]
    if missing:
        raise UsageError(f"--mode eval_subspace needs {', '.join(missing)}.")
    sizes, cutoffs, ckpts = cli.parse_plan(FLAGS.subspace, FLAGS.time, ckpt_subspace, ckpt_full,
                                           config.data.image_size)
    if FLAGS.save_name is not None and (not FLAGS.save_name.strip()
                                        or Path(FLAGS.save_name).name != FLAGS.save_name):
        raise UsageError(f"--save_name '{FLAGS.save_name}' must be a plain file name without "
                         "folders.")
    return dict(subspace_sizes=list(sizes), cutoffs=list(cutoffs), ckpt_full=ckpt_full,
                ckpt_subspace=ckpts)


def _dispatch(config, run_lib, subspace_args: dict | None = None) -> None:
    if FLAGS.mode == "train":
        config.training.snapshot_sampling = FLAGS.snapshot_sampling
        run_lib.train(config, FLAGS.workdir, progress=FLAGS.progress)
    elif FLAGS.mode == "eval":
        run_lib.evaluate(config, FLAGS.workdir, FLAGS.eval_folder, progress=FLAGS.progress)
    else:
        if subspace_args is None:
            subspace_args = _check_flags(config)
        run_lib.evaluate_subspace(
            config, FLAGS.workdir, FLAGS.eval_folder, **subspace_args,
            dataset=FLAGS.dataset, save_name=FLAGS.save_name, progress=FLAGS.progress)


def main(argv) -> None:
    run_entry_point(_run, argv)


if __name__ == "__main__":
    cli.start(main)
