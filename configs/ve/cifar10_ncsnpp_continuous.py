"""NCSN++ on CIFAR-10, VE SDE in continuous time (the subspace-diffusion VE model)."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 defaults with a continuous VE SDE, PC sampling and a 4-block NCSN++."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=True)
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin")
    config.model.update(
        name="ncsnpp",
        scale_by_sigma=True,
        ema_rate=0.999,
        normalization="GroupNorm",
        nonlinearity="swish",
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
        fir=True,
        fir_kernel=[1, 3, 3, 1],
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="residual",
        progressive_combine="sum",
        attention_type="ddpm",
        init_scale=0.,
        fourier_scale=16,
        conv_size=3,
    )
    return config
