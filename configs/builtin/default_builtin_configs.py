"""Defaults for CPU-sized runs on the built-in dataset.

`BUILTIN` is 32x32 RGB crops of the photographs bundled with scikit-image, so training, sampling
and likelihood run end to end on a laptop in minutes. Subspace models use the same config with
`--config.data.image_size 16` (or 8).
"""
import ml_collections
from ml_collections import config_dict

from models.utils import default_device


def get_default_configs() -> ml_collections.ConfigDict:
    """Built-in-dataset defaults: 2000 iterations of batch 32, 100 sampling steps."""
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict(dict(
        batch_size=32,
        n_iters=2000,
        snapshot_freq=500,
        log_freq=25,
        eval_freq=100,
        snapshot_freq_for_preemption=100,
        snapshot_sampling=True,
        likelihood_weighting=False,
        continuous=True,
        reduce_mean=False,
    ))
    config.sampling = ml_collections.ConfigDict(dict(
        n_steps_each=1,
        noise_removal=True,
        probability_flow=False,
        snr=0.16,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        begin_ckpt=1,
        end_ckpt=1,
        batch_size=64,
        # FID/IS need Inception weights that a CPU machine may not have; enable on demand.
        enable_sampling=False,
        num_samples=64,
        enable_loss=True,
        enable_bpd=False,
        bpd_dataset="test",
    ))
    config.data = ml_collections.ConfigDict(dict(
        dataset="BUILTIN",
        image_size=32,
        random_flip=True,
        centered=False,
        uniform_dequantization=False,
        num_channels=3,
        # Folder or .npy/.npz file for the NumPy/image-folder backend; None = the named dataset.
        root=config_dict.placeholder(str),
    ))
    config.model = ml_collections.ConfigDict(dict(
        sigma_min=0.01,
        sigma_max=50,
        # Also the number of sampling steps N.
        num_scales=100,
        beta_min=0.1,
        beta_max=20.,
        dropout=0.,
        embedding_type="fourier",
        ema_rate=0.999,
    ))
    config.optim = ml_collections.ConfigDict(dict(
        weight_decay=0,
        optimizer="Adam",
        lr=2e-4,
        beta1=0.9,
        eps=1e-8,
        warmup=100,
        grad_clip=1.,
    ))
    config.seed = 42
    config.device = default_device()
    return config
