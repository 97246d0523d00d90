"""Training objectives and optimisation: denoising score matching for every SDE, the discrete
SMLD and DDPM losses, the Adam optimiser with warm-up and clipping, and the one-step function."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.optim as optim

import sde_lib
from models import utils as mutils
from sde_lib import VESDE, VPSDE, batch_broadcast, subVPSDE


def get_optimizer(config, params: Iterable[torch.Tensor]) -> optim.Optimizer:
    """Adam with lr, beta1 (beta2 = 0.999), eps and weight_decay from `config.optim`."""
    if config.optim.optimizer != "Adam":
        raise ValueError(f"Optimizer '{config.optim.optimizer}' is not supported: set "
                         "config.optim.optimizer to 'Adam'.")
    # foreach (torch's default only on CUDA): the same steps, bit for bit, with one kernel per
    # parameter list on CPU instead of a Python loop over the tensors.
    return optim.Adam(params, lr=config.optim.lr, betas=(config.optim.beta1, 0.999),
                      eps=config.optim.eps, weight_decay=config.optim.weight_decay, foreach=True)


def optimization_manager(config) -> Callable:
    """An `optimize_fn(optimizer, params, step, lr, warmup, grad_clip, grad_scaler=None)` that
    sets the learning rate to lr * min(step / warmup, 1) (lr itself when warmup is 0), clips the
    gradient norm to grad_clip when grad_clip >= 0, and takes one optimizer step (through
    `grad_scaler` for fp16 loss scaling). Defaults from `config.optim`."""

    def optimize_fn(optimizer: optim.Optimizer, params: Iterable[torch.Tensor], step: int,
                    lr: float = config.optim.lr, warmup: int = config.optim.warmup,
                    grad_clip: float = config.optim.grad_clip,
                    grad_scaler: torch.amp.GradScaler | None = None) -> None:
        # Always set the rate, so a resumed optimizer follows the config, not the checkpoint.
        for group in optimizer.param_groups:
            group["lr"] = lr * min(step / warmup, 1.0) if warmup > 0 else lr
        if grad_scaler is not None:
            # fp16 loss scaling: clip the true gradients; skip the step if they overflowed.
            grad_scaler.unscale_(optimizer)
        if grad_clip >= 0:
            # foreach on every device: the same norms and scaled gradients, bit for bit, and
            # on CPU one kernel per list instead of a Python loop over the tensors.
            torch.nn.utils.clip_grad_norm_(list(params), max_norm=grad_clip, foreach=True)
        if grad_scaler is None:
            optimizer.step()
        else:
            grad_scaler.step(optimizer)
            grad_scaler.update()

    return optimize_fn


# One generator for the batch, or one per example (so a batch split across processes draws the
# same values as the whole batch in one process).
Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(sample: Callable, shape: tuple[int, ...], generator: Generators,
          **kwargs) -> torch.Tensor:
    """`sample(shape, generator=generator, **kwargs)`; with a sequence of generators, row i of
    the result is drawn from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return sample(shape, generator=generator, **kwargs)
    if len(generator) != shape[0]:
        raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]}: pass one "
                         "generator per example, or a single generator.")
    return torch.stack([sample(tuple(shape[1:]), generator=g, **kwargs) for g in generator])


def _reduce_op(reduce_mean: bool) -> Callable:
    """Per-example reduction over data dimensions: mean, or half the sum."""
    if reduce_mean:
        return lambda x: torch.mean(x, dim=-1)
    return lambda x: 0.5 * torch.sum(x, dim=-1)


def get_sde_loss_fn(sde: sde_lib.SDE, train: bool, reduce_mean: bool = True,
                    continuous: bool = True, likelihood_weighting: bool = True,
                    eps: float = 1e-5) -> Callable:
    """Denoising score matching loss `loss_fn(model, batch, generator=None)` (Song et al. 2021,
    eq. 7) with t ~ U(eps, T) and x_t = alpha(t) x_0 + sigma(t) z. `generator` may also be a
    sequence of one generator per example, which draws that example's t, then its z.

    Without likelihood weighting the weight is lambda(t) = sigma(t)^2, i.e. ||sigma s + z||^2;
    with it, lambda(t) = g(t)^2, i.e. g(t)^2 ||s + z / sigma||^2 (Song et al. 2021b).
    """
    reduce_op = _reduce_op(reduce_mean)

    def loss_fn(model: nn.Module, batch: torch.Tensor,
                generator: Generators = None) -> torch.Tensor:
        score_fn = mutils.get_score_fn(sde, model, train=train, continuous=continuous)
        t = _draw(torch.rand, (batch.shape[0],), generator, device=batch.device)
        t = t * (sde.T - eps) + eps
        z = _draw(torch.randn, tuple(batch.shape), generator, device=batch.device,
                  dtype=batch.dtype)
        mean, std = sde.marginal_prob(batch, t)
        std = batch_broadcast(std, batch)
        score = score_fn(mean + std * z, t)
        if likelihood_weighting:
            g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
            losses = torch.square(score + z / std)
            losses = reduce_op(losses.reshape(losses.shape[0], -1)) * g2
        else:
            losses = torch.square(score * std + z)
            losses = reduce_op(losses.reshape(losses.shape[0], -1))
        return torch.mean(losses)

    return loss_fn


