"""Defaults for CPU-sized runs on the built-in dataset.

`BUILTIN` is 32x32 RGB crops of the photographs bundled with scikit-image, so training, sampling
and likelihood run end to end on a laptop in minutes. Subspace models use the same config with
`--config.data.image_size 16` (or 8). Everything not set here is the CIFAR-10 default (same image
size and channel count).
"""
import ml_collections

from configs.default_cifar10_configs import get_default_configs as cifar10_defaults


def get_default_configs() -> ml_collections.ConfigDict:
    """Built-in-dataset defaults: 2000 iterations of batch 32, 100 sampling steps."""
    config = cifar10_defaults()
    config.training.update(dict(
        batch_size=32,
        n_iters=2000,
        snapshot_freq=500,
        log_freq=25,
        snapshot_freq_for_preemption=100,
    ))
    config.eval.update(dict(
        begin_ckpt=1,
        end_ckpt=1,
        batch_size=64,
        # FID/IS need Inception weights that a CPU machine may not have; enable on demand.
        num_samples=64,
    ))
    config.data.dataset = "BUILTIN"
    # Also the number of sampling steps N.
    config.model.num_scales = 100
    config.model.dropout = 0.
    config.model.ema_rate = 0.999
    config.optim.warmup = 100
    return config
