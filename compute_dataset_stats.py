"""Compute the feature statistics of a dataset, for FID/KID (Inception) or the proxy FID.

    python compute_dataset_stats.py --config configs/builtin/ve_ncsnpp_small.py --features proxy
    python compute_dataset_stats.py --config configs/ve/cifar10_ncsnpp_continuous.py \
        --features inception [--inception auto|torch|tfhub] [--inception_path DIR] \
        [--split train] [--out FILE]

Images come from `datasets.get_dataset(config, evaluation=True)` (one pass, no flips), at
`config.data.image_size`; for a size below the dataset's native one the subspace coordinates are
divided by 2^k again, so the features see ordinary low-resolution images in [0, 1]. Inception
statistics store `pool_3` activations (float32; TF-Hub's network adds `logits`), proxy statistics
`mu` and `sigma`; every file records the network and input pipeline that made it
(`feature_network`). `--inception` (default: config.eval.inception, else auto) picks TF-Hub's
network or the torch port of it; auto takes TF-Hub's when TensorFlow Hub loads it, else the torch
port, whose bilinear resize is TF2's (half-pixel centres) or, with `--inception_resize tf1`,
TF1's. The default output is the file `evaluation.load_dataset_stats` reads:
`assets/stats/<name>_stats.npz` (TF-Hub), `<name>_torch_inception_stats.npz` (torch) or
`<name>_proxy_stats.npz`; it is written atomically.
"""
from __future__ import annotations

import importlib.util

import numpy as np
from absl import flags
from ml_collections.config_flags import config_flags

import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Dataset configuration.", lock_config=True)
flags.DEFINE_string("out", None, "Output .npz file (default: assets/stats/<name>_stats.npz, "
                    "<name>_torch_inception_stats.npz or <name>_proxy_stats.npz).")
flags.DEFINE_enum("split", "train", ["train", "test"], "Dataset split to use.")
flags.DEFINE_enum("features", "inception", ["inception", "proxy"], "Feature space.")
flags.DEFINE_enum("inception", None, ["auto", "torch", "tfhub"], "Inception network: TF-Hub's, "
                  "its torch port, or auto (TF-Hub's when it loads); default: "
                  "config.eval.inception, else auto.")
flags.DEFINE_enum("inception_resize", None, ["halfpixel", "tf1"], "The torch port's bilinear "
                  "resize: TF2's (half-pixel centres) or TF1's; default: "
                  "config.eval.inception_resize, else halfpixel.")
