"""Controllable generation with a score model: PC inpainting and colorization.

Both solve an inverse problem by running the predictor-corrector sampler while the known part of
the state is replaced, after every update, by the data perturbed to the current time, x_known(t) =
alpha(t) y + sigma(t) z (Song et al. 2021, Appendix I.2): the windowed sampler
`sampling.pc_sample_window` with the replacement as its per-update callback. The model can be
any network called as `model(x, labels)`, the implicit subspace score
(`models.subspace_model.SubspaceScore`) included.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

import sde_lib
from models import utils as mutils
from sampling import pc_sample_window
from sde_lib import batch_broadcast

# Known part of the state from its noise-free mean, noisy state and time: (x, x_mean, t) -> both.
Impose = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _conditional_pc_loop(score_fn, sde: sde_lib.SDE, x: torch.Tensor, predictor, corrector,
                         snr: float, n_steps: int, probability_flow: bool, eps: float,
                         impose: Impose, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The PC sampler over linspace(T, eps, N) with `impose` applied after every update: the
    windowed sampler `pc_sample_window` over [T, eps] with `impose` as its per-update callback."""
    x, x_mean, _ = pc_sample_window(score_fn, sde, x, sde.T, eps, sde.N, predictor, corrector,
                                    snr, n_steps_each=n_steps, probability_flow=probability_flow,
                                    progress=progress, callback=impose)
    return x, x_mean


def _perturbed(sde: sde_lib.SDE, y: torch.Tensor, t: torch.Tensor):
    """Mean alpha(t) y and a sample alpha(t) y + sigma(t) z of the data perturbed to time t."""
    mean, std = sde.marginal_prob(y, t)
    return mean + batch_broadcast(std, y) * torch.randn_like(y), mean


def get_pc_inpainter(sde: sde_lib.SDE, predictor, corrector, inverse_scaler, snr: float,
                     n_steps: int = 1, probability_flow: bool = False, continuous: bool = False,
                     denoise: bool = True, eps: float = 1e-5, progress: bool = False) -> Callable:
    """An inpainter `pc_inpainter(model, data, mask) -> images`.

    `data` is a batch in the model's (scaled) space and `mask` is 1 on known pixels, 0 where the
    image is to be generated. Returns `inverse_scaler` of the final state (its noise-free mean when
    `denoise`).
    """

    def pc_inpainter(model, data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[-2:] != data.shape[-2:]:
            raise ValueError(f"The mask of shape {tuple(mask.shape)} does not fit images of shape "
                             f"{tuple(data.shape)}.")
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)

        def impose(x, x_mean, t):
            known, known_mean = _perturbed(sde, data, t)
            return x * (1 - mask) + known * mask, x_mean * (1 - mask) + known_mean * mask

        with torch.no_grad():
            x = data * mask + sde.prior_sampling(data.shape).to(data) * (1 - mask)
            x, x_mean = _conditional_pc_loop(score_fn, sde, x, predictor, corrector, snr, n_steps,
                                             probability_flow, eps, impose, progress)
            return inverse_scaler(x_mean if denoise else x)

    return pc_inpainter


def _colour_basis(device) -> torch.Tensor:
    """Orthonormal 3x3 matrix whose first column is the grey direction (1, 1, 1) / sqrt(3)."""
    return torch.tensor([[1 / math.sqrt(3), -2 / math.sqrt(6), 0.0],
                         [1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)],
                         [1 / math.sqrt(3), 1 / math.sqrt(6), -1 / math.sqrt(2)]], device=device)


def get_pc_colorizer(sde: sde_lib.SDE, predictor, corrector, inverse_scaler, snr: float,
                     n_steps: int = 1, probability_flow: bool = False, continuous: bool = False,
                     denoise: bool = True, eps: float = 1e-5, progress: bool = False) -> Callable:
    """A colorizer `pc_colorizer(model, gray_scale_img) -> images`.

    In the colour basis whose first channel is the grey level, that channel is known (from the
    grey-scale batch, whose three channels are equal) and the other two are generated.
    """

    def pc_colorizer(model, gray_scale_img: torch.Tensor) -> torch.Tensor:
        if gray_scale_img.shape[1] != 3:
            raise ValueError(f"Colorization needs RGB-shaped images (3 equal channels); got "
                             f"{gray_scale_img.shape[1]} channels.")
        basis = _colour_basis(gray_scale_img.device)

        def decouple(x):
            return torch.einsum("bihw,ij->bjhw", x, basis.to(x.dtype))

        def couple(x):
            return torch.einsum("bjhw,ij->bihw", x, basis.to(x.dtype))

        mask = torch.zeros_like(gray_scale_img)
        mask[:, :1] = 1
        grey = decouple(gray_scale_img)
        score_fn = mutils.get_score_fn(sde, model, train=False, continuous=continuous)

        def impose(x, x_mean, t):
            known, known_mean = _perturbed(sde, grey, t)
            x = couple(decouple(x) * (1 - mask) + known * mask)
            x_mean = couple(decouple(x_mean) * (1 - mask) + known_mean * mask)
            return x, x_mean

        with torch.no_grad():
            prior = sde.prior_sampling(gray_scale_img.shape).to(gray_scale_img)
            x = couple(grey * mask + decouple(prior) * (1 - mask))
            x, x_mean = _conditional_pc_loop(score_fn, sde, x, predictor, corrector, snr, n_steps,
                                             probability_flow, eps, impose, progress)
            return inverse_scaler(x_mean if denoise else x)

    return pc_colorizer


MASKS = ("right_half", "left_half", "bottom_half", "top_half", "center")


def inpainting_mask(kind: str, shape) -> torch.Tensor:
    """A 0/1 mask of `shape` [B, C, H, W]: 1 on known pixels, 0 on the region `kind` (one of
    MASKS) that is to be generated."""
    mask = torch.ones(tuple(shape))
    height, width = shape[-2], shape[-1]
    regions = {
        "right_half": (slice(None), slice(width // 2, None)),
        "left_half": (slice(None), slice(None, width // 2)),
        "bottom_half": (slice(height // 2, None), slice(None)),
        "top_half": (slice(None, height // 2), slice(None)),
        "center": (slice(height // 4, height - height // 4), slice(width // 4, width - width // 4)),
    }
    if kind not in regions:
        raise ValueError(f"Unknown mask '{kind}': choose one of {', '.join(MASKS)}.")
    rows, cols = regions[kind]
    mask[..., rows, cols] = 0
    return mask
