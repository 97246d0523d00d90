"""A small DDPM++ (sub-VP SDE, continuous) for MNIST: `configs/builtin/subvp_ddpmpp_small.py`
with the MNIST data section (one channel, no flips)."""
import ml_collections

from configs.builtin.subvp_ddpmpp_small import get_config as builtin_config
from configs.mnist.default_mnist_configs import use_mnist


def get_config() -> ml_collections.ConfigDict:
    """The built-in DDPM++ config (16 base channels, 3 resolutions) on MNIST."""
    return use_mnist(builtin_config())
