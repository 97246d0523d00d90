"""NCSN on CIFAR-10 with techniques 1, 2 and 4 of NCSNv2 only."""
import ml_collections

from configs.default_cifar10_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """NCSN (v1) with InstanceNorm++ and ELU, trained on discrete noise scales, ALD sampling."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=False)
    config.sampling.update(method="pc", predictor="none", corrector="ald",
                           n_steps_each=5, snr=0.176)
    config.model.update(
        name="ncsn",
        scale_by_sigma=False,
        num_scales=232,
        ema_rate=0.,
        normalization="InstanceNorm++",
        nonlinearity="elu",
        nf=128,
        interpolation="bilinear",
    )
    config.optim.update(
        weight_decay=0,
        optimizer="Adam",
        lr=1e-3,
        beta1=0.9,
        amsgrad=False,
        eps=1e-8,
        warmup=0,
        grad_clip=-1.,
    )
    return config
