"""NCSN++ on CIFAR-10 with discrete DDPM noise levels (VP)."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """CIFAR-10 defaults, centred data, discrete VP training, FIR NCSN++, reverse diffusion."""
    config = get_default_configs()
    config.training.update(sde="vpsde", continuous=False, reduce_mean=True)
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="none")
    config.data.update(centered=True)
    config.model.update(
        name="ncsnpp",
        scale_by_sigma=False,
        ema_rate=0.9999,
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
        embedding_type="positional",
        conv_size=3,
    )
    return config
