"""Multi-process runs with `torch.distributed`, launched by `torchrun`.

Without a launcher nothing here starts a process group: every helper then acts as the single
process it is (rank 0 of 1), so library code can call them unconditionally. Under
`torchrun --nproc_per_node=K` (one process per device), `setup` joins the process group that the
environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT describe, with
NCCL for CUDA devices and gloo on CPU.

How work is split:
- Training: rank r reads the items at positions r, r + W, r + 2W, ... of every global batch
  (`rank_positions`), so the union of the rank batches of a step is the single-process batch.
- Sampling: round i runs on rank i mod W with the seed it would have in one process
  (`map_rounds`), and rank 0 receives every round in order.
- Reductions (bits/dim, losses, network-evaluation counts): `all_reduce_sum`, `all_reduce_mean`,
  `concat_on_main`.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.utils import model_memory_format

# Variables torchrun sets for every worker; RANK and WORLD_SIZE mark a launched run.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Collectives wait this long for the slowest rank (a sampling round can take an hour on a GPU).
DEFAULT_TIMEOUT_MINUTES = 120


def launched() -> bool:
    """True when the process was started by torchrun (RANK and WORLD_SIZE are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Environment variable {name}={value!r} is not an integer: launch with torchrun, "
            "which sets it, or unset RANK and WORLD_SIZE for a single-process run.") from None


def is_distributed() -> bool:
    """True inside an initialised process group (even one of a single process)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes in the group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank within this node (torchrun's LOCAL_RANK; 0 without a process group)."""
    return _env_int("LOCAL_RANK") if is_distributed() and "LOCAL_RANK" in os.environ else 0


def is_main_process() -> bool:
    """True on rank 0, the process that logs and writes files (always true without a group)."""
    return get_rank() == 0


def shard() -> tuple[int, int]:
    """(rank, world size): the argument `datasets.get_dataset(..., shard=)` takes."""
    return get_rank(), get_world_size()


