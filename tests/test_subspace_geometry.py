"""Subspace geometry and plans: explicit matrices, offsets, between-level RMSDs, validation."""
import json

import pytest
import torch

import sde_lib
import subspace_lib as sl


def explicit_down_matrix(channels: int, size: int, k: int) -> torch.Tensor:
    """D^k as a dense matrix built from its definition: block sum over 2^k x 2^k divided by 2^k."""
    block, small = 2**k, size // 2**k
    matrix = torch.zeros(channels * small * small, channels * size * size, dtype=torch.float64)
    for c in range(channels):
        for i in range(size):
            for j in range(size):
                row = (c * small + i // block) * small + j // block
                matrix[row, (c * size + i) * size + j] = 1.0 / block
    return matrix


def as_matrix(fn, in_shape) -> torch.Tensor:
    """The matrix of a linear map on images of shape `in_shape`, column by column."""
    n = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape((n,) + tuple(in_shape))
    return fn(basis).reshape(n, -1).T


@pytest.mark.parametrize("channels,size,k", [(1, 4, 1), (3, 4, 1), (1, 8, 2), (3, 8, 2),
                                             (1, 8, 3), (3, 8, 3)])
def test_down_up_projector_matrices(channels, size, k):
    D = as_matrix(lambda x: sl.downsample(x, k), (channels, size, size))
    U = as_matrix(lambda c: sl.upsample(c, k), (channels, size // 2**k, size // 2**k))
    P = as_matrix(lambda x: sl.project(x, k), (channels, size, size))
    Q = as_matrix(lambda x: sl.orthogonal_part(x, k), (channels, size, size))
    torch.testing.assert_close(D, explicit_down_matrix(channels, size, k), rtol=0, atol=1e-15)
    torch.testing.assert_close(U, D.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(D @ U, torch.eye(D.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-14)
    torch.testing.assert_close(Q, torch.eye(P.shape[0], dtype=torch.float64) - P,
                               rtol=0, atol=1e-15)
    assert torch.linalg.matrix_rank(P) == channels * (size // 2**k) ** 2


def test_nested_downsampling_composes():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(sl.downsample(sl.downsample(x, 1), 2), sl.downsample(x, 3))
    torch.testing.assert_close(sl.project(sl.project(x, 1), 2), sl.project(x, 2))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("centered", [False, True])
def test_offset_matches_scaler_brute_force(k, channels, centered):
    a, b = sl.scaler_coefficients(centered)
    u = torch.rand(4, channels, 16, 16, dtype=torch.float64)
    # A subspace network is trained on scaler(D^k u); the full-space state holds D^k scaler(u).
    difference = (a * sl.downsample(u, k) + b) - sl.downsample(a * u + b, k)
    c = sl.scaler_offset_factor(k, centered)
    torch.testing.assert_close(difference, torch.full_like(difference, c))
    assert c == (2**k - 1 if centered else 0)


@pytest.mark.parametrize("k1,k2", [(1, 2), (1, 3), (2, 3)])
def test_relative_offset_between_levels(k1, k2):
    sde = sde_lib.subVPSDE()
    plan = sl.SubspacePlan(16, (16 // 2**k1, 16 // 2**k2), (0.3, 0.6), (0.1, 0.2))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    alpha = sde.alpha(torch.tensor(0.45, dtype=torch.float64))
    y1 = sl.downsample(x, k1) + plan.offset(1, True) * alpha
    y2 = sl.downsample(x, k2) + plan.offset(2, True) * alpha
    recovered = sl.downsample(y1, k2 - k1) + plan.relative_offset(2, True) * alpha
    torch.testing.assert_close(recovered, y2)
    assert plan.relative_offset(2, True) == 2 ** (k2 - k1) - 1
    assert plan.relative_offset(2, False) == 0


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("k1,k2", [(1, 2), (1, 3), (2, 3)])
def test_between_level_rmsd_matches_direct_computation(channels, k1, k2):
    gen = torch.Generator().manual_seed(k1 * 10 + k2)
    x = torch.rand(64, channels, 16, 16, generator=gen, dtype=torch.float64) ** 2
    x = x + torch.linspace(0, 1, 16, dtype=torch.float64)  # structure, so levels differ
    d = channels * 16 * 16
    n1, n2 = d // 4**k1, d // 4**k2

    def rmsd(residual, dims):
        return float((residual.pow(2).sum(dim=(1, 2, 3)).mean() / dims).sqrt())

    r1 = rmsd(sl.orthogonal_part(x, k1), d - n1)
    r2 = rmsd(sl.orthogonal_part(x, k2), d - n2)
    direct = rmsd(sl.project(x, k1) - sl.project(x, k2), n1 - n2)
    assert sl.between_level_rmsd(d, n1, r1, n2, r2) == pytest.approx(direct, rel=1e-12)
    # Per-channel pixel counts give the same value (the ratios are what matters).
    side = 16 * 16
    assert sl.between_level_rmsd(side, side // 4**k1, r1, side // 4**k2, r2) == \
        pytest.approx(direct, rel=1e-12)


def test_plan_from_published_statistics():
    plan = sl.SubspacePlan.from_statistics(32, "16,8", "0.5,0.6", "cifar")
    assert plan.halvings == (1, 2)
    assert plan.rmsds == (0.07505646805106986, 0.11017048700915723)
    assert plan.band_rmsds[0] == pytest.approx(0.07505646805106986, rel=1e-14)
    expected = ((1024 - 64) * 0.11017048700915723**2 - (1024 - 256) * 0.07505646805106986**2) \
        / (256 - 64)
    assert plan.band_rmsds[1] == pytest.approx(expected**0.5, rel=1e-14)
    assert plan.windows() == [(2, 1.0, 0.6), (1, 0.6, 0.5), (0, 0.5, 0.0)]
    assert [plan.level_for_time(t) for t in (0.1, 0.5, 0.55, 0.6, 0.61)] == [0, 0, 1, 1, 2]
    church = sl.SubspacePlan.from_statistics(256, (64,), (0.5,), "lsun_church")
    assert church.halvings == (2,) and church.rmsds == (0.0883778833712964,)


def test_band_variance_formula():
    plan = sl.SubspacePlan(32, (16,), (0.5,), (0.075,))
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)
    for sde, centered, a in ((sde_lib.VESDE(), False, 1.0), (sde_lib.subVPSDE(), True, 2.0),
                             (sde_lib.VPSDE(), True, 2.0)):
        expected = sde.alpha(t) ** 2 * (a * 0.075) ** 2 + sde.sigma(t) ** 2
        torch.testing.assert_close(plan.band_variance(sde, t, 1, centered), expected)


def test_cutoff_at_end_drops_empty_window():
    plan = sl.SubspacePlan(32, (16,), (1.0,), (0.075,))
    assert plan.windows() == [(0, 1.0, 0.0)]


@pytest.mark.parametrize("kwargs,message", [
    (dict(sizes=(16, 16), cutoffs=(0.5, 0.6), rmsds=(0.1, 0.1)), "nested"),
    (dict(sizes=(8, 16), cutoffs=(0.5, 0.6), rmsds=(0.1, 0.1)), "nested"),
    (dict(sizes=(12,), cutoffs=(0.5,), rmsds=(0.1,)), "repeated halving"),
    (dict(sizes=(16, 12), cutoffs=(0.5, 0.6), rmsds=(0.1, 0.2)), "repeated halving"),
    (dict(sizes=(32,), cutoffs=(0.5,), rmsds=(0.1,)), "nested"),
    (dict(sizes=(16, 8), cutoffs=(0.6, 0.5), rmsds=(0.1, 0.2)), "increase strictly"),
    (dict(sizes=(16, 8), cutoffs=(0.5, 0.5), rmsds=(0.1, 0.2)), "increase strictly"),
    (dict(sizes=(16,), cutoffs=(-0.1,), rmsds=(0.1,)), r"\[0, 1\]"),
    (dict(sizes=(16,), cutoffs=(1.5,), rmsds=(0.1,)), r"\[0, 1\]"),
    (dict(sizes=(16, 8), cutoffs=(0.5,), rmsds=(0.1, 0.2)), "one cutoff time per"),
    (dict(sizes=(16,), cutoffs=(0.5,), rmsds=(-0.1,)), "positive"),
    (dict(sizes=(16, 8), cutoffs=(0.5, 0.6), rmsds=(0.3, 0.01)), "inconsistent"),
    (dict(sizes=(), cutoffs=(), rmsds=()), "at least one"),
])
def test_plan_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sl.SubspacePlan(32, **kwargs)


def test_missing_statistics_name_the_command(tmp_path):
    with pytest.raises(KeyError, match="python -m analysis.rmsd"):
        sl.SubspacePlan.from_statistics(32, (4,), (0.5,), "cifar")
    with pytest.raises(KeyError, match="python -m analysis.rmsd"):
        sl.SubspacePlan.from_statistics(32, (16,), (0.5,), "svhn")
    with pytest.raises(FileNotFoundError, match="python -m analysis.rmsd"):
        sl.SubspacePlan.from_statistics(32, (16,), (0.5,), "cifar", tmp_path / "none.json")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"toy": {"8": {"4": 0.2, "2": 0.25}}}))
    plan = sl.SubspacePlan.from_statistics(8, "4,2", "0.3,0.4", "toy", stats)
    assert plan.rmsds == (0.2, 0.25)


def test_flag_parsing():
    import cli

    assert cli.parse_int_list("16, 8", "--subspace") == (16, 8)
    assert cli.parse_int_list(16, "--subspace") == (16,)
    assert cli.parse_float_list("0.5,0.6", "--time") == (0.5, 0.6)
    assert cli.parse_float_list(0.5, "--time") == (0.5,)
    with pytest.raises(ValueError, match="--subspace must be"):
        cli.parse_int_list("16,x", "--subspace")
    with pytest.raises(ValueError, match="--time is empty"):
        cli.parse_float_list("", "--time")
