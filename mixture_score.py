"""The exact score of an empirical data distribution: a non-Gaussian model with a known answer.

Data drawn uniformly from K images x_1..x_K diffuse to the mixture
p_t(x) = (1 / K) sum_i N(x; alpha(t) x_i, sigma(t)^2 I), whose score is exact and cheap,

    grad log p_t(x) = (alpha(t) sum_i w_i(x, t) x_i - x) / sigma(t)^2,
    w_i = softmax_i(-|x - alpha(t) x_i|^2 / (2 sigma(t)^2)),

i.e. Tweedie's data prediction is the posterior mean sum_i w_i x_i. Every correct sampler of this
model (the reverse SDE or the probability-flow ODE, solved accurately enough) ends on the training
images themselves, so the distance of a sample to its nearest image measures the sampler alone,
at image scale and with a multimodal target, without any learnt network in the way.
`EmpiricalScoreNet` speaks the networks' convention, so `models.utils.get_score_fn` and every
sampler take it like a trained model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import sde_lib


class EmpiricalScoreNet(nn.Module):
    """Exact score of the empirical distribution of `images` [K, C, H, W] diffused by `sde`, in
    the network convention of continuous models: VE returns the score, VP / sub-VP return
    -sigma(t) times the score (the noise prediction); labels map back to t through
    `sde.label_to_time`. `calls` counts the evaluations."""

    def __init__(self, sde: sde_lib.SDE, images: torch.Tensor):
        super().__init__()
        if images.dim() != 4 or images.shape[0] < 1:
            raise ValueError(f"EmpiricalScoreNet needs images shaped [K, C, H, W]; got "
                             f"{tuple(images.shape)}.")
        self.sde = sde
        self.register_buffer("images", images.detach().to(torch.float64).flatten(1))
        self.image_shape = tuple(images.shape[1:])
        self.calls = 0

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x_0 | x_t = x] = sum_i w_i(x, t) x_i, computed in float64, shaped like x."""
        flat = x.to(torch.float64).flatten(1)
        t64 = t.to(torch.float64).reshape(-1, 1)
        alpha, sigma = self.sde.alpha(t64), self.sde.sigma(t64)
        # |x - alpha x_i|^2 up to a term constant in i, then a stable softmax over i.
        logits = (alpha * (flat @ self.images.T)
                  - 0.5 * alpha**2 * (self.images**2).sum(1)) / sigma**2
        weights = torch.softmax(logits, dim=1)
        return (weights @ self.images).reshape(x.shape)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = self.sde.label_to_time(labels)
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = self.sde.alpha(t.to(torch.float64)).reshape(shape)
        sigma = self.sde.sigma(t.to(torch.float64)).reshape(shape)
        score = (alpha * self.posterior_mean(x, t) - x.to(torch.float64)) / sigma**2
        if not isinstance(self.sde, sde_lib.VESDE):
            score = -sigma * score
        return score.to(x.dtype)


def nearest_image_distances(samples: torch.Tensor, images: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Root-mean-square per-value distance of each sample to its nearest image, and the index of
    that image (samples [N, ...], images [K, ...] of the same value shape)."""
    flat_s = samples.to(torch.float64).flatten(1)
    flat_i = images.to(torch.float64).flatten(1)
    distances = torch.cdist(flat_s, flat_i)
    nearest, index = distances.min(dim=1)
    return nearest / flat_s.shape[1] ** 0.5, index
