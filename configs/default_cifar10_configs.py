"""Defaults shared by the CIFAR-10 experiments (32x32 RGB, 1.3M training iterations)."""
import ml_collections
from ml_collections import config_dict


def get_default_configs() -> ml_collections.ConfigDict:
    """CIFAR-10 defaults of the score-SDE code; `device` is left to the code that uses them."""
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict(dict(
        batch_size=128,
        n_iters=1300001,
        snapshot_freq=50000,
        log_freq=50,
        eval_freq=100,
        # Extra checkpoints so that a pre-empted job can resume.
        snapshot_freq_for_preemption=10000,
        # Draw samples at every snapshot.
        snapshot_sampling=True,
        likelihood_weighting=False,
        continuous=True,
        reduce_mean=False,
        # Continuous training draws t from U(min_time, T). A subspace model only ever runs
        # above its cutoff, so it may be trained there alone (the demo's subspace models).
        min_time=1e-5,
    ))
    config.sampling = ml_collections.ConfigDict(dict(
        n_steps_each=1,
        noise_removal=True,
        probability_flow=False,
        snr=0.16,
        # Few-step solvers (method heun, dpm_solver, sde_dpm_solver, ddim; see solvers.py):
        # solver steps (None: the solver's default), time schedule uniform / edm / logsnr (None:
        # the solver's default), Heun's stochastic churn S_churn and DDIM's eta. With a subspace
        # plan, `split` names the schedule whose share of each stage divides the steps over the
        # stages (None: the solver's own grid; "uniform": the share of t).
        steps=config_dict.placeholder(int),
        schedule=config_dict.placeholder(str),
        split=config_dict.placeholder(str),
        churn=0.0,
        eta=0.0,
    ))
    config.eval = ml_collections.ConfigDict(dict(
        begin_ckpt=9,
        end_ckpt=26,
        batch_size=1024,
        enable_sampling=False,
        num_samples=50000,
        enable_loss=True,
        enable_bpd=False,
        bpd_dataset="test",
        # Bits/dim over at most this many images per pass (0 = the whole split, as the original).
        bpd_num_images=0,
        # Inception network of FID/KID: "tfhub" (TF-Hub's, with the Inception score), "torch"
        # (its PyTorch port, no TensorFlow) or "auto" (TF-Hub's when it loads, else the port).
        inception="auto",
        # Its bilinear resize to 299: "halfpixel" (TF2's, TF-GAN's preprocess_image) or "tf1"
        # (TF1's resize_bilinear, the 2015 graph's own; see docs/inception.md).
        inception_resize="halfpixel",
    ))
    config.data = ml_collections.ConfigDict(dict(
        dataset="CIFAR10",
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
        num_scales=1000,
        beta_min=0.1,
        beta_max=20.,
        dropout=0.1,
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
    # None: the device is chosen where the config is used (models.utils.config_device).
    config.device = None
    return add_performance_fields(config)


def add_performance_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the fields of this project that choose how networks run, with defaults that keep
    fp32 results: memory format, precision, compilation, gradient accumulation."""
    # auto: measured per network on the CPU (models.utils.measure_memory_format), channels-last
    # on CUDA in reduced precision; or contiguous, channels_last.
    config.model.memory_format = "auto"
    # Network forward/backward in fp32, bf16 or fp16 (autocast; fp16 training scales the loss),
    # or auto: a reduced precision only where the device has it natively and it is measured
    # faster (docs/precision.md). fp32 by default: reduced precision changes the results.
    config.training.precision = "fp32"
    # Split each batch into this many micro-batches: the same update with less memory.
    config.training.grad_accum = 1
    # torch.compile the network (worth it on GPUs).
    config.training.compile = False
    # Sampling networks in fp32, bf16, fp16 or auto (recommended for speed; see above);
    # likelihoods run in fp32 unless asked.
    config.sampling.precision = "fp32"
    config.sampling.compile = False
    return config
