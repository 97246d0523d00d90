"""RMSD of data to downsampling / PCA / patch-PCA subspaces (analysis.rmsd)."""
import logging

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from analysis import rmsd


def _images(n=37, c=2, s=8, seed=0):
    """Smooth-ish random images in [0,1] (so that subspaces differ in quality)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, s // 4, s // 4, generator=g, dtype=torch.float64)
    smooth = low.repeat_interleave(4, -1).repeat_interleave(4, -2)
    return (0.7 * smooth + 0.3 * torch.rand(n, c, s, s, generator=g, dtype=torch.float64))


def _batches(x, size=10, as_dict=True):
    chunks = list(torch.split(x, size))
    return [{"image": b.float()} for b in chunks] if as_dict else [b.float() for b in chunks]


def _block_projector(c, s, block):
    """Explicit d x d matrix averaging each channel over `block` x `block` squares."""
    d = c * s * s
    index = np.arange(d).reshape(c, s, s)
    P = np.zeros((d, d))
    for ch in range(c):
        for bi in range(0, s, block):
            for bj in range(0, s, block):
                members = index[ch, bi:bi + block, bj:bj + block].ravel()
                P[np.ix_(members, members)] = 1.0 / block**2
    return P


def test_downsampling_and_mean_distance_equal_brute_force():
    c, s = 2, 8
    x = _images(c=c, s=s)
    data = x.float().double().numpy().reshape(len(x), -1)
    table = rmsd.rmsd_table(_batches(x), subspace_sizes=[4, 2, 1], methods=["downsample"])
    assert table["num_images"] == 37 and table["image_size"] == s and table["channels"] == c
    d = c * s * s
    for size in (4, 2, 1):
        P = _block_projector(c, s, s // size)
        assert np.allclose(P @ P, P) and np.allclose(P, P.T)
        n = c * size * size
        assert round(np.trace(P)) == n
        residual = data - data @ P.T
        want = np.sqrt((residual**2).sum(1).mean() / (d - n))
        assert table["rmsd"]["downsample"][str(size)] == pytest.approx(want, rel=1e-12)
    centered = data - data.mean(0)
    assert table["mean_distance"] == pytest.approx(
        np.sqrt((centered**2).sum(1).mean() / d), rel=1e-10)


def test_max_images_and_plain_tensor_batches():
    x = _images(n=30)
    full = rmsd.rmsd_table(_batches(x[:23], as_dict=False), subspace_sizes=[4],
                           methods=["downsample"])
    capped = rmsd.rmsd_table(_batches(x, as_dict=False), subspace_sizes=[4],
                             methods=["downsample"], max_images=23)
    assert capped["num_images"] == 23
    assert capped["rmsd"] == full["rmsd"]


@pytest.mark.parametrize("fit,max_covariance_dim,gram", [(80, 10**6, False), (40, 10**6, True),
                                                         (80, 0, True)],
                         ids=["covariance", "gram-few-images", "gram-large-dim"])
def test_pca_residual_matches_sklearn(fit, max_covariance_dim, gram, monkeypatch):
    c, s = 1, 8
    x = _images(n=100, c=c, s=s, seed=1)
    data = x.float().double().numpy().reshape(len(x), -1)
    calls = []
    original = rmsd.fit_pca
    monkeypatch.setattr(rmsd, "fit_pca", lambda *a: calls.append(1) or original(*a))
    table = rmsd.rmsd_table(_batches(x), subspace_sizes=[4, 2], methods=["pca"],
                            pca_fit_images=fit, max_covariance_dim=max_covariance_dim)
    assert bool(calls) == gram  # which of the two exact fits ran
    assert table["fit_images"]["pca"] == fit
    d = c * s * s
    for size in (4, 2):
        n = c * size * size
        pca = PCA(n_components=n, svd_solver="full").fit(data[:fit])
        recon = pca.inverse_transform(pca.transform(data))
        want = np.sqrt(((data - recon) ** 2).sum(1).mean() / (d - n))
        assert table["rmsd"]["pca"][str(size)] == pytest.approx(want, rel=1e-8)


def test_patch_pca_residual_matches_sklearn():
    c, s, fit = 3, 8, 12
    x = _images(n=20, c=c, s=s, seed=2)
    data = x.float().double().numpy()
    table = rmsd.rmsd_table(_batches(x, size=7), subspace_sizes=[4, 2], methods=["patch_pca"],
                            patch_pca_fit_images=fit)
    d = c * s * s
    for size in (4, 2):
        p = s // size
        # Patches cut with explicit loops, in a different coordinate order than the library.
        patches = np.array([[data[i, :, bi:bi + p, bj:bj + p].transpose(1, 2, 0).ravel()
                             for bi in range(0, s, p) for bj in range(0, s, p)]
                            for i in range(len(data))])
        pca = PCA(n_components=c, svd_solver="full").fit(patches[:fit].reshape(-1, c * p * p))
        flat = patches.reshape(-1, c * p * p)
        recon = pca.inverse_transform(pca.transform(flat))
        total = ((flat - recon) ** 2).sum() / len(data)
        n = c * size * size
        assert table["rmsd"]["patch_pca"][str(size)] == pytest.approx(
            np.sqrt(total / (d - n)), rel=1e-8)


def test_subspace_quality_ordering_on_structured_data():
    # Images that are exactly block-constant plus small noise: downsampling fits best at size 2.
    x = _images(n=50, c=1, s=8, seed=3)
    table = rmsd.rmsd_table(_batches(x), subspace_sizes=[4, 2], pca_fit_images=None,
                            patch_pca_fit_images=None)
    r = table["rmsd"]
    assert set(r) == {"downsample", "pca", "patch_pca"}
    assert all(0 < v < table["mean_distance"] * 2 for m in r.values() for v in m.values())
    # PCA fit on all images minimises the mean squared residual over all n-dim affine subspaces.
    assert r["pca"]["4"] <= r["downsample"]["4"] and r["pca"]["2"] <= r["downsample"]["2"]


def test_infeasible_pca_is_null_with_warning(caplog):
    x = _images(n=12, c=1, s=8)
    with caplog.at_level(logging.WARNING):
        table = rmsd.rmsd_table(_batches(x), subspace_sizes=[4, 2], methods=["pca"])
    assert table["rmsd"]["pca"]["4"] is None  # 16 components from 12 images
    assert table["rmsd"]["pca"]["2"] is not None
    assert "pca_fit_images" in caplog.text and "null" in caplog.text


def test_default_sizes_and_errors():
    assert rmsd.default_subspace_sizes(32) == [16, 8, 4]
    assert rmsd.default_subspace_sizes(256) == [128, 64, 32, 16, 8, 4]
    x = _images(n=4)
    with pytest.raises(ValueError, match="Unknown subspace method"):
        rmsd.rmsd_table(_batches(x), methods=["wavelet"])
    with pytest.raises(ValueError, match="no images"):
        rmsd.rmsd_table([], subspace_sizes=[4])
    with pytest.raises(ValueError, match="square"):
        rmsd.rmsd_table([torch.rand(2, 1, 8, 4)], subspace_sizes=[2])
    with pytest.raises(ValueError, match="divide"):
        rmsd.rmsd_table(_batches(x), subspace_sizes=[3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):  # e.g. subspace coordinates D^k x
        rmsd.rmsd_table([2 * torch.ones(2, 1, 8, 8)], subspace_sizes=[4])
    with pytest.raises(ValueError, match="shape"):
        rmsd.rmsd_table([torch.rand(2, 1, 8, 8), torch.rand(2, 2, 8, 8)], subspace_sizes=[4])
