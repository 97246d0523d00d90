"""Orthogonal Fisher divergence (analysis.divergence) on Gaussian data with a known score."""
import math

import numpy as np
import pytest
import torch

import sde_lib
import subspace_lib
from analysis import cutoffs, divergence

SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50, N=1000),
    "vp": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20, N=1000),
    "subvp": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20, N=1000),
}
TIMES = [0.0, 0.3, 0.6, 1.0]
R = 0.08  # per-dimension RMSD of the data to every subspace used below
C, S, N = 3, 16, 48


def _gaussian_orthogonal_data(seed=1234):
    """Images P_2 u + R (I - P_2) w: the part orthogonal to the 4x4 (and hence to the 8x8)
    downsampling subspace is exactly isotropic Gaussian with per-dimension std R. (Its seed
    differs from the noise seed of the divergence, whose stream would otherwise overlap.)"""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(N, C, S, S, generator=g, dtype=torch.float64)
    w = torch.randn(N, C, S, S, generator=g, dtype=torch.float64)
    # The projections are written out here (block means) rather than taken from subspace_lib.
    blocks = u.reshape(N, C, S // 4, 4, S // 4, 4).mean((3, 5), keepdim=True)
    coarse = blocks.expand(N, C, S // 4, 4, S // 4, 4).reshape(N, C, S, S)
    w_blocks = w.reshape(N, C, S // 4, 4, S // 4, 4).mean((3, 5), keepdim=True)
    w_perp = w - w_blocks.expand(N, C, S // 4, 4, S // 4, 4).reshape(N, C, S, S)
    return coarse + R * w_perp


def _variance(sde, t, centered, r=R):
    a = 2.0 if centered else 1.0
    return sde.alpha(t) ** 2 * (a * r) ** 2 + sde.sigma(t) ** 2


def _exact_score(sde, centered, r=R, extra=None):
    """Orthogonal part -(x - Px)/v of the true score, plus an arbitrary in-subspace part (which
    the divergence must ignore) and an optional fixed perturbation `extra`."""

    def score(x, t):
        v = _variance(sde, t.to(torch.float64), centered, r).reshape(-1, 1, 1, 1)
        coarse = subspace_lib.project(x, 2)
        s = -(x - coarse) / v - 3.0 * coarse
        return s if extra is None else s + extra

    return score


def _run(sde, score_fn, centered, times=TIMES, sizes=(8, 4), seed=0, **kwargs):
    batches = [{"image": b} for b in torch.split(_gaussian_orthogonal_data(), 20)]
    return divergence.fisher_divergence(score_fn, sde, batches, {s: R for s in sizes}, times,
                                        centered, seed=seed, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("name,centered", [("ve", False), ("subvp", True), ("subvp", False),
                                           ("vp", True)])
def test_exact_score_has_zero_divergence(name, centered):
    sde = SDES[name]()
    out = _run(sde, _exact_score(sde, centered), centered)
    assert set(out) == {"8", "4"}
    for entry in out.values():
        assert set(entry) == {"t", "err_norm", "gauss_norm", "score_norm"}
        assert entry["t"] == [t for t in TIMES for _ in range(N)]  # times outermost
        err = np.array(entry["err_norm"])
        gauss = np.array(entry["gauss_norm"])
        assert np.all(np.isfinite(err)) and np.max(err) < 1e-20
        np.testing.assert_allclose(entry["score_norm"], gauss, rtol=1e-10)
        # ||g||^2 / ((d - n) / v) is chi^2_{d-n} / (d - n): mean 1 up to sampling error.
        dof = C * S * S - C * S * S // (4 if entry is out["8"] else 16)
        stderr = math.sqrt(2 / dof / gauss.size)
        assert abs(gauss.mean() - 1) < 5 * stderr


@pytest.mark.parametrize("name,centered", [("ve", False), ("subvp", True)])
def test_score_with_wrong_rmsd_has_expected_divergence(name, centered):
    sde = SDES[name]()
    r_model = 1.5 * R
    times = [0.0, 0.1]
    out = _run(sde, _exact_score(sde, centered, r=r_model), centered, times=times, sizes=(8,))
    entry = out["8"]
    err, gauss, t = (np.array(entry[c]) for c in ("err_norm", "gauss_norm", "t"))
    for time in times:
        tt = torch.tensor(time, dtype=torch.float64)
        ratio = float(_variance(sde, tt, centered) / _variance(sde, tt, centered, r_model))
        factor = (ratio - 1) ** 2
        mask = t == time
        assert factor > 0.05
        # Per sample D_F = gauss_norm (v / v' - 1)^2 exactly; its mean is (v / v' - 1)^2.
        np.testing.assert_allclose(err[mask], gauss[mask] * factor, rtol=1e-9)
        dof = C * S * S * 3 / 4
        assert abs(err[mask].mean() / factor - 1) < 5 * math.sqrt(2 / dof / mask.sum())


def test_fixed_perturbation_gives_its_normalised_norm():
    sde = SDES["ve"]()
    g = torch.Generator().manual_seed(5)
    delta = 0.3 * torch.randn(1, C, S, S, generator=g, dtype=torch.float64)
    out = _run(sde, _exact_score(sde, False, extra=delta), False, times=[0.2, 0.7], sizes=(8,))
    delta_perp_sq = float(subspace_lib.orthogonal_part(delta, 1).pow(2).sum())
    d, n = C * S * S, C * 8 * 8
    entry = out["8"]
    t = np.array(entry["t"])
    for time in (0.2, 0.7):
        v = float(_variance(sde, torch.tensor(time, dtype=torch.float64), False))
        np.testing.assert_allclose(np.array(entry["err_norm"])[t == time],
                                   delta_perp_sq * v / (d - n), rtol=1e-9)


def test_network_like_score_gives_a_usable_cutoff_and_is_reproducible():
    # A score that ignores the data's orthogonal spread (as if r were 0) is wrong at small t and
    # right at large t, so D_F decreases with t and a cutoff exists.
    sde = SDES["ve"]()
    times = divergence.default_times(6)
    out = _run(sde, _exact_score(sde, False, r=1e-3), False, times=times, sizes=(8,),
               num_images=30)
    assert len(out["8"]["t"]) == 30 * len(times)
    times_seen, means = cutoffs.mean_by_time(out["8"]["t"], out["8"]["err_norm"])
    assert times_seen.tolist() == times and np.all(np.diff(means) < 0)
    assert cutoffs.cutoff_time(out["8"]["t"], out["8"]["err_norm"], 1e-3) is not None
    again = _run(sde, _exact_score(sde, False, r=1e-3), False, times=times, sizes=(8,),
                 num_images=30)
    assert again == out
    other_seed = _run(sde, _exact_score(sde, False, r=1e-3), False, times=times, sizes=(8,),
                      num_images=30, seed=1)
    assert other_seed["8"]["err_norm"] != out["8"]["err_norm"]


def test_orthogonal_variance_uses_the_scaler():
    sde = SDES["subvp"]()
    t = torch.tensor(0.5, dtype=torch.float64)
    alpha, sigma = float(sde.alpha(t)), float(sde.sigma(t))
    assert divergence.orthogonal_variance(sde, 0.5, 0.1, centered=True) == pytest.approx(
        alpha**2 * 0.04 + sigma**2)
    assert divergence.orthogonal_variance(sde, 0.5, 0.1, centered=False) == pytest.approx(
        alpha**2 * 0.01 + sigma**2)


def test_bad_input_messages():
    sde = SDES["ve"]()
    score = _exact_score(sde, False)
    data = [torch.rand(2, 3, 8, 8)]
    with pytest.raises(ValueError, match="positive"):
        divergence.fisher_divergence(score, sde, data, {4: 0.0}, [0.5], False)
    with pytest.raises(ValueError, match="No subspace sizes"):
        divergence.fisher_divergence(score, sde, data, {}, [0.5], False)
    with pytest.raises(ValueError, match="smaller than the image size"):
        divergence.fisher_divergence(score, sde, data, {8: 0.1}, [0.5], False)
    with pytest.raises(ValueError, match="no images"):
        divergence.fisher_divergence(score, sde, [], {4: 0.1}, [0.5], False)
    with pytest.raises(ValueError, match="t_min"):
        divergence.default_times(5, t_min=0.5, t_max=0.2)
