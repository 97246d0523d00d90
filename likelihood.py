"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, Appendix D.2).

Integrating dx/dt = f~(x, t) from the data at t = eps to T gives the latent z and
log p_eps(x) = log p_T(z) + int_eps^T div f~(x_t, t) dt, with the divergence estimated by
Hutchinson's trace estimator v^T (df~/dx) v.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

import sde_lib
from models import utils as mutils
from sampling import probability_flow_drift, solve_ode

# Uniformly dequantised 8-bit pixels on [0, 1] have density 256^D times that of the integer
# pixels, i.e. 8 bits per dimension.
_BITS_PER_PIXEL = 8.0


def bits_per_dim_offset(inverse_scaler: Callable) -> float:
    """Offset converting bits/dim of scaled data to bits/dim of 8-bit pixels.

    The data scaler x' = a u + b maps pixels u in [0, 1] affinely, so
    -log2 p(u) = -log2 p(x') - log2 a per dimension; with 8 bits for [0, 1] this is
    8 + log2(1/a), read off the inverse scaler (8 for data on [0, 1], 7 for data on [-1, 1]).
    """
    probe = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    values = torch.as_tensor(inverse_scaler(probe), dtype=torch.float64)
    slope = float(values[1] - values[0])
    if not slope > 0 or not math.isclose(float(values[2] - values[1]), slope, rel_tol=1e-9):
        raise ValueError("The inverse data scaler must be an increasing affine map to compute "
                         "bits/dim; pass datasets.get_data_inverse_scaler(config).")
    return _BITS_PER_PIXEL + math.log2(slope)


def _as_score_fn(sde: sde_lib.SDE, model_or_score_fn) -> Callable:
    """A network (any nn.Module called as module(x, labels)) as a score function; a plain
    callable is taken to be a score function s(x, t) already."""
    if isinstance(model_or_score_fn, nn.Module):
        return mutils.get_score_fn(sde, model_or_score_fn, train=False, continuous=True)
    if callable(model_or_score_fn):
        return model_or_score_fn
    raise TypeError(f"Expected a score network (nn.Module) or a score function s(x, t); got "
                    f"{type(model_or_score_fn).__name__}.")


def get_likelihood_fn(sde: sde_lib.SDE, inverse_scaler: Callable,
                      hutchinson_type: str = "Rademacher", rtol: float = 1e-5, atol: float = 1e-5,
                      method: str = "RK45", eps: float = 1e-5, solver: str = "torch",
                      precision: str = "fp32") -> Callable:
    """A function `likelihood_fn(model_or_score_fn, data) -> (bpd, z, nfe)`.

    `model_or_score_fn` is a score network (or any nn.Module with forward(x, labels), such as the
    implicit subspace score) or a score function s(x, t). The probability-flow ODE is integrated
    from eps to T with RK45 (`solver="torch"` on the data's device, or `"scipy"`); bpd is the
    negative log-likelihood in bits per dimension of 8-bit data, z the latent at T and nfe the
    number of ODE right-hand-side evaluations (one score evaluation and one vector-Jacobian
    product each). An optional `generator` draws the Hutchinson noise.

    The network runs in `precision`, fp32 unless asked ("auto": as measured for the network,
    `models.utils.network_precision`): an enclosing reduced-precision block
    (`models.utils.network_options`, e.g. a bf16 sampler) does not reach the likelihood. The ODE
    state and the divergence estimate are float64/data dtype in any case.
    """
    mutils.check_precision_setting(precision)
    if hutchinson_type not in ("Gaussian", "Rademacher"):
        raise ValueError(f"Unknown Hutchinson noise '{hutchinson_type}': choose 'Gaussian' or "
                         "'Rademacher'.")
    offset = bits_per_dim_offset(inverse_scaler)

    def likelihood_fn(model_or_score_fn, data: torch.Tensor,
                      generator: torch.Generator | None = None):
        score_fn = _as_score_fn(sde, model_or_score_fn)
        shape, batch = data.shape, data.shape[0]
        num_x = data.numel()
        if hutchinson_type == "Gaussian":
            noise = torch.randn(shape, generator=generator, device=data.device, dtype=data.dtype)
        else:
            noise = torch.randint(0, 2, shape, generator=generator, device=data.device)
            noise = noise.to(data.dtype) * 2 - 1

        def ode_func(t: float, y: torch.Tensor) -> torch.Tensor:
            x = y[:num_x].reshape(shape).to(data.dtype).detach()
            vec_t = torch.ones(batch, device=data.device) * t
            with torch.enable_grad():
                x.requires_grad_(True)
                drift = probability_flow_drift(sde, score_fn, x, vec_t)
                vjp = torch.autograd.grad(torch.sum(drift * noise), x)[0]
            div = torch.sum(vjp * noise, dim=tuple(range(1, data.dim())))
            return torch.cat([drift.detach().reshape(-1), div.reshape(-1)]).to(torch.float64)

        with torch.no_grad(), mutils.network_options(precision=precision):
            init = torch.cat([data.reshape(-1).to(torch.float64),
                              torch.zeros(batch, dtype=torch.float64, device=data.device)])
            solution, nfe = solve_ode(ode_func, eps, sde.T, init, rtol=rtol, atol=atol,
                                      method=method, solver=solver)
            z = solution[:num_x].reshape(shape).to(data.dtype)
            delta_logp = solution[num_x:].to(data.dtype)
            prior_logp = sde.prior_logp(z)
            dims = num_x // batch
            bpd = -(prior_logp + delta_logp) / math.log(2) / dims + offset
        return bpd, z, nfe

    return likelihood_fn
