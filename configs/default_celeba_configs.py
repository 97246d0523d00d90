"""Defaults shared by the CelebA experiments (64x64 RGB): the CIFAR-10 defaults with the values
the original CelebA defaults change."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs as cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    """CelebA defaults of the score-SDE code; `device` is picked when this runs."""
    config = cifar10_defaults()
    config.sampling.snr = 0.17
    config.eval.begin_ckpt = 1
    config.eval.enable_sampling = True
    config.data.dataset = "CELEBA"
    config.data.image_size = 64
    # A float here (the CIFAR-10 default is the integer 50), as in the original.
    del config.model["sigma_max"]
    config.model.sigma_max = 90.
    return config
