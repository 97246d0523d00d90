"""Training and evaluation loops behind `main.py` (the score-SDE half of the project)."""
from __future__ import annotations

import copy
import errno
import logging
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

import datasets
import distributed
import evaluation
import losses
import sample_settings
import sampling
import sde_lib
import subspace_lib
from errors import ReportableError
from files import atomic_numpy_save, atomic_write_text, remove_stale_temporaries, save_image_grid
from models import utils as mutils
from models.checkpoints import restore_checkpoint, save_checkpoint
from models.ema import ExponentialMovingAverage
from sample_rounds import Round, RoundSampler, check_finite, check_space

logger = logging.getLogger(__name__)


class TrainingDiverged(ReportableError):
    """The training loss became NaN or infinite."""


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from `config.seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_at_least(config, field: str, low: int, what: str) -> None:
    """Refuse `config.<field>` (a dotted path) below `low`, naming the field."""
    value = config
    for part in field.split("."):
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"config.{field} must be an integer of at least {low} ({what}); got "
                         f"{value!r}.")


def check_config(config, mode: str) -> None:
    """Refuse config values that would crash a run part-way (a zero frequency) or make it
    silently do nothing (a negative step count), naming the field: `main.py` calls it before
    anything is built, and `train`, `evaluate` and `evaluate_subspace` call it first.
    `mode` is "train", "eval" or "eval_subspace"."""
    if mode == "train":
        _check_at_least(config, "training.batch_size", 1, "images per training step")
        _check_at_least(config, "training.n_iters", 1, "the last training step")
        for field in ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption"):
            if field in config.training:
                _check_at_least(config, f"training.{field}", 1, "a number of steps")
        if config.training.get("snapshot_sampling"):
            sampling.check_sampling_config(config)
        return
    _check_at_least(config, "eval.batch_size", 1, "images per evaluation batch")
    if mode == "eval" and config.eval.begin_ckpt > config.eval.end_ckpt:
        raise ValueError(f"config.eval.begin_ckpt {config.eval.begin_ckpt} is after "
                         f"config.eval.end_ckpt {config.eval.end_ckpt}: there is nothing to "
                         "evaluate; set them to the first and last checkpoint numbers.")
    if config.eval.enable_sampling:
        _check_at_least(config, "eval.num_samples", 1, "samples per checkpoint")
        sampling.check_sampling_config(config)


def resolve_device(config) -> torch.device:
    """`config.device` when set, else CUDA when present, else CPU. Under torchrun, joins the
    process group (unless the entry script did) and a CUDA device becomes this rank's GPU."""
    return distributed.setup(mutils.config_device(config))


def example_generators(seed: int, step: int, positions: np.ndarray,
                       device: torch.device) -> list[torch.Generator]:
    """One generator per example of training step `step`, keyed by (seed, step, position of the
    example in the global batch): the noise and time an example draws in the loss do not depend
    on how the batch is split across processes, nor on whether the run was resumed."""
    generators = []
    for position in positions:
        words = np.random.SeedSequence([int(seed) % 2**64, int(step), int(position)])
        high, low = (int(w) for w in words.generate_state(2, np.uint32))
        generators.append(torch.Generator(device=device).manual_seed((high << 32 | low) >> 1))
    return generators


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the global generators (`set_seed`) for training step `step` on rank `rank`,
    keyed by (seed, step, rank): the dropout masks of a step are the same whether or not the
    run was resumed, and differ between ranks and steps. A stream of its own, apart from
    `example_generators`'s."""
    words = np.random.SeedSequence([int(seed) % 2**64, int(step), int(rank)], spawn_key=(1,))
    high, low = (int(w) for w in words.generate_state(2, np.uint32))
    return (high << 32 | low) >> 1


def _paths(workdir: str | os.PathLike) -> dict[str, Path]:
    workdir = Path(workdir)
    return {
        "samples": workdir / "samples",
        "tensorboard": workdir / "tensorboard",
        "checkpoints": workdir / "checkpoints",
        "meta": workdir / "checkpoints-meta" / "checkpoint.pth",
    }


def resume_checkpoint_path(workdir: str | os.PathLike) -> Path:
    """The preemption checkpoint training resumes from: WORKDIR/checkpoints-meta/checkpoint.pth."""
    return _paths(workdir)["meta"]


def create_train_state(config, device: torch.device, with_optimizer: bool = True) -> dict:
    """A fresh training state {model, ema, optimizer, step} built from `config`; without the
    optimizer (None) for evaluation, which then skips the ~1 s import of torch._dynamo that
    the first torch optimizer triggers."""
    config.device = device
    model = mutils.create_model(config)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    optimizer = losses.get_optimizer(config, model.parameters()) if with_optimizer else None
    return dict(optimizer=optimizer, model=model, ema=ema, step=0)


def set_dc_statistics(network: torch.nn.Module, config, device: torch.device) -> None:
    """Give a network with `config.model.gaussian_dc` the mean and covariance of its
    training data's DC coordinates (one pass over the training split, scaled as in training,
    no dequantization noise); a network without that option is left alone."""
    if not getattr(network, "gaussian_dc", False):
        return
    # The statistics do not depend on the batching: read in batches of about 4M values (the
    # per-batch overhead dominated at MNIST's 60,000 images in small evaluation batches).
    config = copy.deepcopy(config)
    values = config.data.num_channels * int(config.data.image_size) ** 2
    config.eval.batch_size = max(int(config.eval.batch_size), 2 ** 22 // values)
    train_ds, _, _ = datasets.get_dataset(config, evaluation=True)
    scaler = datasets.get_data_scaler(config)
    size = int(config.data.image_size)
    k = subspace_lib.num_halvings(size, 1)
    dc = torch.cat([subspace_lib.downsample(scaler(batch["image"].to(device)), k).flatten(1)
                    for batch in train_ds]).to(torch.float64)
    if dc.shape[0] < 2:
        raise ValueError("The Gaussian DC model needs at least 2 training images.")
    network.set_dc_statistics(dc.mean(0), torch.cov(dc.T).reshape(dc.shape[1], dc.shape[1]))


def _summary_writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


def _iterate_forever(dataset):
    while True:
        yielded = False
        for batch in dataset:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("The training dataset is empty: check config.data.")


def _snapshot_samples(sampling_fn, state, step: int, sample_dir: Path) -> None:
    model = state["model"]
    with state["ema"].average_parameters(model.parameters()):
        samples, _ = sampling_fn(model)
    this_dir = sample_dir / f"iter_{step}"
    images = samples.clamp(0.0, 1.0).cpu()
    uint8 = evaluation.to_uint8_nhwc(images)
    atomic_numpy_save(this_dir / "sample.npy", samples=uint8)
    save_image_grid(images, this_dir / "sample.png")


def train(config, workdir: str | os.PathLike, progress: bool = True) -> dict:
    """Train a score model as the original `run_lib.train`, resuming from the preemption
    checkpoint in `workdir` when there is one. Returns the final training state.

    Every random draw of step s (batch, flips, dequantization, loss noise, dropout) is keyed by
    (config.seed, s), so a run resumed at any step continues bit for bit as the uninterrupted
    run (docs/resume.md; local datasets, same config, machine and process count).

    Under torchrun every rank trains a DistributedDataParallel copy on its part of each global
    batch of `config.training.batch_size`, drawing each example's noise and time from a
    generator keyed by its position in the global batch (`example_generators`), so K processes
    take the steps one process would. Rank 0 alone logs and writes checkpoints (same format);
    every rank resumes from the same checkpoint, so `workdir` must be on a filesystem that all
    nodes share.
    """
    from tqdm.auto import tqdm

    check_config(config, "train")  # before any folder or network
    device = resolve_device(config)
    rank, world = distributed.shard()
    main = rank == 0
    progress = progress and main
    paths = _paths(workdir)
    if main:
        # Temporaries of checkpoint writes that a killed run (SIGKILL) left behind.
        for folder in (paths["checkpoints"], paths["meta"].parent):
            for stale in remove_stale_temporaries(folder, "checkpoint*.pth"):
                logger.info("Removed %s, left by an interrupted checkpoint write.", stale)
    distributed.per_rank_batch_size(config.training.batch_size, world)
    set_seed(config.seed)
    state = create_train_state(config, device)
    if main or paths["meta"].is_file():
        state = restore_checkpoint(paths["meta"], state, device, missing_ok=True)
    if main:  # only once the resume checkpoint proved usable
        for key in ("samples", "tensorboard", "checkpoints"):
            paths[key].mkdir(parents=True, exist_ok=True)
    initial_step = int(state["step"])
    if initial_step == 0:
        # A fresh run takes the data's DC statistics; a resumed one has them in its checkpoint.
        set_dc_statistics(state["model"], config, device)
    distributed.check_same_on_all_ranks(
        initial_step, f"the training step restored from {paths['meta']}",
        "put the workdir on a filesystem that every node shares")
    num_train_steps = config.training.n_iters
    if initial_step > num_train_steps:
        # The loop below would take no step: say so instead of silently doing nothing.
        logger.info("Training in %s is complete: the preemption checkpoint is at step %d and "
                    "training.n_iters is %d; raise training.n_iters to train on. Checkpoints: "
                    "%s.", workdir, initial_step, num_train_steps,
                    ", ".join(p.name for p in _snapshot_files(paths["checkpoints"])) or "none")
    elif initial_step > 0:
        logger.info("Resuming training from step %d (%s).", initial_step, paths["meta"])
    network = state["model"]
    state["model"] = distributed.wrap_model(network, device)

    # Every rank uses the same data seed: the ranks split each global batch between them. A
    # resumed run continues the batch streams where the steps already taken left them (one
    # evaluation batch was drawn at every multiple of eval_freq).
    eval_start = -(-initial_step // config.training.eval_freq) if initial_step else 0
    train_ds, eval_ds, _ = datasets.get_dataset(
        config, uniform_dequantization=config.data.uniform_dequantization,
        shard=(rank, world), start=initial_step, eval_start=eval_start)
    train_iter = _iterate_forever(train_ds)
    eval_iter = _iterate_forever(eval_ds)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    positions = distributed.rank_positions(config.training.batch_size, rank, world)

    sde, sampling_eps = sde_lib.get_sde(config)
    optimize_fn = losses.optimization_manager(config)
    step_kwargs = dict(sde=sde, optimize_fn=optimize_fn, reduce_mean=config.training.reduce_mean,
                       continuous=config.training.continuous,
                       likelihood_weighting=config.training.likelihood_weighting,
                       # "auto": the precision create_model measured for this network.
                       precision=mutils.network_precision(
                           network, config.training.get("precision", "fp32")),
                       compile=config.training.get("compile", False),
                       min_time=config.training.get("min_time", 1e-5))
    train_step_fn = losses.get_step_fn(train=True, grad_accum=config.training.get("grad_accum", 1),
                                       **step_kwargs)
    eval_step_fn = losses.get_step_fn(train=False, **step_kwargs)

    sampling_fn = None
    if config.training.snapshot_sampling and main:
        shape = (config.training.batch_size, config.data.num_channels,
                 config.data.image_size, config.data.image_size)
        sampling_fn = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sampling_eps,
                                               progress=progress)

    writer = _summary_writer(paths["tensorboard"]) if main else None
    try:
        steps = tqdm(range(initial_step, num_train_steps + 1), initial=initial_step,
                     total=num_train_steps + 1, desc="train", disable=not progress)
        for step in steps:
            # Dropout, evaluation noise and snapshot samples draw from the global generators.
            set_seed(step_seed(config.seed, step, rank))
            batch = scaler(next(train_iter)["image"].to(device))
            generators = example_generators(config.seed, step, positions, device)
            loss = train_step_fn(state, batch, generator=generators)
            # The mean over ranks is the loss of the global batch, and every rank sees it.
            loss_value = distributed.all_reduce_mean(float(loss.detach()))
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"Training loss became {loss_value} at step {step}; the run stopped and the "
                    f"last good checkpoint is kept in {paths['meta'].parent} and "
                    f"{paths['checkpoints']}: lower optim.lr or raise optim.warmup and resume.")
            if step % config.training.log_freq == 0 and main:
                writer.add_scalar("training_loss", loss_value, step)
                steps.set_postfix(loss=f"{loss_value:.4g}")
                logger.info("step: %d, training_loss: %.5e", step, loss_value)
            if step != 0 and step % config.training.snapshot_freq_for_preemption == 0 and main:
                _save_checkpoint(paths["meta"], state)
            if step % config.training.eval_freq == 0:
                eval_batch = scaler(next(eval_iter)["image"].to(device))
                # Evaluation and sampling use the plain network, outside DDP's collectives.
                eval_loss = float(eval_step_fn(dict(state, model=network), eval_batch))
                eval_loss = distributed.all_reduce_mean(eval_loss)
                if main:
                    writer.add_scalar("eval_loss", eval_loss, step)
            if step != 0 and (step % config.training.snapshot_freq == 0
                              or step == num_train_steps) and main:
                # Numbered as in the original (a final step between snapshots replaces the last
                # one), except that a run shorter than snapshot_freq saves checkpoint_1, where
                # evaluation (eval.begin_ckpt = 1) looks, instead of checkpoint_0.
                save_step = max(1, step // config.training.snapshot_freq)
                _save_checkpoint(paths["checkpoints"] / f"checkpoint_{save_step}.pth", state)
                # The preemption checkpoint also marks the run as finished up to here.
                _save_checkpoint(paths["meta"], state)
                if sampling_fn is not None:
                    _snapshot_samples(sampling_fn, dict(state, model=network), step,
                                      paths["samples"])
    finally:
        if writer is not None:
            writer.close()
    # No rank returns before rank 0 has written the last checkpoint.
    distributed.barrier()
    state["model"] = network
    return state


def _snapshot_files(folder: Path) -> list[Path]:
    """The `checkpoint_<n>.pth` files of a checkpoints folder, by number."""
    found = [p for p in folder.glob("checkpoint_*.pth") if p.stem.split("_")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.stem.split("_")[-1]))


def _save_checkpoint(path: Path, state: dict) -> None:
    """`models.checkpoints.save_checkpoint`, with a failed write (disk full, permissions)
    reported as one sentence that says the last complete checkpoint is intact."""
    try:
        save_checkpoint(path, state)
        return
    except OSError as error:
        if error.errno != errno.ENOSPC and error.strerror is None:
            raise
        reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror.lower()
        cause = error
    except RuntimeError as error:
        # torch's zip writer reports a short write (a full disk) as an "unexpected pos" failure.
        if not any(s in str(error) for s in ("unexpected pos", "file write failed", "No space")):
            raise
        reason, cause = "the disk is full", error
    # Say what is safe only when there is something: a first checkpoint has no predecessor.
    workdir = path.parent.parent
    earlier = [p for p in (resume_checkpoint_path(workdir),
                           *reversed(_snapshot_files(_paths(workdir)["checkpoints"])))
               if p.is_file()]
    kept = (f"the last complete checkpoint is intact ({earlier[0]}), so free space (or fix the "
            "folder) and run again to resume" if earlier else
            "no complete checkpoint had been written yet, so free space (or fix the folder) "
            "and run again to train from the start")
    raise ReportableError(
        f"Cannot write checkpoint {path} at step {int(state['step'])}: {reason}; "
        f"{kept}.") from cause


def round_seed(seed: int, ckpt: int, round_index: int) -> int:
    """Seed of one sampling round, so a resumed or split evaluation draws the same samples."""
    return (int(seed) * 1_000_003 + int(ckpt) * 10_007 + int(round_index)) % 2**63


def _bpd_dataset(config, shard: tuple[int, int] | None = None, seed: int | None = None):
    train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=True,
                                                evaluation=True, seed=seed, shard=shard)
    if config.eval.bpd_dataset.lower() == "train":
        return train_ds
    if config.eval.bpd_dataset.lower() == "test":
        return eval_ds
    raise ValueError(f"Unknown eval.bpd_dataset '{config.eval.bpd_dataset}': use train or test.")


def bpd_num_repeats(config) -> int:
    """Passes over the bits/dim split, as the original `run_lib.evaluate`: 5 over the test split
    (each with fresh dequantization noise), 1 over the training split."""
    split = config.eval.bpd_dataset.lower()
    if split == "test":
        return 5
    if split == "train":
        return 1
    raise ValueError(f"Unknown eval.bpd_dataset '{config.eval.bpd_dataset}': use train or test.")


def _rank_image_limit(num_images: int, shard: tuple[int, int] | None) -> int:
    """This rank's share of a limit of `num_images` images over all ranks (the shares add up to
    the limit: rank r takes the images r, r + W, ... of the first `num_images`)."""
    rank, world = shard if shard is not None else (0, 1)
    return len(range(rank, num_images, world))


def _pass_size(dataset) -> int | None:
    """Images one pass over an evaluation dataset yields on this rank (None when unknown)."""
    source = getattr(dataset, "source", None)
    if source is None:
        return None
    size, batch, world = len(source), dataset.batch_size, dataset.world_size
    full, rest = divmod(size, batch)
    return full * len(range(dataset.rank, batch, world)) + len(range(dataset.rank, rest, world))


def compute_bpd(likelihood_fn, model, config, scaler, device, num_repeats: int,
                progress: bool, max_batches: int | None = None,
                shard: tuple[int, int] | None = None,
                max_images: int | None = None) -> tuple[np.ndarray, int]:
    """Bits/dim of the images of the configured bpd dataset (`num_repeats` passes, each with its
    own dequantization noise), and the total number of ODE function evaluations.

    `max_images` (default `config.eval.bpd_num_images`; 0 or None = the whole split) limits each
    pass to the first images of the split, over all ranks together. The progress bar shows the
    running mean and its standard error. With `shard=(rank, world_size)`, only that rank's part
    of the images (`datasets.get_dataset`); `gather_bpd` combines the ranks.
    """
    from tqdm.auto import tqdm

    if max_images is None:
        max_images = int(config.eval.get("bpd_num_images", 0) or 0)
    if max_images < 0:
        raise ValueError(f"eval.bpd_num_images must be >= 0 (0 = the whole split); got "
                         f"{max_images}.")
    limit = _rank_image_limit(max_images, shard) if max_images else None
    per_pass = _pass_size(_bpd_dataset(config, shard))
    if limit is not None:
        per_pass = limit if per_pass is None else min(per_pass, limit)
    bar = tqdm(total=None if per_pass is None else per_pass * num_repeats, unit="img",
               desc="bits/dim", disable=not progress)
    bpds, nfe_total = [], 0
    for repeat in range(num_repeats):
        # Every pass draws its own dequantization noise (and order), as the original's
        # tf.data pipeline did when it was iterated again.
        dataset = _bpd_dataset(config, shard, seed=int(config.seed) + repeat)
        taken = 0
        for index, batch in enumerate(dataset):
            if max_batches is not None and index >= max_batches:
                break
            if limit is not None and taken >= limit:
                break
            images = batch["image"]
            if limit is not None:
                images = images[: limit - taken]
            taken += len(images)
            data = scaler(images.to(device))
            bpd, _, nfe = likelihood_fn(model, data)
            bpds.append(bpd.detach().cpu().numpy().reshape(-1))
            nfe_total += int(nfe)
            values = np.concatenate(bpds)
            mean = float(np.mean(values))
            stderr = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 \
                else float("nan")
            bar.update(len(images))
            bar.set_postfix_str(f"pass {repeat + 1}/{num_repeats}, bpd {mean:.4f} +- {stderr:.4f}")
            logger.info("repeat %d batch %d: mean bpd %.5f", repeat, index, mean)
    bar.close()
    return np.concatenate(bpds) if bpds else np.zeros(0), nfe_total


def gather_bpd(bpds: np.ndarray, nfe: int) -> tuple[np.ndarray | None, int]:
    """Every rank's bits/dim values concatenated in rank order on rank 0 (None on other
    ranks), and the ODE function evaluations summed over ranks (on every rank)."""
    return distributed.concat_on_main(bpds), int(distributed.all_reduce_sum(nfe))


def _checkpoint_path(workdir: Path, ckpt: int) -> Path:
    path = _paths(workdir)["checkpoints"] / f"checkpoint_{ckpt}.pth"
    if not path.is_file():
        found = [int(p.stem.split("_")[-1]) for p in _snapshot_files(path.parent)]
        have = (f"the workdir has checkpoints {', '.join(map(str, found))}" if found
                else "the workdir has no checkpoints yet")
        raise FileNotFoundError(
            f"Checkpoint {path} does not exist ({have}): train first, or set "
            "config.eval.begin_ckpt and config.eval.end_ckpt to checkpoints that exist.")
    return path


def _image_shape(config) -> tuple[int, int, int]:
    """(H, W, C) of the config's samples."""
    size = int(config.data.image_size)
    return size, size, int(config.data.num_channels)


def _sample_rounds(sampling_fn, model, config, ckpt: int, sample_dir: Path,
                   settings: dict | None = None, output: Path | None = None) -> np.ndarray | None:
    """Draw config.eval.num_samples samples in rounds of eval.batch_size into
    SAMPLE_DIR/samples_{r}.npz with the resumable round sampler (`sample_rounds`), round r
    seeded by `round_seed(config.seed, ckpt, r)`. The record beside the folder holds the config
    digest, checkpoint number, seed, batch size and the entries of `settings` (e.g. checkpoints
    and plan). Returns the samples on rank 0 and None on other ranks.
    """
    batch = config.eval.batch_size
    record = {"config": sample_settings.config_digest(config), "ckpt": ckpt,
              "seed": config.seed, "batch": batch, **(settings or {})}
    rounds = RoundSampler(sample_dir, config.eval.num_samples, batch,
                          lambda r: round_seed(config.seed, ckpt, r), record, output=output,
                          image_shape=_image_shape(config), count_name="config.eval.num_samples")
    # The checkpoint files behind the samples, for a round that comes out non-finite.
    entries = [v for v in record.values() if isinstance(v, dict)] + [
        e for v in record.values() if isinstance(v, list) for e in v if isinstance(e, dict)]
    source = "from " + ", ".join(str(e["path"]) for e in entries if "path" in e) \
        if any("path" in e for e in entries) else f"from checkpoint {ckpt}"

    def draw(r: int, size: int) -> Round:
        samples, nfe = sampling_fn(model)  # a full batch: the sampler's shape is fixed
        check_finite(samples, r, source)
        return Round(evaluation.to_uint8_nhwc(samples), note=f"checkpoint {ckpt}, {nfe} "
                     "evaluations")

    return rounds.run(draw).samples


def _write_report(path: Path, report: dict) -> None:
    import json

    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def evaluate(config, workdir: str | os.PathLike, eval_folder: str = "eval",
             progress: bool = True) -> dict:
    """Evaluate checkpoints eval.begin_ckpt..eval.end_ckpt of `workdir`: loss on the evaluation
    split, bits/dim, and sampling with FID/IS/KID (or the proxy FID); one JSON report each.

    Under torchrun the evaluation images and the sampling rounds are split across ranks (the
    samples are those of one process with the same seeds); rank 0 writes the files and every
    rank returns the same reports.
    """
    import likelihood

    check_config(config, "eval")  # before any folder or network
    device = resolve_device(config)
    rank, world = distributed.shard()
    main = rank == 0
    progress = progress and main
    workdir = Path(workdir)
    eval_dir = workdir / eval_folder
    for ckpt in range(config.eval.begin_ckpt, config.eval.end_ckpt + 1):
        _checkpoint_path(workdir, ckpt)  # every checkpoint exists before any work is done
        if config.eval.enable_sampling and main:  # and its samples fit on disk and in memory
            check_space(eval_dir / f"ckpt_{ckpt}", config.eval.num_samples, _image_shape(config),
                        count_name="config.eval.num_samples")
    evaluation.inception_choice(config)  # a bad eval.inception fails before any sampling
    eval_dir.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed)
    state = create_train_state(config, device, with_optimizer=False)
    if rank > 0:
        set_seed(distributed.rank_seed(config.seed, rank))
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    sde, sampling_eps = sde_lib.get_sde(config)

    if config.eval.enable_loss:
        _, eval_ds, _ = datasets.get_dataset(
            config, uniform_dequantization=config.data.uniform_dequantization, evaluation=True,
            shard=(rank, world))
        eval_step_fn = losses.get_step_fn(
            sde, train=False, optimize_fn=None, reduce_mean=config.training.reduce_mean,
            continuous=config.training.continuous,
            likelihood_weighting=config.training.likelihood_weighting)
    if config.eval.enable_bpd:
        likelihood_fn = likelihood.get_likelihood_fn(sde, inverse_scaler)
    if config.eval.enable_sampling:
        shape = (config.eval.batch_size, config.data.num_channels, config.data.image_size,
                 config.data.image_size)
        sampling_fn = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sampling_eps,
                                               progress=progress)

    reports = {}
    for ckpt in range(config.eval.begin_ckpt, config.eval.end_ckpt + 1):
        ckpt_path = _checkpoint_path(workdir, ckpt)
        state = restore_checkpoint(ckpt_path, state, device)
        model = state["model"]
        report: dict = {"checkpoint": ckpt, "step": int(state["step"])}
        if config.eval.enable_loss:
            # The eval step swaps the EMA weights in itself.
            values = [float(eval_step_fn(state, scaler(b["image"].to(device)))) for b in eval_ds]
            total, count = distributed.all_reduce_sum([sum(values), len(values)])
            report["eval_loss"] = total / count
            logger.info("checkpoint %d: eval loss %.5e", ckpt, report["eval_loss"])
        with state["ema"].average_parameters(model.parameters()):
            if config.eval.enable_bpd:
                bpds, nfe = gather_bpd(*compute_bpd(likelihood_fn, model, config, scaler, device,
                                                    bpd_num_repeats(config), progress,
                                                    shard=(rank, world)))
                if main:
                    atomic_numpy_save(eval_dir / f"ckpt_{ckpt}_bpd.npz", bpd=bpds)
                    report.update(bpd=float(bpds.mean()), bpd_nfe=nfe)
                    logger.info("checkpoint %d: mean bpd %.5f", ckpt, report["bpd"])
            if config.eval.enable_sampling:
                settings = {"command": "eval",
                            "checkpoint": sample_settings.checkpoint_entries([ckpt_path])[0]}
                samples = _sample_rounds(sampling_fn, model, config, ckpt,
                                         eval_dir / f"ckpt_{ckpt}", settings)
                if main:
                    report["num_samples"] = len(samples)
                    metrics = evaluation.evaluate_samples(samples, config, progress=progress)
                    if metrics is not None:
                        report.update(metrics)
                        logger.info("checkpoint %d: %s", ckpt, metrics)
        if main:
            _write_report(eval_dir / f"report_{ckpt}.json", report)
        reports[ckpt] = distributed.broadcast_from_main(report)
    return reports


def evaluate_subspace(config, workdir: str | os.PathLike, eval_folder: str,
                      subspace_sizes, cutoffs, ckpt_full: str, ckpt_subspace,
                      dataset: str | None = None, save_name: str | None = None,
                      progress: bool = True) -> dict:
    """Sampling (`config.sampling.method`, usually the ODE) and bits/dim through the implicit
    full-space score of subspace diffusion, reporting full and subspace network evaluations.

    Under torchrun the sampling rounds and the bits/dim images are split across ranks, the
    network-evaluation counts summed over ranks; rank 0 writes the files and every rank returns
    the same report.
    """
    import likelihood
    import subspace_lib as sl
    from models.subspace_model import load_subspace_model

    check_config(config, "eval_subspace")  # before any folder or network
    device = resolve_device(config)
    rank, world = distributed.shard()
    main = rank == 0
    progress = progress and main
    eval_dir = Path(workdir) / eval_folder
    save_name = save_name or "subspace_" + "_".join(
        f"{s}_{t}" for s, t in zip(subspace_sizes, cutoffs))
    evaluation.inception_choice(config)  # a bad eval.inception fails before any sampling
    if config.eval.enable_sampling and main:  # the samples fit on disk and in memory
        check_space(eval_dir / save_name, config.eval.num_samples, _image_shape(config),
                    eval_dir / f"{save_name}.npy", count_name="config.eval.num_samples")
    set_seed(config.seed)
    config.device = device
    model = load_subspace_model(config, ckpt_full, list(ckpt_subspace), subspace_sizes, cutoffs,
                                dataset=sl.stats_name_from_flag(dataset, config))
    eval_dir.mkdir(parents=True, exist_ok=True)
    if rank > 0:
        set_seed(distributed.rank_seed(config.seed, rank))
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    sde, sampling_eps = sde_lib.get_sde(config)
    report: dict = {"subspace": list(subspace_sizes), "time": list(cutoffs),
                    "ckpt_full": str(ckpt_full), "ckpt_subspace": [str(c) for c in ckpt_subspace]}

    def nfe_over_ranks() -> tuple[int, int, list[int]]:
        full, *per_level = distributed.all_reduce_sum([model.num_full, *model.nfe_subspace])
        return int(full), int(sum(per_level)), [int(n) for n in per_level]

    if config.eval.enable_sampling:
        shape = (config.eval.batch_size, config.data.num_channels, config.data.image_size,
                 config.data.image_size)
        sampling_fn = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sampling_eps,
                                               progress=progress)
        model.reset_nfe()
        settings = {"command": "eval_subspace", "subspace": [int(n) for n in subspace_sizes],
                    "time": [float(t) for t in cutoffs], "dataset": dataset,
                    "ckpt_full": sample_settings.checkpoint_entries([ckpt_full])[0],
                    "ckpt_subspace": sample_settings.checkpoint_entries(list(ckpt_subspace))}
        samples = _sample_rounds(sampling_fn, model, config, 0, eval_dir / save_name, settings,
                                 output=eval_dir / f"{save_name}.npy")
        num_full, num_subspace, per_level = nfe_over_ranks()
        if main:
            report.update(sampling_num_full=num_full, sampling_num_subspace=num_subspace,
                          sampling_nfe_per_level=per_level)
            print(f"sampling: {num_full} full and {num_subspace} subspace network evaluations "
                  f"(per level {per_level}) for the rounds drawn in this run")

            metrics = evaluation.evaluate_samples(samples, config, progress=progress)
            if metrics is not None:
                report.update(metrics)
                print(f"sample metrics ({len(samples)} samples): {metrics}")
    if config.eval.enable_bpd:
        likelihood_fn = likelihood.get_likelihood_fn(sde, inverse_scaler)
        model.reset_nfe()
        # One pass, as the original evaluate_subspace (evaluate makes 5 over the test split).
        bpds, nfe = gather_bpd(*compute_bpd(likelihood_fn, model, config, scaler, device, 1,
                                            progress, shard=(rank, world)))
        num_full, num_subspace, _ = nfe_over_ranks()
        if main:
            atomic_numpy_save(eval_dir / f"{save_name}_bpd.npz", bpd=bpds)
            report.update(bpd=float(bpds.mean()), bpd_ode_nfe=nfe, bpd_num_full=num_full,
                          bpd_num_subspace=num_subspace)
            print(f"bits/dim {report['bpd']:.5f} over {len(bpds)} images; {num_full} full and "
                  f"{num_subspace} subspace network evaluations")
    if main:
        _write_report(eval_dir / f"{save_name}_report.json", report)
    return distributed.broadcast_from_main(report)
