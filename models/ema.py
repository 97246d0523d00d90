"""Exponential moving average (EMA) of a network's trainable parameters.

Same semantics and state format as the score-SDE code: only parameters with `requires_grad` are
tracked (so the Fourier embedding's fixed `W` is not), the shadow copies are kept in parameter
order, and `state_dict()` is `{"decay", "num_updates", "shadow_params"}`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch


def _trainable(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p for p in parameters if p.requires_grad]


class ExponentialMovingAverage:
    """Moving average s <- s - (1 - d) (s - p) of the trainable parameters p.

    With `use_num_updates`, the decay of the n-th update is min(decay, (1 + n) / (10 + n)), so the
    average follows the parameters closely at the start of training.
    """

    def __init__(self, parameters: Iterable[torch.Tensor], decay: float,
                 use_num_updates: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1]; got {decay}.")
        self.decay = decay
        self.num_updates: int | None = 0 if use_num_updates else None
        self.shadow_params = [p.detach().clone() for p in _trainable(parameters)]
        self.collected_params: list[torch.Tensor] = []

    def _matched(self, parameters: Iterable[torch.Tensor], action: str) -> list[torch.Tensor]:
        """The trainable parameters, checked against the shadow copies in number and shape."""
        params = _trainable(parameters)
        if len(params) != len(self.shadow_params):
            raise ValueError(
                f"Cannot {action}: the EMA tracks {len(self.shadow_params)} trainable parameters "
                f"but {len(params)} were given; pass the parameters of the model the EMA was "
                "built from.")
        for i, (shadow, param) in enumerate(zip(self.shadow_params, params)):
            if shadow.shape != param.shape:
                raise ValueError(
                    f"Cannot {action}: trainable parameter {i} has shape {list(param.shape)} but "
                    f"its EMA copy has {list(shadow.shape)}; pass the parameters of the model the "
                    "EMA was built from.")
        return params

    def update(self, parameters: Iterable[torch.Tensor]) -> None:
        """Move the averages towards `parameters` (call after every optimizer step)."""
        params = self._matched(parameters, "update the EMA")
        decay = self.decay
        if self.num_updates is not None:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates) / (10 + self.num_updates))
        if not params:
            return
        with torch.no_grad():
            # One kernel per list instead of three per tensor; the same values, bit for bit.
            steps = torch._foreach_sub(self.shadow_params, params)
            torch._foreach_mul_(steps, 1.0 - decay)
            torch._foreach_sub_(self.shadow_params, steps)

    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Overwrite the trainable `parameters` with their moving averages."""
        params = self._matched(parameters, "copy the EMA into the parameters")
        with torch.no_grad():
            for shadow, param in zip(self.shadow_params, params):
                param.copy_(shadow)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of all `parameters` so that `restore` can put them back."""
        self.collected_params = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the parameters saved by `store` (e.g. after evaluating with EMA weights)."""
        params = list(parameters)
        if len(params) != len(self.collected_params):
            raise ValueError(
                f"Cannot restore: {len(self.collected_params)} parameters were stored but "
                f"{len(params)} were given; call store() on the same parameters first.")
        with torch.no_grad():
            for saved, param in zip(self.collected_params, params):
                param.copy_(saved)

    @contextlib.contextmanager
    def average_parameters(self, parameters: Iterable[torch.Tensor]) -> Iterator[None]:
        """Inside the block the trainable `parameters` hold their moving averages; on exit (also
        after an exception) every parameter gets its raw value back (`store`, `copy_to`,
        `restore`), e.g. to sample or evaluate a loss with the EMA weights during training."""
        params = list(parameters)
        self.store(params)
        self.copy_to(params)
        try:
            yield
        finally:
            self.restore(params)

    def state_dict(self) -> dict:
        """`{"decay", "num_updates", "shadow_params"}`, the format of the published checkpoints."""
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow_params": list(self.shadow_params)}

    def check_state_dict(self, state_dict: Mapping) -> None:
        """Raise ValueError unless `state_dict` has one average per tracked parameter and shape."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(
                f"The EMA state is a {type(state_dict).__name__}, not the dict of decay, "
                "num_updates and shadow_params written by ExponentialMovingAverage.state_dict.")
        missing = [k for k in ("decay", "num_updates", "shadow_params") if k not in state_dict]
        if missing:
            raise ValueError(
                f"The EMA state lacks {', '.join(missing)}; expected a dict with decay, "
                "num_updates and shadow_params as written by ExponentialMovingAverage.state_dict.")
        loaded = list(state_dict["shadow_params"])
        if len(loaded) != len(self.shadow_params):
            raise ValueError(
                f"The EMA state holds {len(loaded)} averaged tensors but the model has "
                f"{len(self.shadow_params)} trainable parameters; the checkpoint was made with a "
                "different config (or a parameter's requires_grad differs).")
        for i, (new, old) in enumerate(zip(loaded, self.shadow_params)):
            if not isinstance(new, torch.Tensor) or new.shape != old.shape:
                shape = list(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(
                    f"EMA tensor {i} has shape {shape} but the model's trainable "
                    f"parameter {i} has {list(old.shape)}; the checkpoint was made with a "
                    "different config or image size.")

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Load a state saved by `state_dict` (checked first; the averages are copied)."""
        self.check_state_dict(state_dict)
        loaded = list(state_dict["shadow_params"])
        self.decay = state_dict["decay"]
        self.num_updates = state_dict["num_updates"]
        self.shadow_params = [new.detach().to(device=old.device, dtype=old.dtype, copy=True)
                              for new, old in zip(loaded, self.shadow_params)]
