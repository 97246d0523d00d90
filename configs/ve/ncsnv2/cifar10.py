"""NCSNv2 on CIFAR-10 (Song & Ermon, 2020)."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """The CIFAR-10 defaults with the 64-pixel NCSNv2 on 232 discrete noise scales, ALD sampling."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=False)
    config.sampling.update(method="pc", predictor="none", corrector="ald",
                           n_steps_each=5, snr=0.176)
    config.model.update(
        name="ncsnv2_64",
        scale_by_sigma=True,
        num_scales=232,
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
