"""NCSN++ on CelebA (64x64) with discrete SMLD noise scales."""
import ml_collections

from configs.default_celeba_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The CelebA defaults with discrete VE (SMLD) training and a positional-embedding NCSN++."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=False)
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin")
    config.model.update(
        name="ncsnpp",
        scale_by_sigma=True,
        # Kept from the original, which sets this field; nothing reads it (sigma_max stays 90).
        sigma_begin=90,
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
        init_scale=0.0,
        conv_size=3,
        embedding_type="positional",
    )
    return config
