"""A small DDPM++ (sub-VP SDE, continuous) for the built-in dataset: the CPU twin of
`configs/subvp/cifar10_ddpmpp_continuous.py` (same options, 16 base channels, 3 resolutions)."""
import ml_collections

from configs.builtin.default_builtin_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """Built-in defaults, centred data, continuous sub-VP SDE, Euler-Maruyama, tiny DDPM++."""
    config = get_default_configs()
    config.training.update(sde="subvpsde", continuous=True, reduce_mean=True)
    config.sampling.update(method="pc", predictor="euler_maruyama", corrector="none")
    config.data.update(centered=True)
    # Off in the originals; see models/ncsnpp.py and docs/demo.md (the diagnosis).
    config.model.gaussian_dc = True
    config.model.update(
        name="ncsnpp",
        scale_by_sigma=False,
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
        fir=False,
        fir_kernel=[1, 3, 3, 1],
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="none",
        progressive_combine="sum",
        attention_type="ddpm",
        init_scale=0.,
        embedding_type="positional",
        fourier_scale=16,
        conv_size=3,
    )
    return config
