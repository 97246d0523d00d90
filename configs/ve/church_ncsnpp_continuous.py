"""NCSN++ on LSUN church_outdoor (256x256), VE SDE in continuous time."""
import ml_collections

from configs.default_lsun_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The LSUN defaults for church_outdoor with the 256x256 NCSN++ and sigma_max 380."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=True)
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin")
    config.data.update(category="church_outdoor")
    config.model.update(
        name="ncsnpp",
        sigma_max=380,
        scale_by_sigma=True,
        ema_rate=0.999,
        normalization="GroupNorm",
        nonlinearity="swish",
        nf=128,
        ch_mult=(1, 1, 2, 2, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        resamp_with_conv=True,
        conditional=True,
        fir=True,
        fir_kernel=[1, 3, 3, 1],
        skip_rescale=True,
        resblock_type="biggan",
        progressive="output_skip",
        progressive_input="input_skip",
        progressive_combine="sum",
        attention_type="ddpm",
        init_scale=0.,
        fourier_scale=16,
        conv_size=3,
    )
    return config
