"""The original DDPM network on CIFAR-10 trained with discrete SMLD noise scales."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 defaults with discrete VE (SMLD) training and the DDPM architecture."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=False)
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin")
    config.model.update(
        name="ddpm",
        scale_by_sigma=True,
        ema_rate=0.999,
        normalization="GroupNorm",
        nonlinearity="swish",
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
        conv_size=3,
    )
    return config
