"""NCSNv2 on CelebA (64x64) (Song & Ermon, 2020)."""
import ml_collections

from configs.default_celeba_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The CelebA defaults with the 64-pixel NCSNv2 on 500 discrete noise scales, ALD sampling."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=False)
    config.sampling.update(method="pc", predictor="none", corrector="ald",
                           n_steps_each=5, snr=0.128)
    config.model.update(
        name="ncsnv2_64",
        scale_by_sigma=True,
        num_scales=500,
        ema_rate=0.999,
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
        grad_clip=-1.,
    )
    return config
