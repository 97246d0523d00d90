"""NCSNv2 on LSUN bedroom at 128x128 (Song & Ermon, 2020)."""
import ml_collections

from configs.default_lsun_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The LSUN defaults at 128x128 with the 128-pixel NCSNv2, 1086 scales up to sigma 190."""
    config = get_default_configs()
    config.training.update(
        batch_size=128,
        sde="vesde",
        # Misspelt in the original and kept: `training.continuous` keeps its default (True).
        continuouse=False,
    )
    config.sampling.update(method="pc", predictor="none", corrector="ald",
                           n_steps_each=3, snr=0.095)
    config.data.update(category="bedroom", image_size=128)
    config.model.update(
        name="ncsnv2_128",
        scale_by_sigma=True,
        sigma_max=190,
        num_scales=1086,
        ema_rate=0.9999,
        sigma_min=0.01,
        normalization="InstanceNorm++",
        nonlinearity="elu",
        nf=128,
        interpolation="bilinear",
    )
    config.optim.update(
        weight_decay=0,
        optimizer="Adam",
        lr=1e-4,
        beta1=0.9,
        amsgrad=False,
        eps=1e-8,
        warmup=0,
        grad_clip=-1,
    )
    return config
