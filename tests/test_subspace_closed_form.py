"""Closed form: Gaussian data whose subspace part is N(m, s^2) and whose bands are isotropic.

For such data the implicit score built from the EXACT subspace scores equals the EXACT full score
(docs/maths.md 5), for any SDE, data scaler and number of nested levels. The oracle uses dense
matrices built from the definition of D^k, independent of `subspace_lib`.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sde_lib
import subspace_lib as sl
from models.subspace_model import SubspaceScore
from models.utils import get_score_fn

CHANNELS, SIZE = 2, 8


def down_matrix(k: int, channels: int = CHANNELS, size: int = SIZE) -> torch.Tensor:
    """Dense D^k: block sum over 2^k x 2^k pixels divided by 2^k."""
    block, small = 2**k, size // 2**k
    matrix = torch.zeros(channels * small * small, channels * size * size, dtype=torch.float64)
    for c in range(channels):
        for i in range(size):
            for j in range(size):
                matrix[(c * small + i // block) * small + j // block,
                       (c * size + i) * size + j] = 1.0 / block
    return matrix


class GaussianNet(nn.Module):
    """Exact score network of data N(mean, cov) under `sde`, in the network output convention
    (VE: the score; VP/sub-VP: -sigma(t) * score), conditioned on continuous labels."""

    def __init__(self, sde: sde_lib.SDE, mean: torch.Tensor, cov: torch.Tensor, shape):
        super().__init__()
        self.sde, self.shape = sde, tuple(shape)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        self.register_buffer("mean", mean)
        self.register_buffer("lam", eigenvalues.clamp(min=0))
        self.register_buffer("Q", eigenvectors)
        self.calls = 0

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.alpha(t)[:, None], self.sde.sigma(t)[:, None]
        centred = (x.reshape(x.shape[0], -1) - alpha * self.mean) @ self.Q
        return (-(centred / (alpha**2 * self.lam + sigma**2)) @ self.Q.T).reshape(x.shape)

    def forward(self, x, labels):
        assert tuple(x.shape[1:]) == self.shape, (x.shape, self.shape)
        self.calls += 1
        t = self.sde.label_to_time(labels)
        s = self.score(x, t)
        if isinstance(self.sde, sde_lib.VESDE):
            return s
        return -self.sde.sigma(t).reshape(-1, 1, 1, 1) * s


class NestedGaussianData:
    """Data u = U^{k_J}(m + s xi) + sum_i rho_i (P_{k_{i-1}} - P_{k_i}) zeta_i, then x = a u + b.

    The deepest-level coordinates are N(m, s^2 I) and band i (between levels i-1 and i) is
    isotropic with per-dimension std rho_i, so the RMSD of u to level j is
    sqrt(sum_{i<=j} rho_i^2 (n_{i-1} - n_i) / (d - n_j)).
    """

    def __init__(self, halvings, rhos, s, centered, seed=0, channels=CHANNELS):
        gen = torch.Generator().manual_seed(seed)
        self.halvings, self.centered, self.channels = tuple(halvings), centered, channels
        self.rhos, self.s = tuple(rhos), s
        self.a, self.b = sl.scaler_coefficients(centered)
        d = channels * SIZE * SIZE
        Ds = [torch.eye(d, dtype=torch.float64)] + [down_matrix(k, channels) for k in halvings]
        Ps = [D.T @ D for D in Ds]
        self.D = Ds
        deepest = Ds[-1]
        self.m = 0.5 + 0.3 * torch.randn(deepest.shape[0], generator=gen, dtype=torch.float64)
        self.mean_u = deepest.T @ self.m
        self.cov_u = s**2 * Ps[-1]
        dims = [P.trace().round() for P in Ps]
        self.rmsds = []
        band_energy = 0.0
        for i, rho in enumerate(rhos, start=1):
            self.cov_u = self.cov_u + rho**2 * (Ps[i - 1] - Ps[i])
            band_energy += rho**2 * float(dims[i - 1] - dims[i])
            self.rmsds.append((band_energy / float(d - dims[i])) ** 0.5)

    def level_net(self, sde, level: int) -> GaussianNet:
        """Exact network of the data a D^k u + b a level-`level` model is trained on."""
        D = self.D[level]
        mean = self.a * (D @ self.mean_u) + self.b
        cov = self.a**2 * D @ self.cov_u @ D.T
        side = SIZE // 2 ** (0 if level == 0 else self.halvings[level - 1])
        return GaussianNet(sde, mean, cov, (self.channels, side, side))

    def full_score(self, sde, x, t):
        return self.level_net(sde, 0).score(x, t)

    def plan(self, cutoffs) -> sl.SubspacePlan:
        return sl.SubspacePlan(SIZE, tuple(SIZE // 2**k for k in self.halvings), cutoffs,
                               tuple(self.rmsds))

    def subspace_score(self, sde, cutoffs, **kwargs) -> SubspaceScore:
        nets = [self.level_net(sde, j) for j in range(len(self.halvings) + 1)]
        return SubspaceScore(sde, nets[0], nets[1:], self.plan(cutoffs), self.centered, **kwargs)


SDES = {
    "ve": (lambda: sde_lib.VESDE(0.01, 50, 1000), False),
    "subvp": (lambda: sde_lib.subVPSDE(0.1, 20, 1000), True),
    "vp": (lambda: sde_lib.VPSDE(0.1, 20, 1000), True),
}
PLANS = {
    "one_level": dict(halvings=(1,), rhos=(0.08,), s=0.2, cutoffs=(0.4,)),
    "two_levels": dict(halvings=(1, 2), rhos=(0.06, 0.15), s=0.25, cutoffs=(0.3, 0.6)),
    "deep_jump": dict(halvings=(2,), rhos=(0.1,), s=0.3, cutoffs=(0.5,)),
}


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_implicit_score_equals_exact_full_score(sde_name, plan_name):
    make_sde, centered = SDES[sde_name]
    sde, spec = make_sde(), PLANS[plan_name]
    data = NestedGaussianData(spec["halvings"], spec["rhos"], spec["s"], centered)
    model = data.subspace_score(sde, spec["cutoffs"])
    score_fn = get_score_fn(sde, model, train=False, continuous=True)
    gen = torch.Generator().manual_seed(1)
    x = data.a * 0.5 + data.b + torch.randn(3, CHANNELS, SIZE, SIZE, generator=gen,
                                            dtype=torch.float64)
    times = [0.05, 0.35, 0.45, 0.55, 0.7, 0.95]
    levels = [model.plan.level_for_time(t) for t in times]
    assert set(levels) == set(range(len(spec["halvings"]) + 1))
    for t in times:
        vec_t = torch.full((3,), t, dtype=torch.float64)
        expected = data.full_score(sde, x, vec_t)
        got = score_fn(x, vec_t)
        scale = expected.abs().max()
        assert (got - expected).abs().max() <= 1e-10 * scale, (t, sde_name, plan_name)


@pytest.mark.parametrize("sde_name", ["ve", "subvp"])
def test_per_example_routing_and_legacy_routing(sde_name):
    make_sde, centered = SDES[sde_name]
    sde, spec = make_sde(), PLANS["two_levels"]
    data = NestedGaussianData(spec["halvings"], spec["rhos"], spec["s"], centered)
    x = torch.randn(4, CHANNELS, SIZE, SIZE, dtype=torch.float64)
    vec_t = torch.tensor([0.7, 0.1, 0.45, 0.9], dtype=torch.float64)
    labels = sde.time_to_label(vec_t)
    nets = [data.level_net(sde, j) for j in range(3)]
    # Wrong statistics make the three routes give different answers, so routing is visible.
    wrong = sl.SubspacePlan(SIZE, (4, 2), spec["cutoffs"], tuple(2 * r for r in data.rmsds))

    model = SubspaceScore(sde, nets[0], nets[1:], wrong, centered)
    got = model(x, labels)
    assert model.nfe_full == 1 and model.nfe_subspace == [1, 1]
    assert model.route(labels).tolist() == [2, 0, 1, 2]
    alone = [model(x[i:i + 1], labels[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-13, atol=1e-12)

    # Legacy: the whole batch follows element 0 (level 2 here), as the reference code does.
    legacy = SubspaceScore(sde, nets[0], nets[1:], wrong, centered, legacy_batch_routing=True)
    got_legacy = legacy(x, labels)
    assert legacy.nfe_full == 0 and legacy.nfe_subspace == [0, 1]
    torch.testing.assert_close(got_legacy, model._level_output(x, labels, 2),
                               rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(got_legacy[[0, 3]], got[[0, 3]], rtol=1e-13, atol=1e-12)
    assert (got_legacy[1] - got[1]).abs().max() > 1e-3 * got[1].abs().max()
    legacy.reset_nfe()
    assert legacy.nfe_full == 0 and legacy.nfe_subspace == [0, 0]


@pytest.mark.parametrize("sde_name", ["ve", "subvp"])
def test_time_exactly_at_cutoff_goes_to_larger_model(sde_name):
    make_sde, centered = SDES[sde_name]
    sde, spec = make_sde(), PLANS["two_levels"]
    data = NestedGaussianData(spec["halvings"], spec["rhos"], spec["s"], centered)
    model = data.subspace_score(sde, (0.387, 0.6))
    for dtype in (torch.float32, torch.float64):
        for cutoff, level in ((0.387, 0), (0.6, 1)):
            t = torch.full((2,), cutoff, dtype=dtype)
            assert model.route(sde.time_to_label(t)).tolist() == [level] * 2
            above = t + 1e-6
            assert model.route(sde.time_to_label(above)).tolist() == [level + 1] * 2


def test_gradients_flow_through_mixed_routing():
    make_sde, centered = SDES["subvp"]
    sde, spec = make_sde(), PLANS["one_level"]
    data = NestedGaussianData(spec["halvings"], spec["rhos"], spec["s"], centered)
    model = data.subspace_score(sde, spec["cutoffs"])
    x = torch.randn(2, CHANNELS, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    labels = sde.time_to_label(torch.tensor([0.2, 0.8], dtype=torch.float64))
    out = model(x, labels)
    (grad,) = torch.autograd.grad(out.sum(), x)
    # The output is affine in x for Gaussian data, so the gradient is finite and non-zero in both
    # the full-model element and the subspace element.
    assert torch.isfinite(grad).all() and (grad[0].abs().sum() > 0) and (grad[1].abs().sum() > 0)


def test_mismatched_network_count_is_an_error():
    sde = sde_lib.VESDE()
    plan = sl.SubspacePlan(8, (4, 2), (0.3, 0.6), (0.1, 0.2))
    with pytest.raises(ValueError, match="one per level"):
        SubspaceScore(sde, nn.Identity(), [nn.Identity()], plan, centered=False)


def test_discrete_labels_are_an_error():
    sde = sde_lib.VESDE()
    plan = sl.SubspacePlan(8, (4,), (0.5,), (0.1,))
    model = SubspaceScore(sde, nn.Identity(), [nn.Identity()], plan, centered=False)
    with pytest.raises(ValueError, match="continuous noise labels"):
        model(torch.zeros(2, 3, 8, 8), torch.tensor([3, 4]))
