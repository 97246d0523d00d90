r"""Inpainting through the implicit subspace score, for a grid of cutoff times.

    python subspace_inpainting.py --image_path out.png --batch_size 5 \
        --checkpoint_subspace SUB.pth --checkpoint_full FULL.pth [--time 0.5]

Each row of the PNG grid is one evaluation image: the original, the masked input, then one
inpainting per cutoff time (default 0, 0.2, ..., 1; 0 uses the subspace model at every t > 0, 1
only the full model). With several subspace sizes (`--subspace 64,32 --time 0.4,0.6`) one plan
is used. The config (default: LSUN Church) gives the sampler settings and the dataset. The work
happens in `subspace_run.inpaint`; this script defines and checks the flags.
"""
from __future__ import annotations

from absl import flags

import cli
from cli import UsageError, run_entry_point

FLAGS = flags.FLAGS
cli.define_config_file(
    "config", "configs/ve/church_ncsnpp_continuous.py", "Configuration of the full model "
    "(subspace models use it with data.image_size set to their size).")
flags.DEFINE_string("subspace", "64", "Subspace size(s), e.g. 64 or 64,32.")
flags.DEFINE_string("time", None, "Cutoff time(s): with one subspace size, one grid column per "
                    "value (default 0,0.2,0.4,0.6,0.8,1); with several, one cutoff per size.")
flags.DEFINE_string("checkpoint_full", None, "Full model checkpoint.")
flags.DEFINE_string("checkpoint_subspace", None, "Subspace checkpoint(s), one per size.")
flags.DEFINE_string("ckpt_full", None, "Alias of --checkpoint_full.")
flags.DEFINE_string("ckpt_subspace", None, "Alias of --checkpoint_subspace.")
flags.DEFINE_string("image_path", "inpainting.png", "Where the PNG grid is written.")
flags.DEFINE_string("dataset", None, "Name of the RMSD statistics; default: the config's dataset.")
flags.DEFINE_integer("batch_size", 5, "Number of evaluation images (grid rows).")
flags.DEFINE_enum("mask", "right_half",
                  ["right_half", "left_half", "bottom_half", "top_half", "center"],
                  "Region to inpaint.")
flags.DEFINE_integer("seed", None, "Random seed; default: config.seed.")
flags.DEFINE_boolean("progress", True, "Show progress bars.")

DEFAULT_TIMES = "0,0.2,0.4,0.6,0.8,1"


def run(config) -> None:
    """Check the flags, then inpaint the first evaluation images for every cutoff column and
    save the grid (`subspace_run.inpaint`)."""
    import subspace_run

    ckpt_full = FLAGS.checkpoint_full or FLAGS.ckpt_full
    ckpt_subspace = FLAGS.checkpoint_subspace or FLAGS.ckpt_subspace
    if not ckpt_full or not ckpt_subspace:
        raise UsageError("Give --checkpoint_full and --checkpoint_subspace (or --ckpt_full and "
                         "--ckpt_subspace).")
    cli.check_range(FLAGS.batch_size, "--batch_size", low=1)
    cli.check_range(FLAGS.seed, "--seed", low=0)
    sizes, times, ckpts = cli.parse_plan(
        FLAGS.subspace, FLAGS.time or DEFAULT_TIMES, ckpt_subspace, ckpt_full,
        config.data.image_size,
        ("--subspace", "--time", "--checkpoint_subspace", "--checkpoint_full"))
    columns = [(t,) for t in times] if len(sizes) == 1 else [times]
    cli.check_writable(FLAGS.image_path, "--image_path", is_dir=False)
    subspace_run.inpaint(config, sizes, columns, ckpt_full, ckpts, FLAGS.image_path,
                         FLAGS.batch_size, FLAGS.mask, dataset=FLAGS.dataset, seed=FLAGS.seed,
                         progress=FLAGS.progress)


def main(argv) -> None:
    del argv
    run_entry_point(run, FLAGS.config)


if __name__ == "__main__":
    cli.start(main)
