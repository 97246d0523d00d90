r"""Inpainting through the implicit subspace score, for a grid of cutoff times.

    python subspace_inpainting.py --image_path out.png --batch_size 5 \
        --checkpoint_subspace SUB.pth --checkpoint_full FULL.pth [--time 0.5]

Each row of the PNG grid is one evaluation image: the original, the masked input, then one
inpainting per cutoff time (default 0, 0.2, ..., 1; 0 uses the subspace model at every t > 0, 1
only the full model). With several subspace sizes (`--subspace 64,32 --time 0.4,0.6`) one plan
is used. The config (default: LSUN Church) gives the sampler settings and the dataset.
"""
from __future__ import annotations

import logging

from absl import flags
from ml_collections.config_flags import config_flags

import cli
from cli import UsageError, run_entry_point

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", "configs/ve/church_ncsnpp_continuous.py", "Configuration of the full model "
    "(subspace models use it with data.image_size set to their size).", lock_config=True)
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
    """Inpaint the first evaluation images for every cutoff column and save the grid."""
    import torch

    import controllable_generation as cg
    import datasets
    import sde_lib
    import subspace_lib as sl
    from models import utils as mutils
    from models.subspace_model import SubspaceScore, subspace_configs
    from utils import load_model_weights, save_image_grid

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
    dataset = sl.stats_name_from_flag(FLAGS.dataset, config)
    plans = [sl.SubspacePlan.from_statistics(config.data.image_size, sizes, column, dataset)
             for column in columns]

    config.eval.batch_size = FLAGS.batch_size
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    images = next(iter(eval_ds))["image"][:FLAGS.batch_size]
    if len(images) < FLAGS.batch_size:
        raise UsageError(f"--batch_size {FLAGS.batch_size} asks for more rows than the "
                         f"evaluation set's {len(images)} images; use --batch_size "
                         f"{len(images)} or less.")
    sde, eps = sde_lib.get_sde(config)
    device = mutils.config_device(config)
    images = images.to(device)
    full = load_model_weights(mutils.create_model(config), ckpt_full)
    subs = [load_model_weights(mutils.create_model(cfg), path)
            for cfg, path in zip(subspace_configs(config, sizes), ckpts)]
    mask = cg.inpainting_mask(FLAGS.mask, images.shape).to(device)
    scaler = datasets.get_data_scaler(config)
    inpainter = cg.get_pc_inpainter(
        sde, config.sampling.predictor, config.sampling.corrector,
        datasets.get_data_inverse_scaler(config), snr=config.sampling.snr,
        n_steps=config.sampling.n_steps_each, probability_flow=config.sampling.probability_flow,
        continuous=config.training.continuous, denoise=config.sampling.noise_removal, eps=eps,
        progress=FLAGS.progress)
    seed = config.seed if FLAGS.seed is None else FLAGS.seed

    rows = [images.cpu(), (images * mask).cpu()]
    for plan in plans:
        model = SubspaceScore(sde, full, subs, plan, config.data.centered)
        torch.manual_seed(seed)
        rows.append(inpainter(model, scaler(images), mask).cpu())
        counts = ", ".join(f"{size}x{size} network {n}"
                           for size, n in zip(plan.sizes, model.nfe_subspace))
        print(f"cutoff {','.join(f'{t:g}' for t in plan.cutoffs)}: full network "
              f"{model.nfe_full}, {counts} evaluations")
    grid = torch.stack(rows, dim=1).flatten(0, 1).clamp(0, 1)
    save_image_grid(grid, FLAGS.image_path, nrow=len(rows))
    logging.info("Saved %d x %d grid to %s.", len(images), len(rows), FLAGS.image_path)


def main(argv) -> None:
    del argv
    run_entry_point(run, FLAGS.config)


if __name__ == "__main__":
    cli.start(main)
