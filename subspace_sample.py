r"""Subspace SDE sampling from the command line (Jing et al. 2022).

    python subspace_sample.py --config configs/ve/cifar10_ncsnpp_continuous.py --dataset cifar \
        --subspace 16 --time 0.5 --langevin_snr 0.22 --ckpt_subspace SUB.pth --ckpt_full FULL.pth \
        --eval_folder samples --save_name run1

Several nested levels: `--subspace 16,8 --time 0.5,0.6 --ckpt_subspace S16.pth,S8.pth`. Samples
(uint8 NHWC) are saved to EVAL_FOLDER/SAVE_NAME.npy after every round, so an interrupted run
resumes where it stopped; FID/IS/KID are computed when the dataset's statistics exist.
"""
from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags
from ml_collections.config_flags import config_flags

from utils import run_entry_point

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
flags.DEFINE_float("eps", None, "Final sampling time; default: 1e-5 (VE) or 1e-3 (VP, sub-VP).")
flags.DEFINE_integer("seed", None, "Random seed (round r uses seed + r); default: config.seed.")
flags.DEFINE_boolean("progress", True, "Show progress bars.")
flags.mark_flags_as_required(["eval_folder", "save_name", "ckpt_subspace", "ckpt_full"])

# Dataset names of the reference code's --dataset flag that differ from the statistics keys.
_FLAG_DATASETS = {"celeba": "celebahq"}


def _existing_samples(path: Path, batch: int, number: int, image_shape: tuple[int, int, int]):
    """Samples saved by an earlier, interrupted run with the same settings (or None)."""
    import numpy as np

    if not path.is_file():
        return None
    done = np.load(path)
    if done.ndim != 4 or tuple(done.shape[1:]) != image_shape or done.dtype != np.uint8:
        raise ValueError(
            f"{path} holds samples of shape {done.shape} ({done.dtype}), not uint8 "
            f"[N, {', '.join(map(str, image_shape))}]: choose another --save_name or delete it.")
    if len(done) % batch and len(done) != number:
        raise ValueError(f"{path} holds {len(done)} samples, not a multiple of --batch {batch}: "
                         "resume with the batch size of the interrupted run.")
    return done


def run(config) -> None:
    """Sample by subspace diffusion as the flags say, save the samples, report metrics."""
    import numpy as np
    import torch

    import datasets
    import distributed
    import evaluation
    import sde_lib
    import subspace_lib as sl
    from models import utils as mutils
    from models.subspace_model import subspace_configs
    from subspace_sampling import StageReport, format_stage_reports, subspace_pc_sample
    from utils import atomic_numpy_save, load_model_weights

    if FLAGS.number_samples < 1 or FLAGS.batch < 1:
        raise ValueError("--number_samples and --batch must be positive.")
    if FLAGS.langevin_steps < 0:
        raise ValueError(f"--langevin_steps must be >= 0; got {FLAGS.langevin_steps}.")
    network_options = dict(
        precision=mutils.check_precision(config.sampling.get("precision", "fp32")),
        compile=config.sampling.get("compile", False))
    dataset = FLAGS.dataset or sl.dataset_stats_name(config)
    dataset = _FLAG_DATASETS.get(dataset.lower(), dataset)
    plan = sl.SubspacePlan.from_statistics(config.data.image_size, FLAGS.subspace, FLAGS.time,
                                           dataset)
    ckpts = [p.strip() for p in FLAGS.ckpt_subspace.split(",") if p.strip()]
    if len(ckpts) != plan.num_levels:
        raise ValueError(f"Got {plan.num_levels} subspace sizes {list(plan.sizes)} but "
                         f"{len(ckpts)} --ckpt_subspace files: give one per size, same order.")
    sde, default_eps = sde_lib.get_sde(config)
    eps = default_eps if FLAGS.eps is None else FLAGS.eps
    device = config.device
    networks = [load_model_weights(mutils.create_model(config), FLAGS.ckpt_full)]
    networks += [load_model_weights(mutils.create_model(cfg), path)
                 for cfg, path in zip(subspace_configs(config, plan.sizes), ckpts)]
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    seed = config.seed if FLAGS.seed is None else FLAGS.seed

    size, channels = config.data.image_size, config.data.num_channels
    path = Path(FLAGS.eval_folder) / f"{FLAGS.save_name}.npy"
    main = distributed.is_main_process()
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
            x, reports = subspace_pc_sample(
                networks, sde, plan, config.data.centered, (batch, channels, size, size),
                eps=eps, predictor=config.sampling.predictor, corrector=config.sampling.corrector,
                snr=config.sampling.snr, n_steps_each=config.sampling.n_steps_each,
                probability_flow=config.sampling.probability_flow,
                continuous=config.training.continuous, denoise=config.sampling.noise_removal,
                langevin_snr=FLAGS.langevin_snr, langevin_steps=FLAGS.langevin_steps,
                conditional_langevin_steps=FLAGS.conditional_langevin,
                legacy_langevin=FLAGS.legacy_langevin, device=device,
                progress=FLAGS.progress and main)
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
    metrics = evaluation.evaluate_samples(done, config)
    if metrics:
        print(" ".join(f"{key} {value:.6g}" for key, value in metrics.items()))


def _run_in_session(config) -> None:
    import distributed

    with distributed.session(config.device) as device:
        config.device = device
        run(config)


def main(argv) -> None:
    del argv
    run_entry_point(_run_in_session, FLAGS.config)


if __name__ == "__main__":
    app.run(main)
