"""Defaults shared by the 256x256 experiments (LSUN, CelebA-HQ-256, FFHQ-256): the CIFAR-10
defaults with the values the original LSUN defaults change."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs as cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    """LSUN defaults of the score-SDE code; `device` is picked when this runs."""
    config = cifar10_defaults()
    config.training.update(dict(batch_size=64, n_iters=2400001,
                                snapshot_freq_for_preemption=5000))
    config.sampling.snr = 0.075
    config.eval.update(dict(begin_ckpt=50, end_ckpt=96, batch_size=512, enable_sampling=True))
    config.data.dataset = "LSUN"
    config.data.image_size = 256
    # At 128 px, LSUN images are resized from the photograph as in the original; True takes the
    # subspace coordinates D of the 256 px images instead (a 128 subspace model).
    config.data.lsun_128_subspace = False
    config.model.update(dict(sigma_max=378, num_scales=2000, dropout=0.))
    return config
