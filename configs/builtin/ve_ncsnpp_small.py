"""A small NCSN++ (VE SDE, continuous) for the built-in dataset: the CPU twin of
`configs/ve/cifar10_ncsnpp_continuous.py` (same options, 16 base channels, 3 resolutions)."""
import ml_collections

from configs.builtin.default_builtin_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """Built-in defaults with a continuous VE SDE (sigma 0.01..50), PC sampling, tiny NCSN++."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=True)
    config.sampling.update(method="pc", predictor="reverse_diffusion", corrector="langevin",
                           snr=0.16)
    config.data.update(centered=False)
    config.model.update(
        name="ncsnpp",
        sigma_min=0.01,
        sigma_max=50,
        scale_by_sigma=True,
        normalization="GroupNorm",
        nonlinearity="swish",
        nf=16,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        # Attention only where 8x8 is an internal resolution (image sizes 32, 16 and 8 all have it).
        attn_resolutions=(8,),
        dropout=0.,
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
        embedding_type="fourier",
        fourier_scale=16,
        conv_size=3,
    )
    return config
