"""The DDPM of Ho et al. (2020) on LSUN church_outdoor (256x256)."""
import ml_collections

from configs.default_lsun_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """LSUN defaults for church_outdoor, centred data, 1000 discrete DDPM levels, lr 2e-5."""
    config = get_default_configs()
    config.training.update(sde="vpsde", continuous=False, reduce_mean=True)
    config.sampling.update(method="pc", predictor="ancestral_sampling", corrector="none")
    config.data.update(category="church_outdoor", centered=True)
    config.model.update(
        name="ddpm",
        scale_by_sigma=False,
        num_scales=1000,
        ema_rate=0.9999,
        normalization="GroupNorm",
        nonlinearity="swish",
        nf=128,
        ch_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
    )
    config.optim.update(lr=2e-5)
    return config
