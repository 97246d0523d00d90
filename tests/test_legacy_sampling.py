"""`subspace_sample.py --legacy` evaluates the networks exactly as the reference script did.

The reference script (subspace-diffusion `subspace_sample.py` with its `sampling.pc_sampler`)
runs, for the windows [1, t_c] (subspace network) and [t_c, 0] (full network):
- per window the grid linspace(start + (1 - start) eps, end + (1 - end) eps, int(N (start - end)))
  with eps = 1e-5 for every SDE, so the cutoff time is evaluated by both windows;
- per grid time the corrector (n_steps_each network calls) and then the predictor (one call),
  each fed the SDE's label (VE: sigma(t), sub-VP: 999 t);
- between the windows `langevin_steps` calls of the full network fed the raw time of the
  subspace window's last grid point as its label.
The test derives that sequence from these rules and records the real networks' calls.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from reference_cases import CASES, case_config
from test_subspace_cli import checkpoints, run_cli  # noqa: F401  (fixture)

import sde_lib
import subspace_lib as sl
from models import utils as mutils
from models.checkpoints import load_model_weights
from models.subspace_model import subspace_configs
from subspace_sampling import subspace_pc_sample

LEGACY_EPS = 1e-5
LANGEVIN_STEPS = 2


@pytest.fixture(params=CASES)
def case_dir(request, reference_dir):
    return reference_dir / request.param


class Recorder(nn.Module):
    """Runs the wrapped network and logs (name, label) for every call."""

    def __init__(self, name: str, net: nn.Module, log: list):
        super().__init__()
        self.name, self.net, self.log = name, net, log

    def forward(self, x, labels):
        assert torch.all(labels == labels[0]), "the samplers feed one label per batch"
        self.log.append((self.name, float(labels[0])))
        return self.net(x, labels)


def original_sequence(config, N: int, cutoff: float) -> list[tuple[str, float]]:
    """(network, label) of every call of the reference script, from its rules."""
    ve = config.training.sde == "vesde"
    smin, smax = config.model.sigma_min, config.model.sigma_max
    corrector_calls = config.sampling.n_steps_each if config.sampling.corrector == "langevin" \
        else 0
    predictor_calls = 0 if config.sampling.predictor == "none" else 1
    windows = [w for w in (("subspace", 1.0, cutoff), ("full", cutoff, 0.0)) if w[1] != w[2]]
    sequence, last_time = [], None
    for i, (name, start, end) in enumerate(windows):
        if i > 0:
            sequence += [(name, last_time)] * LANGEVIN_STEPS
        grid = torch.linspace(start + (1 - start) * LEGACY_EPS, end + (1 - end) * LEGACY_EPS,
                              int(N * (start - end)))
        for t in grid:
            label = float(smin * (smax / smin) ** t) if ve else float(999 * t)
            sequence += [(name, label)] * (corrector_calls + predictor_calls)
        last_time = float(grid[-1])
    return sequence


def _recorded_run(case_dir, N: int, cutoff: float, legacy: bool):
    config = case_config(case_dir)
    meta = json.loads((case_dir / "meta.json").read_text())
    (sub_config,) = subspace_configs(config, [meta["subspace_image_size"]])
    log: list = []
    full = Recorder("full", load_model_weights(mutils.create_model(config),
                                               case_dir / "checkpoint_full.pth"), log)
    sub = Recorder("subspace", load_model_weights(mutils.create_model(sub_config),
                                                  case_dir / "checkpoint_subspace.pth"), log)
    sde, default_eps = sde_lib.get_sde(config)
    sde.N = N  # a short schedule; the rules hold for any N
    plan = sl.SubspacePlan.from_statistics(config.data.image_size, meta["subspace_image_size"],
                                           cutoff, meta["FLAGS"]["dataset"])
    torch.manual_seed(0)
    x, reports = subspace_pc_sample(
        [full, sub], sde, plan, config.data.centered, (1, 3, 32, 32),
        eps=LEGACY_EPS if legacy else default_eps, predictor=config.sampling.predictor,
        corrector=config.sampling.corrector, snr=config.sampling.snr,
        n_steps_each=config.sampling.n_steps_each, langevin_snr=0.22,
        langevin_steps=LANGEVIN_STEPS, device=torch.device("cpu"), legacy=legacy)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()
    return config, log, reports


@pytest.mark.parametrize("cutoff", [0.5, 0.516])
@torch.no_grad()
def test_legacy_sampling_evaluates_the_networks_as_the_reference(case_dir, cutoff):
    N = 20
    config, log, reports = _recorded_run(case_dir, N, cutoff, legacy=True)
    expected = original_sequence(config, N, cutoff)
    assert [name for name, _ in log] == [name for name, _ in expected]
    for i, ((_, ours), (_, ref)) in enumerate(zip(log, expected)):
        assert ours == pytest.approx(ref, rel=1e-6, abs=1e-7), f"call {i}"
    # Truncation: int(20 * 0.484) + int(20 * 0.516) = 9 + 10 steps instead of 20.
    steps = [int(N * (1 - cutoff)), int(N * cutoff)]
    assert [r.steps for r in reports] == steps
    # The cutoff's grid time is evaluated by both windows.
    assert reports[0].t_end == reports[1].t_start


@torch.no_grad()
def test_default_sampling_differs_from_the_reference_sequence(case_dir):
    N = 20
    config, log, reports = _recorded_run(case_dir, N, 0.516, legacy=False)
    assert sum(r.steps for r in reports) == N  # the windows split the one grid of N steps
    assert len(log) != len(original_sequence(config, N, 0.516)) or \
        [name for name, _ in log] != [name for name, _ in original_sequence(config, N, 0.516)]


def test_legacy_flag_of_the_sampling_script(checkpoints, tmp_path):  # noqa: F811
    common = ["--subspace", "16", "--time", "0.55", "--ckpt_subspace", str(checkpoints[16]),
              "--ckpt_full", str(checkpoints[32]), "--eval_folder", str(tmp_path), "--batch", "2",
              "--number_samples", "2"]
    result = run_cli(*common, "--save_name", "legacy", "--legacy")
    assert result.returncode == 0, result.stderr
    rows = {int(line.split()[0]): line.split() for line in result.stdout.splitlines()
            if line.split()[:1] and line.split()[0].isdigit()}
    # N = 6: int(6 * 0.45) = 2 subspace steps and int(6 * 0.55) = 3 full steps.
    assert int(rows[16][-4]) == 2 and int(rows[32][-4]) == 3
    assert int(rows[32][-3]) == 2 * 3 + 2  # predictor + corrector per step, 2 Langevin steps
    # The reference had one subspace level; --legacy says so for a plan with two.
    sde = sde_lib.VESDE(N=6)
    plan = sl.SubspacePlan.from_statistics(32, "16,8", "0.5,0.6", "cifar10")
    with pytest.raises(ValueError, match="give one --subspace size with --legacy."):
        subspace_pc_sample([nn.Identity()] * 3, sde, plan, False, (1, 3, 32, 32), eps=1e-5,
                           predictor="reverse_diffusion", corrector="langevin", snr=0.16,
                           legacy=True)
