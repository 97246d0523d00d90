"""Defaults shared by the 256x256 experiments (LSUN, CelebA-HQ-256, FFHQ-256)."""
import ml_collections
from ml_collections import config_dict

from models.utils import default_device


def get_default_configs() -> ml_collections.ConfigDict:
    """LSUN defaults of the score-SDE code; `device` is picked when this runs."""
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict(dict(
        batch_size=64,
        n_iters=2400001,
        snapshot_freq=50000,
        log_freq=50,
        eval_freq=100,
        # Extra checkpoints so that a pre-empted job can resume.
        snapshot_freq_for_preemption=5000,
        # Draw samples at every snapshot.
        snapshot_sampling=True,
        likelihood_weighting=False,
        continuous=True,
        reduce_mean=False,
    ))
    config.sampling = ml_collections.ConfigDict(dict(
        n_steps_each=1,
        noise_removal=True,
        probability_flow=False,
        snr=0.075,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        begin_ckpt=50,
        end_ckpt=96,
        batch_size=512,
        enable_sampling=True,
        num_samples=50000,
        enable_loss=True,
        enable_bpd=False,
        bpd_dataset="test",
    ))
    config.data = ml_collections.ConfigDict(dict(
        dataset="LSUN",
        image_size=256,
        random_flip=True,
        uniform_dequantization=False,
        centered=False,
        num_channels=3,
        # Folder or .npy/.npz file for the NumPy/image-folder backend; None = the named dataset.
        root=config_dict.placeholder(str),
    ))
    config.model = ml_collections.ConfigDict(dict(
        sigma_max=378,
        sigma_min=0.01,
        num_scales=2000,
        beta_min=0.1,
        beta_max=20.,
        dropout=0.,
        embedding_type="fourier",
    ))
    config.optim = ml_collections.ConfigDict(dict(
        weight_decay=0,
        optimizer="Adam",
        lr=2e-4,
        beta1=0.9,
        eps=1e-8,
        warmup=5000,
        grad_clip=1.,
    ))
    config.seed = 42
    config.device = default_device()
    return config