def rank_device(device: torch.device | str | None = None) -> torch.device:
    """The device this rank computes on: `cuda:LOCAL_RANK` for a CUDA device inside a process
    group (whatever CUDA index `device` names), else `device` (default: CUDA if present, CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type != "cuda" or not (is_distributed() or launched()):
        return device
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ValueError(
            f"Local rank {local_rank} has no GPU (this node shows {visible}): launch with "
            f"torchrun --nproc_per_node={visible} or fewer.")
    return torch.device("cuda", local_rank)


def setup(device: torch.device | str | None = None,
          timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> torch.device:
    """Join the process group described by torchrun's environment and return this rank's device.

    NCCL when the device is a GPU, gloo otherwise. Without torchrun's variables this starts
    nothing and returns `device` (default: CUDA if present, else CPU). Calling it twice is safe.
    """
    if not launched():
        return rank_device(device)
    if not dist.is_available():
        raise ValueError("This torch build has no torch.distributed: run without torchrun.")
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..WORLD_SIZE-1={world - 1}: launch with "
                         "torchrun.")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not: launch "
                         "with torchrun, or unset RANK and WORLD_SIZE for one process.")
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def teardown() -> None:
    """Leave the process group, if one was started."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank arrives here (no-op without a process group)."""
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def wrap_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` in DistributedDataParallel inside a process group of several ranks, else `model`.

    Construction broadcasts rank 0's parameters and buffers, so every rank starts identical;
    every rank takes rank 0's memory format and "auto" precision first ("auto" is timed in each
    process).
    """
    if get_world_size() == 1:
        return model
    device = torch.device(device)
    channels_last = torch.tensor([model_memory_format(model) is torch.channels_last],
                                 dtype=torch.int64, device=device)
    dist.broadcast(channels_last, src=0)
    if hasattr(model, "auto_precision"):
        model.auto_precision = broadcast_from_main(model.auto_precision)
    model = model.to(memory_format=torch.channels_last if channels_last.item()
                     else torch.contiguous_format)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def per_rank_batch_size(global_batch: int, world_size: int | None = None,
                        name: str = "config.training.batch_size") -> int:
    """The batch each rank takes so that the global batch stays `global_batch`."""
    world = get_world_size() if world_size is None else int(world_size)
    if global_batch <= 0 or global_batch % world:
        raise ValueError(
            f"{name} = {global_batch} is not a positive multiple of the {world} processes: "
            f"choose a batch size divisible by {world}, or launch a number of processes that "
            "divides it.")
    return global_batch // world


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """`shard` as (rank, world size) with 0 <= rank < world size; None means (0, 1)."""
    if shard is None:
        return 0, 1
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be a pair (rank, world_size); got {shard!r}.") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard {shard!r} needs 0 <= rank < world_size: pass (rank, world_size).")
    return rank, world


def rank_positions(n: int, rank: int, world_size: int) -> np.ndarray:
    """Positions in a global batch of `n` that belong to `rank`: rank, rank + W, rank + 2W, ...
    (the split of torch's DistributedSampler; the ranks' positions partition 0..n-1)."""
    return np.arange(rank, n, world_size, dtype=np.int64)


def rank_seed(seed: int, rank: int | None = None) -> int:
    """A seed for this rank's own randomness: `seed` on rank 0, a distinct one on other ranks."""
    rank = get_rank() if rank is None else int(rank)
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) % 2**64, rank]).generate_state(2, np.uint32)
    return (int(state[0]) << 32 | int(state[1])) >> 1


def split_rounds(num_rounds: int, rank: int | None = None, world_size: int | None = None,
                 first: int = 0) -> list[int]:
    """Rounds first..num_rounds-1 that `rank` runs: first + rank, first + rank + W, ..."""
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world_size is None else world_size
    return list(range(first + rank, num_rounds, world))


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_main(obj: Any) -> list | None:
    """Every rank's picklable `obj`, as a list in rank order on rank 0 (None on other ranks)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list:
    """Every rank's picklable `obj`, as a list in rank order on every rank."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_same_on_all_ranks(value: Any, what: str, hint: str) -> None:
    """Raise on every rank, with the values seen, unless all ranks hold the same `value`."""
    values = all_gather(value)
    if any(v != values[0] for v in values):
        raise ValueError(f"The ranks disagree on {what} ({values} in rank order): {hint}.")


def all_reduce_sum(values: float | Sequence[float]) -> float | list[float]:
    """Sum of `values` (a number or a list of numbers) over all ranks, in float64."""
    scalar = not isinstance(values, Sequence)
    if get_world_size() == 1:
        return float(values) if scalar else [float(v) for v in values]
    tensor = torch.tensor([values] if scalar else list(values), dtype=torch.float64,
                          device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    summed = tensor.cpu().tolist()
    return summed[0] if scalar else summed


def all_reduce_mean(value: float) -> float:
    """Mean of one number over all ranks (e.g. a per-rank loss over equal per-rank batches)."""
    return all_reduce_sum(float(value)) / get_world_size()


def concat_on_main(array: np.ndarray) -> np.ndarray | None:
    """The ranks' arrays concatenated along axis 0 in rank order on rank 0 (None elsewhere)."""
    parts = gather_to_main(np.asarray(array))
    return None if parts is None else np.concatenate(parts)


def map_rounds(num_rounds: int | Sequence[int], fn: Callable[[int], Any],
               on_result: Callable[[int, Any], None] | None = None, first: int = 0) -> list | None:
    """Run `fn(r)` for rounds r = first..num_rounds-1 (or for the rounds of a sequence, in its
    order) split across ranks (the i-th round on rank i mod W) and collect the results on
    rank 0 in that order.

    `fn(r)` must itself seed round r (e.g. `torch.manual_seed(seed + r)`), so the union over
    ranks equals what one process produces. The ranks advance in waves of W rounds; after each
    wave rank 0 calls `on_result(r, result)` for its rounds in order (to save progress). Returns
    the list of results on rank 0 and None on other ranks.
    """
    rank, world = get_rank(), get_world_size()
    rounds = range(first, num_rounds) if isinstance(num_rounds, int) else list(num_rounds)
    results = [] if rank == 0 else None
    for wave_start in range(0, len(rounds), world):
        position = wave_start + rank
        mine = (rounds[position], fn(rounds[position])) if position < len(rounds) else None
        gathered = gather_to_main(mine)
        if gathered is None:
            continue
        for item in gathered:
            if item is None:
                continue
            if on_result is not None:
                on_result(*item)
            results.append(item[1])
    return results


@contextlib.contextmanager
def session(device: torch.device | str | None = None,
            timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Iterator[torch.device]:
    """Join the process group when started by torchrun (else nothing), yield this process's
    device, and leave the group at the end: the frame of every entry script's work."""
    device = setup(device, timeout_minutes) if launched() else device
    try:
        yield device
    finally:
        teardown()