def get_smld_loss_fn(vesde: VESDE, train: bool, reduce_mean: bool = False) -> Callable:
    """Discrete SMLD (NCSN) loss over the N noise levels, weighted by sigma^2 (legacy training)."""
    if not isinstance(vesde, VESDE):
        raise ValueError(f"SMLD training needs a VE SDE, not {vesde.__class__.__name__}.")
    # NCSN networks index their noise levels from the largest down.
    smld_sigma_array = torch.flip(vesde.discrete_sigmas, dims=(0,))
    reduce_op = _reduce_op(reduce_mean)

    def loss_fn(model: nn.Module, batch: torch.Tensor,
                generator: Generators = None) -> torch.Tensor:
        model_fn = mutils.get_model_fn(model, train=train)
        labels = _draw(functools.partial(torch.randint, 0, vesde.N), (batch.shape[0],),
                       generator, device=batch.device)
        sigmas = smld_sigma_array.to(batch.device)[labels]
        noise = _draw(torch.randn, tuple(batch.shape), generator, device=batch.device,
                      dtype=batch.dtype) * batch_broadcast(sigmas, batch)
        score = model_fn(batch + noise, labels)
        target = -noise / batch_broadcast(sigmas**2, batch)
        losses = torch.square(score - target)
        losses = reduce_op(losses.reshape(losses.shape[0], -1)) * sigmas**2
        return torch.mean(losses)

    return loss_fn


def get_ddpm_loss_fn(vpsde: VPSDE, train: bool, reduce_mean: bool = True) -> Callable:
    """Discrete DDPM loss ||eps_theta(x_i, i) - z||^2 over the N steps (legacy training)."""
    if not isinstance(vpsde, VPSDE) or isinstance(vpsde, subVPSDE):
        raise ValueError(f"DDPM training needs a VP SDE, not {vpsde.__class__.__name__}.")
    reduce_op = _reduce_op(reduce_mean)

    def loss_fn(model: nn.Module, batch: torch.Tensor,
                generator: Generators = None) -> torch.Tensor:
        model_fn = mutils.get_model_fn(model, train=train)
        labels = _draw(functools.partial(torch.randint, 0, vpsde.N), (batch.shape[0],),
                       generator, device=batch.device)
        sqrt_alphas_cumprod = vpsde.sqrt_alphas_cumprod.to(batch.device)[labels]
        sqrt_1m_alphas_cumprod = vpsde.sqrt_1m_alphas_cumprod.to(batch.device)[labels]
        noise = _draw(torch.randn, tuple(batch.shape), generator, device=batch.device,
                      dtype=batch.dtype)
        perturbed = (batch_broadcast(sqrt_alphas_cumprod, batch) * batch
                     + batch_broadcast(sqrt_1m_alphas_cumprod, batch) * noise)
        losses = torch.square(model_fn(perturbed, labels) - noise)
        return torch.mean(reduce_op(losses.reshape(losses.shape[0], -1)))

    return loss_fn


