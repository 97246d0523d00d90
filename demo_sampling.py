"""Sampling and timing for the demo: each sampler (full only, subspace plans) at N steps from
common random numbers, the seconds spent in each network's calls (`ForwardTimer`), the
speed-ups over the full-only sampler, and the machine the times were measured on.
"""
from __future__ import annotations

import copy
import os
import platform
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch

import datasets
import evaluation
import sampling
import sde_lib
import subspace_lib as sl
from demo_settings import FULL_SIZE, DemoSettings
from models import utils as mutils
from subspace_sampling import StageReport, subspace_pc_sample


class ForwardTimer:
    """Within a `with` block, the wall-clock and CPU seconds spent inside each network's forward
    passes (module hooks, so the samplers run unchanged), and the number of passes; in total
    and per `label` (set it to name whoever is calling the networks, e.g. the sampler)."""

    def __init__(self, networks: dict[int, torch.nn.Module]):
        self.networks = networks
        self.totals = _zero_totals(networks)
        self.label: Hashable | None = None
        self.by_label: dict[Hashable, dict[str, dict]] = {}
        self._handles: list = []

    def __enter__(self) -> ForwardTimer:
        for size, net in self.networks.items():
            started: list[tuple[float, float]] = []
            total = self.totals[str(size)]

            def before(module, inputs, started=started):
                started.append((time.perf_counter(), time.process_time()))

            def after(module, inputs, output, started=started, total=total, size=str(size)):
                wall, cpu = started.pop()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                mine = [total]
                if self.label is not None:
                    mine.append(self.by_label.setdefault(
                        self.label, _zero_totals(self.networks))[size])
                for t in mine:
                    t["seconds"] += wall
                    t["cpu_seconds"] += cpu
                    t["calls"] += 1

            self._handles += [net.register_forward_pre_hook(before),
                              net.register_forward_hook(after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def costs(self, batch: int, label: Hashable | None = None) -> dict[str, dict]:
        """Per size: mean wall-clock and CPU seconds of one forward pass, the number of passes
        and the batch they were made on; over all passes, or over those made under `label`
        (sizes that it never called are left out)."""
        if label is None:
            totals = self.totals
        else:
            totals = {size: t for size, t in self.by_label.get(label, {}).items() if t["calls"]}
        return {size: {"seconds": t["seconds"] / max(t["calls"], 1),
                       "cpu_seconds": t["cpu_seconds"] / max(t["calls"], 1),
                       "calls": t["calls"], "batch": batch} for size, t in totals.items()}


def _zero_totals(networks: dict) -> dict[str, dict]:
    return {str(size): {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0} for size in networks}


def _sampler_kwargs(config) -> dict:
    return dict(predictor=config.sampling.predictor, corrector=config.sampling.corrector,
                snr=config.sampling.snr, n_steps_each=config.sampling.n_steps_each)


def sde_with_steps(config, num_steps: int) -> tuple[sde_lib.SDE, float]:
    """The config's SDE discretised with `num_steps` steps N (the networks do not depend on N)."""
    cfg = copy.deepcopy(config)
    cfg.model.num_scales = int(num_steps)
    return sde_lib.get_sde(cfg)


def sample_full_only(full_net, config, batch: int, num_steps: int, seed: int, progress: bool
                     ) -> tuple[torch.Tensor, dict]:
    """One batch of N-step PC sampling (the config's predictor/corrector), full network only,
    from the prior and increments of `sampling.CommonNoise(seed)`."""
    sde, eps = sde_with_steps(config, num_steps)
    device = config.device
    score_fn = mutils.get_score_fn(sde, full_net, train=False, continuous=True)
    noise = sampling.CommonNoise(seed, (batch, config.data.num_channels, FULL_SIZE, FULL_SIZE))
    torch.manual_seed(seed)
    began = time.perf_counter()
    cpu0 = time.process_time()
    x = noise.prior().to(device=device, dtype=torch.float32)
    x, _, nfe = sampling.pc_sample_window(score_fn, sde, x, sde.T, eps, sde.N,
                                          probability_flow=False, denoise=True,
                                          progress=progress, desc=f"full only, N = {sde.N}",
                                          eps=eps, noise=noise, **_sampler_kwargs(config))
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu0
    return x, {"nfe": {str(FULL_SIZE): nfe}, "steps": {str(FULL_SIZE): sde.N},
               "seconds": seconds, "cpu_seconds": cpu, "stages": []}


def sample_subspace(networks: dict[int, torch.nn.Module], config, sizes: Sequence[int],
                    cutoffs: dict[int, float], stats_path: Path, settings: DemoSettings,
                    batch: int, num_steps: int, seed: int, progress: bool
                    ) -> tuple[torch.Tensor, dict]:
    """One batch of N-step subspace diffusion sampling (`subspace_sampling.subspace_pc_sample`)
    with the plan `sizes` at the given cutoffs, conditional Langevin after each upsampling; its
    prior and increments are the subspace parts of `sample_full_only`'s with the same seed
    (`sampling.CommonNoise`), its upsampling and Langevin noise its own."""
    sde, eps = sde_with_steps(config, num_steps)
    plan = sl.SubspacePlan.from_statistics(FULL_SIZE, tuple(sizes),
                                           tuple(cutoffs[s] for s in sizes),
                                           settings.data.stats_name,
                                           stats_path)
    nets = [networks[FULL_SIZE]] + [networks[s] for s in sizes]
    shape = (batch, config.data.num_channels, FULL_SIZE, FULL_SIZE)
    noise = sampling.CommonNoise(seed, shape)
    prior = noise.prior(plan.halvings_of(plan.num_levels))
    torch.manual_seed(seed)
    cpu0 = time.process_time()
    x, reports = subspace_pc_sample(
        nets, sde, plan, bool(config.data.centered), shape, eps=eps, probability_flow=False,
        continuous=True, denoise=True, langevin_snr=settings.langevin_snr,
        langevin_steps=settings.langevin_steps,
        x=prior.to(device=config.device, dtype=torch.float32), device=config.device,
        progress=progress, noise=noise, **_sampler_kwargs(config))
    cpu = time.process_time() - cpu0
    nfe: dict[str, int] = {}
    steps: dict[str, int] = {}
    for report in reports:
        nfe[str(report.size)] = nfe.get(str(report.size), 0) + report.nfe
        steps[str(report.size)] = steps.get(str(report.size), 0) + report.steps
    return x, {"nfe": nfe, "steps": steps, "seconds": sum(r.seconds for r in reports),
               "cpu_seconds": cpu, "plan": plan.describe(),
               "stages": [_stage_dict(r) for r in reports]}


def draw_samples(networks: dict[int, torch.nn.Module], config,
                 samplers: dict[str, Sequence[int]], cutoffs: dict[int, float],
                 stats_path: Path, settings: DemoSettings, num_steps: int,
                 progress: bool, timer: ForwardTimer | None = None
                 ) -> dict[str, tuple[np.ndarray, dict]]:
    """`settings.num_samples` samples (uint8 NHWC) of each sampler (name -> subspace sizes of
    its plan, empty for full only) at N = `num_steps`, drawn in batches of
    `settings.sample_batch`: batch b is seeded with seed + b, and every sampler of a batch
    draws its prior and increments from the same `sampling.CommonNoise` (common random
    numbers), so that they differ by what they do, not by their noise. The samplers take turns
    batch by batch, so that a drift of the machine's speed hits them alike. Network
    evaluations are per batch; times are summed. A `timer` files each sampler's network calls
    under the label (name, num_steps)."""
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    batches = -(-settings.num_samples // settings.sample_batch)
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in samplers}
    infos: dict[str, dict] = {}
    for b in range(batches):
        batch = min(settings.sample_batch, settings.num_samples - b * settings.sample_batch)
        seed = settings.seed + b
        for name, sizes in samplers.items():
            if timer is not None:
                timer.label = (name, int(num_steps))
            if sizes:
                x, part = sample_subspace(networks, config, sizes, cutoffs, stats_path,
                                          settings, batch, num_steps, seed, progress)
            else:
                x, part = sample_full_only(networks[FULL_SIZE], config, batch, num_steps, seed,
                                           progress)
            if timer is not None:
                timer.label = None
            chunks[name].append(evaluation.to_uint8_nhwc(inverse_scaler(x).clamp(0, 1).cpu()))
            if name not in infos:
                infos[name] = part
            else:
                infos[name]["seconds"] += part["seconds"]
                infos[name]["cpu_seconds"] += part["cpu_seconds"]
    for info in infos.values():
        info.update(batches=batches, sample_batch=settings.sample_batch,
                    num_steps=int(num_steps))
    return {name: (np.concatenate(chunks[name]), infos[name]) for name in samplers}


def _stage_dict(report: StageReport) -> dict:
    return {"size": report.size, "t_start": report.t_start, "t_end": report.t_end,
            "steps": report.steps, "nfe": report.nfe, "langevin_nfe": report.langevin_nfe,
            "seconds": report.seconds}


def speedups(result: dict, baseline: dict, costs: dict[str, dict]) -> dict[str, float]:
    """Speed-ups of a sampler over the full-only one: achieved (wall clock); ideal from the
    per-evaluation costs `costs` measured over the whole run; ideal from the costs measured in
    each sampler's own calls (its "network_cost" entry, when present), which a drift of the
    machine's speed between the samplers' turns moves as it moves their times; and ideal if a
    call cost its share of the pixels."""
    def weighted(nfe: dict[str, int], cost: Callable[[str], float]) -> float:
        return sum(n * cost(size) for size, n in nfe.items())

    def measured(size: str) -> float:
        return costs[size]["seconds"]

    def pixels(size: str) -> float:
        return (int(size) / FULL_SIZE) ** 2

    out = {"achieved": baseline["seconds"] / result["seconds"],
           "ideal_measured_cost": weighted(baseline["nfe"], measured)
           / weighted(result["nfe"], measured),
           "ideal_pixel_cost": weighted(baseline["nfe"], pixels) / weighted(result["nfe"], pixels)}
    if "network_cost" in result and "network_cost" in baseline:
        out["ideal_own_cost"] = (
            weighted(baseline["nfe"], lambda size: baseline["network_cost"][size]["seconds"])
            / weighted(result["nfe"], lambda size: result["network_cost"][size]["seconds"]))
    return out


def machine_info() -> dict:
    """What the numbers were measured on."""
    info = {"cpu": mutils.machine_kind(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(), "device": str(mutils.default_device())}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def warn_if_busy(machine: dict) -> None:
    """Say so when other work competes for the cores: the demo's timings (and speed-ups) are
    then slower and noisier, and fewer torch threads often run faster."""
    load = (machine.get("load_average_at_start") or [0.0])[0]
    cores = machine.get("logical_cpus") or 1
    if load > 0.5 * cores:
        print(f"note: the machine is busy (load average {load:.1f} on {cores} logical CPUs): "
              "timings will be slower and noisier than on an idle machine; with other jobs "
              "running, `--threads 1` is often faster (make demo DEMO_ARGS=\"--threads 1\").",
              flush=True)
