"""NCSN on CelebA with techniques 1, 2, 4 and 5 of NCSNv2 only."""
import ml_collections

from configs.default_celeba_configs import get_default_configs


def get_config() -> ml_collections.ConfigDict:
    """NCSN (v1) with InstanceNorm++ and ELU, trained on discrete noise scales, ALD sampling."""
    config = get_default_configs()
    config.training.update(sde="vesde", continuous=False)
    config.sampling.update(method="pc", predictor="none", corrector="ald",
                           n_steps_each=5, snr=0.128)
    config.model.update(
        name="ncsn",
        scale_by_sigma=False,
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
        lr=1e-3,
        beta1=0.9,
        amsgrad=False,
        eps=1e-8,
        warmup=0,
        grad_clip=-1.,
    )
    return config
