"""The implicit full-space score of subspace diffusion (docs/maths.md section 5).

A `SubspaceScore` holds the full network and one network per level of a `SubspacePlan`. At time t
above a level's cutoff the data's components in the bands between the full space and that level
are (nearly) Gaussian and isotropic, so the full-space score is

    s(x, t) = U^k s_k(D^k x + c_k alpha(t), t) - sum_bands (band part of x) / v_band(t),

with v_band = alpha^2 (a r_band)^2 + sigma^2 and c_k the data-scaler offset; below the first cutoff
the full network is used. The module returns values in the wrapped networks' output convention
(VE: the score; VP/sub-VP: -sigma(t) * score), so `models.utils.get_score_fn`, the samplers, the
likelihood and the inpainter use it exactly like a single network.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn

import sde_lib
import subspace_lib as sl


class SubspaceScore(nn.Module):
    """Full network + one network per plan level, behaving like one network `(x, labels)`.

    Each batch element is routed by its own label; `legacy_batch_routing=True` reproduces the
    reference code, where the whole batch follows element 0. A label at or below a cutoff's label
    goes to the larger model (labels increase with t for every SDE here). `nfe_full` and
    `nfe_subspace[j-1]` count batched calls of the full and level-j networks (`reset_nfe`).
    """

    def __init__(self, sde: sde_lib.SDE, full_model: nn.Module,
                 subspace_models: Sequence[nn.Module], plan: sl.SubspacePlan, centered: bool,
                 legacy_batch_routing: bool = False):
        super().__init__()
        if len(subspace_models) != plan.num_levels:
            raise ValueError(
                f"The plan has {plan.num_levels} subspace levels {list(plan.sizes)} but "
                f"{len(subspace_models)} subspace networks were given: give one per level.")
        if not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE)):
            raise ValueError(
                f"Subspace scores support VESDE, VPSDE and subVPSDE, not {type(sde).__name__}.")
        self.sde = sde
        self.full_model = full_model
        self.subspace_models = nn.ModuleList(subspace_models)
        self.plan = plan
        self.centered = bool(centered)
        self.legacy_batch_routing = bool(legacy_batch_routing)
        self._boundaries = [self._boundary_label(c) for c in plan.cutoffs]
        self.reset_nfe()

    # Names of the reference implementation, for notebooks and checkpoint code written for it.
    @property
    def full_score_model(self) -> nn.Module:
        return self.full_model

    @property
    def subspace_score_model(self) -> nn.Module:
        return self.subspace_models[0]

    @property
    def num_full(self) -> int:
        return self.nfe_full

    @num_full.setter
    def num_full(self, value: int) -> None:
        self.nfe_full = int(value)

    @property
    def num_subspace(self) -> int:
        return sum(self.nfe_subspace)

    @num_subspace.setter
    def num_subspace(self, value: int) -> None:
        if self.plan.num_levels == 1 or int(value) == 0:
            self.nfe_subspace = [int(value)] + [0] * (self.plan.num_levels - 1)
            return
        raise ValueError(f"num_subspace sums {self.plan.num_levels} levels' counters and can "
                         "only be set to 0 here: set nfe_subspace, one count per level.")

    def _single_level(self, name: str) -> None:
        if self.plan.num_levels != 1:
            raise ValueError(
                f"{name} is the reference's name for a one-level plan; this one has "
                f"{self.plan.num_levels} levels {list(self.plan.sizes)}: use plan.cutoffs and "
                "plan.sizes (set_cutoffs changes the cutoffs).")

    @property
    def t_boundary(self) -> float:
        """Cutoff time of a one-level plan (the reference wrapper's attribute)."""
        self._single_level("t_boundary")
        return self.plan.cutoffs[0]

    @t_boundary.setter
    def t_boundary(self, value: float) -> None:
        self._single_level("t_boundary")
        self.set_cutoffs([float(value)])

    @property
    def subspace_size(self) -> int:
        """Side of the subspace of a one-level plan (the reference wrapper's attribute)."""
        self._single_level("subspace_size")
        return self.plan.sizes[0]

    @subspace_size.setter
    def subspace_size(self, value: int) -> None:
        raise ValueError("The subspace size of a built SubspaceScore cannot change (its network "
                         "is built for it): build another with build_subspace_model(..., "
                         f"sizes=({int(value)},), ...).")

    @property
    def full_size(self) -> int:
        """Side of the full images."""
        return self.plan.full_size

    def set_cutoffs(self, cutoffs: Sequence[float]) -> None:
        """Move the cutoff times of the plan (same sizes and statistics); as the reference's
        inpainting script did with `t_boundary`, for a grid over cutoffs with one model."""
        self.plan = dataclasses.replace(self.plan, cutoffs=tuple(float(c) for c in cutoffs))
        self._boundaries = [self._boundary_label(c) for c in self.plan.cutoffs]

    def reset_nfe(self) -> None:
        """Set the network-evaluation counters to zero."""
        self.nfe_full = 0
        self.nfe_subspace = [0] * self.plan.num_levels

    def _boundary_label(self, cutoff: float) -> float:
        # The label of t = cutoff as a float32 sampler computes it and in float64 as the reference
        # computes its VE boundary; the larger one sends t exactly at the cutoff to the full model
        # whichever precision the caller used.
        values = [float(self.sde.time_to_label(torch.tensor(cutoff, dtype=dtype)))
                  for dtype in (torch.float32, torch.float64)]
        return max(values)

    def route(self, labels: torch.Tensor) -> torch.Tensor:
        """Level (0 = full network) that handles each label; shape [B] (long)."""
        values = labels.detach().to(torch.float64).reshape(-1)
        if self.legacy_batch_routing:
            values = values[:1].expand(labels.numel())
        levels = torch.zeros(values.shape, dtype=torch.long, device=values.device)
        for boundary in self._boundaries:
            levels += (values > boundary).long()
        return levels

    def _output_scale(self, t: torch.Tensor) -> torch.Tensor:
        """Factor turning a score into the network output convention (VE 1, VP -sigma(t))."""
        if isinstance(self.sde, sde_lib.VESDE):
            return torch.ones_like(t)
        return -self.sde.sigma(t)

    def _level_output(self, x: torch.Tensor, labels: torch.Tensor, level: int) -> torch.Tensor:
        """Output of the implicit score with the level-`level` network (level >= 1)."""
        plan = self.plan
        t = self.sde.label_to_time(labels.to(torch.float64))
        shape = (-1,) + (1,) * (x.dim() - 1)
        alpha = self.sde.alpha(t).to(x.dtype).reshape(shape)
        scale = self._output_scale(t)
        k = plan.halvings_of(level)
        y = sl.downsample(x, k) + plan.offset(level, self.centered) * alpha
        out = sl.upsample(self.subspace_models[level - 1](y, labels), k)
        self.nfe_subspace[level - 1] += 1
        coords, previous = x, x
        for band in range(1, level + 1):
            coords = sl.downsample(coords, plan.relative_halvings(band))
            projected = sl.upsample(coords, plan.halvings_of(band))
            v = plan.band_variance(self.sde, t, band, self.centered)
            out = out - (scale / v).to(x.dtype).reshape(shape) * (previous - projected)
            previous = projected
        return out

    def _output(self, x: torch.Tensor, labels: torch.Tensor, level: int) -> torch.Tensor:
        if level == 0:
            self.nfe_full += 1
            return self.full_model(x, labels)
        return self._level_output(x, labels, level)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Implicit full-space network output at conditioning labels (one per example)."""
        if not torch.is_floating_point(labels):
            raise ValueError("The implicit subspace score needs continuous noise labels: use "
                             "networks trained with config.training.continuous = True.")
        if labels.dim() == 0:
            labels = labels.expand(x.shape[0])
        levels = self.route(labels)
        present = torch.unique(levels).tolist()
        if len(present) == 1:
            return self._output(x, labels, present[0])
        out = None
        for level in present:
            index = torch.nonzero(levels == level).reshape(-1).to(x.device)
            part = self._output(x.index_select(0, index), labels.index_select(0, index), level)
            out = (torch.zeros_like(x, dtype=part.dtype) if out is None else out)
            out = out.index_copy(0, index, part)
        return out


def subspace_configs(config, sizes: Sequence[int]) -> list:
    """Copies of `config` with `data.image_size` set to each subspace size (the subspace networks
    reuse the full model's config, as in the paper)."""
    configs = []
    for size in sizes:
        sub = copy.deepcopy(config)
        sub.data.image_size = int(size)
        configs.append(sub)
    return configs


def build_subspace_model(config, sde: sde_lib.SDE, full_model: nn.Module,
                         subspace_models: Sequence[nn.Module], sizes, cutoffs, dataset: str,
                         stats_path=None, legacy_batch_routing: bool = False) -> SubspaceScore:
    """The implicit-score module for `config` from already loaded networks.

    `sizes` (e.g. `(16, 8)` or "16,8") and `cutoffs` (e.g. `(0.5, 0.6)`) define the plan, one
    network per size in `subspace_models`; the RMSD statistics of `dataset` at
    `config.data.image_size` come from `stats_path` (default assets/subspace_rmsd.json).

    Example (notebook)::

        sde, eps = sde_lib.get_sde(config)
        model = build_subspace_model(config, sde, full_net, [net16], (16,), (0.5,), "cifar10")
        score_fn = models.utils.get_score_fn(sde, model, train=False, continuous=True)
    """
    plan = sl.SubspacePlan.from_statistics(config.data.image_size, sizes, cutoffs, dataset,
                                           stats_path)
    return SubspaceScore(sde, full_model, subspace_models, plan, config.data.centered,
                         legacy_batch_routing=legacy_batch_routing)


def load_subspace_model(config, ckpt_full, ckpt_subspace, sizes, cutoffs,
                        dataset: str | None = None, stats_path=None,
                        legacy_batch_routing: bool = False) -> SubspaceScore:
    """Build the networks of `config` (full size and each subspace size), load their EMA weights
    from the checkpoints and return the implicit-score module (eval mode) on `config.device`.

    `ckpt_subspace` lists one checkpoint per size (a comma string or a sequence); `dataset`
    names the RMSD statistics (default: the config's dataset).

    Example (notebook)::

        model = load_subspace_model(config, "full.pth", ["sub16.pth"], (16,), (0.5,))
        sde, eps = sde_lib.get_sde(config)
        score_fn = models.utils.get_score_fn(sde, model, train=False, continuous=True)
    """
    from models.checkpoints import load_model_weights
    from models.utils import create_model

    sizes = sl.number_tuple(sizes, int, "subspace sizes")
    paths = (ckpt_subspace.split(",") if isinstance(ckpt_subspace, str)
             else [str(p) for p in ckpt_subspace])
    if len(paths) != len(sizes):
        raise ValueError(f"Got {len(sizes)} subspace sizes {list(sizes)} but {len(paths)} subspace "
                         "checkpoints: give one --ckpt_subspace per size, in the same order.")
    if dataset is None:
        dataset = sl.dataset_stats_name(config)
    sde, _ = sde_lib.get_sde(config)
    full = load_model_weights(create_model(config), ckpt_full)
    subs = [load_model_weights(create_model(cfg), path.strip())
            for cfg, path in zip(subspace_configs(config, sizes), paths)]
    model = build_subspace_model(config, sde, full, subs, sizes, cutoffs, dataset, stats_path,
                                 legacy_batch_routing=legacy_batch_routing)
    return model.eval()
