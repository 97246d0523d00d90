"""The DDPM of Ho et al. (2020) on CIFAR-10, discrete DDPM training."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """CIFAR-10 defaults, centred data, discrete VP (DDPM) training, ancestral sampling."""
    config = get_default_configs()
    config.training.update(sde="vpsde", continuous=False, reduce_mean=True)
    config.sampling.update(method="pc", predictor="ancestral_sampling", corrector="none")
    config.data.update(centered=True)
    config.model.update(
        name="ddpm",
        scale_by_sigma=False,
        ema_rate=0.9999,
        normalization="GroupNorm",
        nonlinearity="swish",
        nf=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
    )
    return config
