"""Checkpoints in the format of the published score-SDE / subspace-diffusion checkpoints.

A checkpoint is a `torch.save` dict `{optimizer, model, ema, step}` whose model keys carry the
`module.` prefix of `DataParallel` and whose EMA entry is `{decay, num_updates, shadow_params}`.
It is read with `torch.load(weights_only=True)` and loaded strictly: every key and every shape
must match, and every problem is one `CheckpointError` sentence. Files are written atomically.
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from files import atomic_torch_save
from models.ema import ExponentialMovingAverage
from models.utils import config_derived_keys

# Published checkpoints were saved from `torch.nn.DataParallel`, whose state-dict keys carry this.
_WRAPPER_PREFIX = "module."
# How many offending keys a mismatch error names before summarising the rest.
_KEYS_SHOWN = 3


class CheckpointError(ValueError):
    """A checkpoint file or state that cannot be used as asked."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read (truncated, corrupt or not a torch file)."""


class StateDictMismatchError(CheckpointError):
    """Checkpoint weights whose names or shapes do not fit the model they are loaded into."""


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The network inside a `DataParallel` / `DistributedDataParallel` wrapper (else `model`)."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _with_prefix(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """`state_dict` as a DataParallel wrapper would have returned it (keys under `module.`)."""
    prefixed = OrderedDict((_WRAPPER_PREFIX + k, v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        root = _WRAPPER_PREFIX[:-1]
        prefixed._metadata = OrderedDict(
            [("", {"version": torch.nn.DataParallel._version})]
            + [(_WRAPPER_PREFIX + k if k else root, v) for k, v in metadata.items()])
    return prefixed


def _without_prefix(state_dict: Mapping[str, torch.Tensor]) -> OrderedDict:
    """Inverse of `_with_prefix`; keys without the prefix are kept as they are."""
    stripped = OrderedDict((k.removeprefix(_WRAPPER_PREFIX), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        root = _WRAPPER_PREFIX[:-1]
        if root in metadata:
            metadata = OrderedDict(
                ("" if k == root else k.removeprefix(_WRAPPER_PREFIX), v)
                for k, v in metadata.items() if k == root or k.startswith(_WRAPPER_PREFIX))
        stripped._metadata = metadata
    return stripped


def _name_some(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return shown + (f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else "")


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                     source: str = "The checkpoint") -> None:
    """Raise `StateDictMismatchError` unless `state_dict` has exactly the model's keys and shapes.

    A `module.` prefix is ignored. The error names the first few mis-shaped, missing and unexpected
    entries and the likely cause; `source` starts the message (e.g. "Checkpoint ckpt.pth").
    """
    state_dict = _without_prefix(state_dict)
    expected = unwrap_model(model).state_dict()
    derived = config_derived_keys(unwrap_model(model))  # e.g. `sigmas` of continuous models
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [k for k in expected if k in state_dict and k not in derived
                 and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or misshaped):
        return
    details = []
    if misshaped:
        k = misshaped[0]
        more = f" (+{len(misshaped) - 1} more mis-shaped)" if len(misshaped) > 1 else ""
        details.append(f"the checkpoint's {k} is {list(state_dict[k].shape)}, the model's is "
                       f"{list(expected[k].shape)}{more}")
    if missing:
        details.append(f"missing from the checkpoint: {_name_some(missing)}")
    if unexpected:
        details.append(f"not in the model: {_name_some(unexpected)}")
    if state_dict and len(unexpected) == len(state_dict):
        cause = "weights of another network (no parameter name in common)"
    elif misshaped and not (missing or unexpected):
        cause = "a wrong config or image size"
    else:
        cause = "a wrong config (model name, architecture options or image size)"
    raise StateDictMismatchError(
        f"{source} does not fit the model, likely {cause}: {'; '.join(details)}.")


def load_state_dict_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str = "The checkpoint") -> None:
    """Load `state_dict` (with or without `module.` prefix) after `check_state_dict` passed.

    Values are copied into the model's own tensors, so they keep the model's dtype and device
    (the float64 `sigmas` buffer stays float64). An entry the model derives from its config
    (`models.utils.config_derived_keys`: the `sigmas` of continuous-time networks) whose length
    differs from the model's keeps the model's values, so any `model.num_scales` loads.
    """
    check_state_dict(model, state_dict, source)
    target = unwrap_model(model)
    state_dict = _without_prefix(state_dict)
    own = target.state_dict()
    for key in config_derived_keys(target):
        if state_dict[key].shape != own[key].shape:
            state_dict[key] = own[key]
    target.load_state_dict(state_dict, strict=True)


def _read_checkpoint(path: Path, device: torch.device | str | None) -> Any:
    """`torch.load(path, weights_only=True)` with one clear error for unreadable files."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"Checkpoint {path} holds Python objects other than tensors and plain containers, "
                "which torch.load(weights_only=True) refuses; re-save it with "
                "utils.save_checkpoint.") from exc
        raise CorruptCheckpointError(
            f"Cannot read checkpoint {path}: the file is truncated or corrupt "
            f"({_first_line(exc)}); re-download or re-save it.") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpointError(
            f"Cannot read checkpoint {path}: the file is truncated or corrupt "
            f"({_first_line(exc)}); re-download or re-save it.") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_checkpoint(ckpt_path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a training state `{optimizer, model, ema, step}` in the published format.

    Model keys get the `module.` prefix of the original DataParallel checkpoints (a wrapped model
    is unwrapped first), the EMA is stored as its state dict, and the file is replaced atomically.
    """
    missing = [k for k in ("optimizer", "model", "ema", "step") if state.get(k) is None]
    if missing:
        raise ValueError(
            f"Cannot save checkpoint {ckpt_path}: the state lacks {', '.join(missing)}; pass a "
            "dict with optimizer, model, ema and step.")
    step = state["step"]
    saved = {
        "optimizer": state["optimizer"].state_dict(),
        "model": _with_prefix(unwrap_model(state["model"]).state_dict()),
        "ema": state["ema"].state_dict(),
        "step": int(step.item() if isinstance(step, torch.Tensor) else step),
    }
    atomic_torch_save(saved, ckpt_path)


def _missing_file_error(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"No checkpoint file at {path}: check the path.")


def _check_ema_state(ema: ExponentialMovingAverage, ema_state: Any, source: str) -> None:
    """Raise unless `ema_state` holds one average of the right shape per parameter `ema` tracks."""
    try:
        ema.check_state_dict(ema_state)
    except ValueError as exc:
        message = str(exc)
        raise StateDictMismatchError(f"{source}: {message[:1].lower()}{message[1:]}") from exc


def check_finite_weights(loaded: Mapping[str, Any], source: str) -> None:
    """Refuse weights holding NaN or infinite values (a diverged run's checkpoint) before they
    are used: `loaded` is a state dict, or a training checkpoint whose `model` state dict and
    EMA averages are checked. The sentence names `source` (the file) and the first bad entry."""
    entries: list[tuple[str, Any]] = []
    if isinstance(loaded.get("model"), Mapping):
        entries += [(f"model {k}", v) for k, v in loaded["model"].items()]
        ema = loaded.get("ema")
        if isinstance(ema, Mapping):
            entries += [(f"ema average {i}", v)
                        for i, v in enumerate(ema.get("shadow_params", []) or [])]
    else:
        entries += list(loaded.items())
    bad = [name for name, value in entries
           if isinstance(value, torch.Tensor) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(
            f"{source} holds NaN or infinite weights ({_name_some(bad)}), e.g. from a diverged "
            "training run, so it cannot be used: give an earlier checkpoint.")


def restore_checkpoint(ckpt_path: str | os.PathLike, state: dict, device: torch.device | str,
                       missing_ok: bool = False) -> dict:
    """Load a checkpoint into `state`: its `model`, and `ema`, `optimizer`, `step` when present.

    The model must match exactly (keys and shapes; `module.` prefix removed) and the EMA must hold
    one average per trainable parameter; nothing in `state` changes unless everything fits. Leave
    `optimizer` out of `state` (or set it to None) to skip optimizer state, e.g. for sampling with
    a checkpoint written by another torch version. A missing file raises `FileNotFoundError`, or
    with `missing_ok` logs it and returns `state` unchanged (preemption checkpoints: a fresh run).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        if missing_ok:
            logging.info("No checkpoint found at %s; starting from the given state.", path)
            return state
        raise _missing_file_error(path)
    if state.get("model") is None:
        raise ValueError("restore_checkpoint needs state['model'], the network to load into.")
    loaded = _read_checkpoint(path, device)
    wanted = ["model"] + [k for k in ("ema", "optimizer", "step") if state.get(k) is not None]
    if not isinstance(loaded, Mapping) or any(k not in loaded for k in wanted):
        found = ", ".join(map(str, loaded)) if isinstance(loaded, Mapping) else "no dict"
        raise CheckpointError(
            f"{path} is not a training checkpoint: it needs the entries {', '.join(wanted)} and "
            f"holds {found or 'nothing'}; for bare weights use utils.load_model_weights.")

    model = unwrap_model(state["model"])
    source = f"Checkpoint {path}"
    check_state_dict(model, loaded["model"], source)
    check_finite_weights(loaded, source)
    ema = state.get("ema")
    if ema is not None:
        _check_ema_state(ema, loaded["ema"], source)
    optimizer = state.get("optimizer")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"The optimizer state in {path} does not fit the optimizer ({_first_line(exc)}); "
                "build it over model.parameters() as in training, or leave 'optimizer' out of the "
                "state to skip it.") from exc
    load_state_dict_strict(model, loaded["model"], source)
    if ema is not None:
        ema.load_state_dict(loaded["ema"])
    if state.get("step") is not None:
        state["step"] = loaded["step"]
    return state


def load_model_weights(model: torch.nn.Module, checkpoint: str | os.PathLike | Mapping,
                       use_ema: bool = True,
                       device: torch.device | str | None = None) -> torch.nn.Module:
    """Load inference weights into `model` and return it in eval mode.

    `checkpoint` is a path or an already loaded object: a training checkpoint `{model, ema, ...}`
    (with `use_ema`, all entries come from `model`, then the EMA averages overwrite the trainable
    parameters by position, as `ema.copy_to` does after `restore_checkpoint`), or a bare state dict
    with or without the `module.` prefix. Everything is checked strictly; the optimizer entry is
    never read. `device` is where tensors are mapped while loading (default: the model's device).
    """
    target = unwrap_model(model)
    if device is None:
        device = next(iter(target.state_dict().values()), torch.empty(0)).device
    if isinstance(checkpoint, Mapping):
        loaded, source = checkpoint, "The checkpoint"
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise _missing_file_error(path)
        loaded, source = _read_checkpoint(path, device), f"Checkpoint {path}"

    if isinstance(loaded, Mapping):
        check_finite_weights(loaded, source)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        check_state_dict(target, loaded["model"], source)
        if use_ema:
            if "ema" not in loaded:
                raise CheckpointError(
                    f"{source} has no 'ema' entry; pass use_ema=False to load its raw weights.")
            ema = ExponentialMovingAverage(target.parameters(), decay=1.0)
            _check_ema_state(ema, loaded["ema"], source)
        load_state_dict_strict(target, loaded["model"], source)
        if use_ema:
            ema.load_state_dict(loaded["ema"])
            ema.copy_to(target.parameters())
    elif isinstance(loaded, Mapping) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        load_state_dict_strict(target, loaded, source)
    else:
        raise CheckpointError(
            f"{source} is neither a training checkpoint (a dict with 'model' and 'ema') nor a "
            "state dict of tensors; pass a file written by utils.save_checkpoint or torch.save("
            "model.state_dict()).")
    return model.eval()