def get_step_fn(sde: sde_lib.SDE, train: bool, optimize_fn: Callable | None = None,
                reduce_mean: bool = False, continuous: bool = True,
                likelihood_weighting: bool = False, precision: str = "fp32",
                grad_accum: int = 1, compile: bool | str = False,
                min_time: float = 1e-5) -> Callable:
    """A function `step_fn(state, batch, generator=None) -> loss` for one training/eval step
    (`generator`: one generator, or one per example; see `get_sde_loss_fn`).

    `state` holds `model`, `optimizer`, `ema` (models.ema.ExponentialMovingAverage) and `step`.
    Training computes the loss, back-propagates, calls `optimize_fn` at the current step,
    increments `state['step']` and updates the EMA; evaluation computes the loss under no_grad
    with the EMA weights swapped in, then restores the raw weights.

    `precision` ("fp32", "bf16", "fp16") and `compile` apply to the network calls only
    (`models.utils.network_options`); fp16 training scales the loss (`torch.amp.GradScaler`).
    `grad_accum` = k splits the batch into k equal micro-batches whose gradients add up to the
    whole batch's (the losses are means over examples), so the update is the same to float
    rounding when every example has its own generator; the returned loss is the whole batch's.
    Continuous training draws t from U(min_time, T) (`get_sde_loss_fn`).
    """
    mutils.check_precision(precision)
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"Gradient accumulation needs a positive whole number of micro-batches, "
                         f"not {grad_accum!r}: set config.training.grad_accum to 1 or more.")
    if not 0 < min_time < sde.T:
        raise ValueError(f"The smallest training time must lie in (0, T = {sde.T}); got "
                         f"{min_time}: set config.training.min_time accordingly.")
    if continuous:
        loss_fn = get_sde_loss_fn(sde, train, reduce_mean=reduce_mean, continuous=True,
                                  likelihood_weighting=likelihood_weighting, eps=min_time)
    else:
        if likelihood_weighting:
            raise ValueError("Likelihood weighting needs continuous training: set "
                             "config.training.likelihood_weighting=False or continuous=True.")
        if isinstance(sde, VESDE):
            loss_fn = get_smld_loss_fn(sde, train, reduce_mean=reduce_mean)
        elif isinstance(sde, VPSDE) and not isinstance(sde, subVPSDE):
            loss_fn = get_ddpm_loss_fn(sde, train, reduce_mean=reduce_mean)
        else:
            raise ValueError(f"Discrete training is not available for {sde.__class__.__name__}: "
                             "set config.training.continuous=True.")
    if train and optimize_fn is None:
        raise ValueError("A training step needs an optimize_fn: pass "
                         "losses.optimization_manager(config).")

    grad_scalers: dict[str, torch.amp.GradScaler] = {}

    def accumulate_gradients(model: nn.Module, batch: torch.Tensor, generator: Generators,
                             grad_scaler: torch.amp.GradScaler | None) -> torch.Tensor:
        """Back-propagate the batch's mean loss in `grad_accum` micro-batches; return it."""
        size = batch.shape[0]
        if size % grad_accum:
            raise ValueError(f"A batch of {size} does not split into {grad_accum} equal "
                             "micro-batches: make config.training.batch_size (per process) a "
                             "multiple of config.training.grad_accum.")
        micro = size // grad_accum
        total = torch.zeros((), device=batch.device)
        for i in range(grad_accum):
            part = slice(i * micro, (i + 1) * micro)
            gens = generator if generator is None or isinstance(generator, torch.Generator) \
                else generator[part]
            # DistributedDataParallel: reduce the gradients once, after the last micro-batch.
            sync = i == grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                loss = loss_fn(model, batch[part], generator=gens) / grad_accum
                (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()
            total += loss.detach()
        return total

    def step_fn(state: dict, batch: torch.Tensor,
                generator: Generators = None) -> torch.Tensor:
        model = state["model"]
        if train:
            optimizer = state["optimizer"]
            optimizer.zero_grad()
            grad_scaler = None
            if precision == "fp16":
                if batch.device.type not in grad_scalers:
                    grad_scalers[batch.device.type] = torch.amp.GradScaler(batch.device.type)
                grad_scaler = grad_scalers[batch.device.type]
            if grad_accum == 1 and grad_scaler is None:
                loss = loss_fn(model, batch, generator=generator)
                loss.backward()
            else:
                loss = accumulate_gradients(model, batch, generator, grad_scaler)
            scaler_kwargs = {} if grad_scaler is None else {"grad_scaler": grad_scaler}
            optimize_fn(optimizer, model.parameters(), step=state["step"], **scaler_kwargs)
            state["step"] += 1
            state["ema"].update(model.parameters())
        else:
            with torch.no_grad(), state["ema"].average_parameters(model.parameters()):
                loss = loss_fn(model, batch, generator=generator)
        return loss

    def step_with_network_options(state: dict, batch: torch.Tensor,
                                  generator: Generators = None) -> torch.Tensor:
        with mutils.network_options(precision=precision, compile=compile):
            return step_fn(state, batch, generator=generator)

    return step_with_network_options