flags.DEFINE_integer("max_images", None, "Use at most this many images (default: all).")
flags.DEFINE_string("inception_path", None, "Local copy of the TF-Hub Inception module.")
flags.DEFINE_integer("batch_size", None, "Images per torch Inception batch (default: "
                     "evaluation.TORCH_INCEPTION_BATCH).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("float16", False, "Store Inception features as float16 (half the size; "
                  "FID moves by less than 0.01, docs/mnist.md): the compact form of committed "
                  "statistics.")
flags.mark_flags_as_required(["config"])


def inception_network(config, choice: str = "auto", inception_path: str | None = None):
    """The Inception network for statistics: ("inception", TF-Hub module) or ("torch_inception",
    torch module), following `choice` (auto: TF-Hub's when tensorflow_hub is installed and the
    module loads, else the torch port). A network that cannot be loaded is one sentence."""
    import evaluation
    from models.utils import config_device

    if choice not in evaluation.INCEPTION_CHOICES:
        raise ValueError(f"--inception must be one of {', '.join(evaluation.INCEPTION_CHOICES)};"
                         f" got '{choice}'.")
    if choice == "tfhub" or (choice == "auto" and (
            inception_path is not None or importlib.util.find_spec("tensorflow_hub"))):
        model = evaluation.get_inception_model(config.data.image_size >= 256, inception_path)
        if model is not None:
            return "inception", model
        if choice == "tfhub":
            raise FileNotFoundError(
                "TF-Hub's Inception network could not be loaded (see the warning above): "
                "install requirements-tf.txt and give --inception_path, or use --inception "
                "torch.")
    return "torch_inception", evaluation.load_torch_inception(config_device(config))


def compute_stats(config, split: str, features: str, max_images: int | None = None,
                  inception_path: str | None = None, progress: bool = True,
                  inception: str | None = None, network=None,
                  batch_size: int | None = None,
                  inception_resize: str | None = None) -> dict[str, np.ndarray]:
    """Statistics arrays of one split of the configured dataset in the chosen feature space.

    `inception` (default: config.eval.inception) picks the Inception network
    (`inception_network`); `network` = (space, model) of `inception_network` skips that choice.
    `inception_resize` (default: config.eval.inception_resize) is the torch port's resize.
    """
    from tqdm.auto import tqdm

    import datasets
    import evaluation
    from subspace_lib import num_halvings

    if max_images is not None and max_images < 2:
        raise ValueError(f"--max_images must be at least 2; got {max_images}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1; got {batch_size}.")
    scale = 2 ** num_halvings(datasets.native_image_size(config), config.data.image_size)
    train_ds, eval_ds, builder = datasets.get_dataset(config, evaluation=True)
    ds = train_ds if split == "train" else eval_ds
    inceptionv3 = config.data.image_size >= 256
    resize = inception_resize or evaluation.inception_resize(config)
    evaluation.torch_inception_network(resize)  # checks the name
    if features == "inception":
        if network is None:
            choice = inception or evaluation.inception_choice(config)
            network = inception_network(config, choice, inception_path)
        space, model = network
        pools, logits = [], []
    else:
        space, accumulator = "proxy", evaluation.ProxyStatistics()
    total = len(getattr(builder, split)) if isinstance(builder, datasets.LocalDataset) else None
    if max_images is not None:
        total = max_images if total is None else min(total, max_images)
    count = 0
    with tqdm(total=total, unit="img", desc=f"{split} {space}", disable=not progress) as bar:
        for batch in ds:
            images = batch["image"] / scale
            if max_images is not None:
                images = images[: max_images - count]
            if space == "torch_inception":
                pools.append(evaluation.torch_inception_features(
                    images, model, batch_size or evaluation.TORCH_INCEPTION_BATCH,
                    resize=resize))
            elif space == "inception":
                out = evaluation.run_inception(images, model, inceptionv3)
                pools.append(out[evaluation.INCEPTION_FINAL_POOL])
                if out[evaluation.INCEPTION_OUTPUT] is not None:
                    logits.append(out[evaluation.INCEPTION_OUTPUT])
            else:
                accumulator.update(images)
            count += len(images)
            bar.update(len(images))
            if max_images is not None and count >= max_images:
                break
    if count < 2:
        raise ValueError(f"The {split} split gave {count} image(s); statistics need at least 2.")
    meta = {"num_images": np.int64(count), "image_size": np.int64(config.data.image_size)}
    if space == "proxy":
        mu, sigma = accumulator.result()
        return {"mu": mu, "sigma": sigma, "proxy_version": np.int64(evaluation.PROXY_VERSION),
                evaluation.FEATURE_NETWORK_KEY: np.asarray(evaluation.PROXY_NETWORK), **meta}
    stats = {evaluation.INCEPTION_FINAL_POOL: np.concatenate(pools)}
    if logits:
        stats[evaluation.INCEPTION_OUTPUT] = np.concatenate(logits)
    name = (evaluation.torch_inception_network(resize) if space == "torch_inception"
            else evaluation.tfhub_network(inceptionv3))
    return {**stats, evaluation.FEATURE_NETWORK_KEY: np.asarray(name), **meta}


def compact_features(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The statistics with their per-image feature arrays stored as float16 (the compact form
    of committed reference features; FID and KID convert them back to float64)."""
    import evaluation

    keys = (evaluation.INCEPTION_FINAL_POOL, evaluation.INCEPTION_OUTPUT)
    return {k: (v.astype(np.float16) if k in keys else v) for k, v in stats.items()}


def _run() -> None:
    """Compute the statistics the flags ask for and write them atomically."""
    import evaluation
    from files import atomic_numpy_save

    config = FLAGS.config
    cli.check_range(FLAGS.max_images, "--max_images", low=2)
    cli.check_range(FLAGS.batch_size, "--batch_size", low=1)
    if FLAGS.float16 and FLAGS.features != "inception":
        cli.fail("--float16 applies to Inception features only (proxy statistics are a mean "
                 "and a covariance): drop it or use --features inception.")
    if FLAGS.out is not None:  # before any network is loaded
        cli.check_writable(FLAGS.out, "--out", is_dir=False)
    try:
        network = None
        if FLAGS.features == "inception":
            choice = FLAGS.inception or evaluation.inception_choice(config)
            network = inception_network(config, choice, FLAGS.inception_path)
        space = network[0] if network is not None else "proxy"
        out = FLAGS.out or evaluation.STATS_DIR / evaluation.stats_filename(config, space)
        cli.check_writable(out, "--out", is_dir=False)
        stats = compute_stats(config, FLAGS.split, FLAGS.features, FLAGS.max_images,
                              progress=FLAGS.progress, network=network,
                              batch_size=FLAGS.batch_size,
                              inception_resize=FLAGS.inception_resize)
    except ModuleNotFoundError as error:
        message = str(error)
        if not message.endswith("."):  # a bare "No module named ...", not the project's sentence
            message += (": install requirements-tf.txt (TensorFlow datasets, TF-Hub's "
                        "Inception), or use --inception torch or --features proxy.")
        raise cli.ReportableError(message) from None
    if FLAGS.float16:
        stats = compact_features(stats)
    atomic_numpy_save(out, **stats)
    print(f"Wrote {out} ({int(stats['num_images'])} images, {FLAGS.split} split, "
          f"{stats[evaluation.FEATURE_NETWORK_KEY]}).")


def main(argv) -> None:
    del argv
    cli.run_entry_point(_run)


if __name__ == "__main__":
    cli.start(main)
