"""Compute the feature statistics of a dataset, for FID/KID (Inception) or the proxy FID.

    python compute_dataset_stats.py --config configs/builtin/ve_ncsnpp_small.py --features proxy
    python compute_dataset_stats.py --config configs/ve/cifar10_ncsnpp_continuous.py \
        --features inception [--inception_path DIR] [--split train] [--out FILE]

Images come from `datasets.get_dataset(config, evaluation=True)` (one pass, no flips), at
`config.data.image_size`; for a size below the dataset's native one the subspace coordinates are
divided by 2^k again, so the features see ordinary low-resolution images in [0, 1]. Inception
statistics store `pool_3` and `logits` activations (float32), proxy statistics `mu` and `sigma`.
The default output is `assets/stats/<name>_stats.npz` (`<name>_proxy_stats.npz`), the file
`evaluation.load_dataset_stats` reads; it is written atomically.
"""
from __future__ import annotations

import numpy as np
from absl import flags
from ml_collections.config_flags import config_flags

import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Dataset configuration.", lock_config=True)
flags.DEFINE_string("out", None, "Output .npz file (default: assets/stats/<name>_stats.npz).")
flags.DEFINE_enum("split", "train", ["train", "test"], "Dataset split to use.")
flags.DEFINE_enum("features", "inception", ["inception", "proxy"], "Feature space.")
flags.DEFINE_integer("max_images", None, "Use at most this many images (default: all).")
flags.DEFINE_string("inception_path", None, "Local copy of the TF-Hub Inception module.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["config"])


def compute_stats(config, split: str, features: str, max_images: int | None = None,
                  inception_path: str | None = None,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """Statistics arrays of one split of the configured dataset in the chosen feature space."""
    from tqdm.auto import tqdm

    import datasets
    import evaluation
    from subspace_lib import num_halvings

    if max_images is not None and max_images < 2:
        raise ValueError(f"--max_images must be at least 2; got {max_images}.")
    scale = 2 ** num_halvings(datasets.native_image_size(config), config.data.image_size)
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    ds = train_ds if split == "train" else eval_ds
    inceptionv3 = config.data.image_size >= 256
    if features == "inception":
        model = evaluation.get_inception_model(inceptionv3, inception_path)
        if model is None:
            raise FileNotFoundError(
                "The Inception network could not be loaded (see the warning above): install "
                "requirements-tf.txt and give --inception_path, or use --features proxy.")
        pools, logits = [], []
    else:
        accumulator = evaluation.ProxyStatistics()
    try:
        total = len(ds)
    except TypeError:
        total = None
    count = 0
    for batch in tqdm(ds, total=total, desc=f"{split} {features}", disable=not progress):
        images = batch["image"] / scale
        if max_images is not None:
            images = images[: max_images - count]
        if features == "inception":
            out = evaluation.run_inception(images, model, inceptionv3)
            pools.append(out[evaluation.INCEPTION_FINAL_POOL])
            if out[evaluation.INCEPTION_OUTPUT] is not None:
                logits.append(out[evaluation.INCEPTION_OUTPUT])
        else:
            accumulator.update(images)
        count += len(images)
        if max_images is not None and count >= max_images:
            break
    if count < 2:
        raise ValueError(f"The {split} split gave {count} image(s); statistics need at least 2.")
    meta = {"num_images": np.int64(count), "image_size": np.int64(config.data.image_size)}
    if features == "inception":
        stats = {evaluation.INCEPTION_FINAL_POOL: np.concatenate(pools)}
        if logits:
            stats[evaluation.INCEPTION_OUTPUT] = np.concatenate(logits)
        return {**stats, **meta}
    mu, sigma = accumulator.result()
    return {"mu": mu, "sigma": sigma, "proxy_version": np.int64(evaluation.PROXY_VERSION), **meta}


def _run() -> None:
    """Compute the statistics the flags ask for and write them atomically."""
    import evaluation
    from files import atomic_numpy_save

    config = FLAGS.config
    cli.check_range(FLAGS.max_images, "--max_images", low=2)
    out = FLAGS.out or evaluation.STATS_DIR / evaluation.stats_filename(config, FLAGS.features)
    cli.check_writable(out, "--out", is_dir=False)
    try:
        stats = compute_stats(config, FLAGS.split, FLAGS.features, FLAGS.max_images,
                              FLAGS.inception_path, FLAGS.progress)
    except ModuleNotFoundError as error:
        raise cli.ReportableError(f"{error}: install requirements-tf.txt for Inception "
                                  "statistics, or use --features proxy.") from None
    atomic_numpy_save(out, **stats)
    print(f"Wrote {out} ({int(stats['num_images'])} images, {FLAGS.split} split).")


def main(argv) -> None:
    del argv
    cli.run_entry_point(_run)


if __name__ == "__main__":
    cli.start(main)
