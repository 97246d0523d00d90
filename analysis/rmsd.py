"""Distance of a dataset to low-dimensional subspaces (Table 1 of the paper).

For an image x in [0,1]^d (d = C S^2) and a subspace of dimension n (the size-s downsampling
subspace has n = C s^2), the per-orthogonal-dimension RMSD is

    r = sqrt(E ||x - proj(x)||^2 / (d - n)),

where proj is one of
  * `downsample`: the orthogonal projector P_k = U^k D^k onto images constant on 2^k blocks
    (subspace_lib); r is the statistic upsampling and the implicit score use (docs/maths.md 3);
  * `pca`: the affine PCA subspace with n components, fit on the first `pca_fit_images` images;
  * `patch_pca`: non-overlapping 2^k x 2^k patches, each reconstructed from a C-component PCA
    basis shared by all patch positions (fit on the first `patch_pca_fit_images` images), so the
    subspace again has n = C s^2 dimensions.
The distance to the mean, sqrt(E ||x - E x||^2 / d), is reported as `mean_distance`.
Everything is streamed over batches and accumulated in float64.

Command line (needs datasets.py and a config):
    python -m analysis.rmsd --config configs/builtin/ve_ncsnpp_small.py [--split train]
        [--max_images N] [--methods downsample,pca,patch_pca] [--sizes 16,8,4]
        [--out table.json] [--update_stats [--stats_file assets/subspace_rmsd.json]]

The table is printed, and saved only where --out says. The statistics file that sampling reads
changes only with --update_stats, and then the dataset's entry at this image size is replaced
as a whole, so it never mixes two measurements.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

import subspace_lib
from analysis.batches import image_batches

METHODS: tuple[str, ...] = ("downsample", "pca", "patch_pca")
DEFAULT_PCA_FIT_IMAGES = 10000
DEFAULT_PATCH_PCA_FIT_IMAGES = 1000
# Above this dimension (or the number of fit images) the global PCA is fit from stored samples
# (Gram matrix) rather than from a streamed d x d covariance.
MAX_COVARIANCE_DIM = 8192

log = logging.getLogger(__name__)


def default_subspace_sizes(image_size: int, min_size: int = 4) -> list[int]:
    """Every size reached by halving `image_size`, from image_size / 2 down to `min_size`."""
    sizes = []
    size = image_size // 2
    while size >= min_size and size * 2 <= image_size and image_size % size == 0:
        sizes.append(size)
        if size % 2:
            break
        size //= 2
    return sizes


def downsampling_sq_distance(x: torch.Tensor, k: int) -> torch.Tensor:
    """Per-image squared distance ||x - P_k x||^2 to the k-halvings downsampling subspace."""
    return subspace_lib.orthogonal_part(x, k).pow(2).flatten(1).sum(1)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut images [B, C, H, W] into non-overlapping patches: [B, H/p * W/p, C p p] (channel-major
    within a patch)."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"Images of size {h}x{w} cannot be cut into {patch}x{patch} patches.")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


@dataclass
class PCABasis:
    """An affine PCA subspace: `mean` [D] and orthonormal `components` [n, D] (largest first)."""

    mean: torch.Tensor
    components: torch.Tensor

    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """Projection of rows v [..., D] onto the affine subspace."""
        centered = v - self.mean
        return self.mean + (centered @ self.components.T) @ self.components

    def sq_residual(self, v: torch.Tensor) -> torch.Tensor:
        """Squared distance of each row v [..., D] to the affine subspace."""
        centered = v - self.mean
        residual = centered - (centered @ self.components.T) @ self.components
        return residual.pow(2).sum(-1)

    def truncated(self, n_components: int) -> PCABasis:
        """The basis of the `n_components` leading components."""
        return PCABasis(self.mean, self.components[:n_components])


def _check_components(n_components: int, num_samples: int, dim: int) -> None:
    if not 0 < n_components <= min(num_samples - 1, dim):
        raise ValueError(
            f"A PCA with {n_components} components needs more than {n_components} samples of "
            f"dimension at least {n_components}; got {num_samples} samples of dimension {dim}: "
            "fit on more images or choose a smaller subspace.")


class CovarianceAccumulator:
    """Streams rows of dimension D into float64 sums, then fits the exact PCA by eigh of the
    D x D covariance."""

    def __init__(self, dim: int, device: torch.device | str | None = None):
        self.dim = dim
        self.count = 0
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, rows: torch.Tensor) -> None:
        """Add rows [M, D] to the running sums."""
        rows = rows.reshape(-1, self.dim).to(self.total)
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.T @ rows

    def fit(self, n_components: int) -> PCABasis:
        """The PCA basis of the rows seen so far with `n_components` components."""
        _check_components(n_components, self.count, self.dim)
        mean = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean, mean)
        _, vectors = torch.linalg.eigh(covariance)
        components = vectors[:, -n_components:].flip(1).T.contiguous()
        return PCABasis(mean, components)


def fit_pca(samples: torch.Tensor, n_components: int) -> PCABasis:
    """Exact PCA of rows `samples` [N, D] (float64): covariance eigh when N >= D, else Gram."""
    samples = samples.to(torch.float64)
    num, dim = samples.shape
    _check_components(n_components, num, dim)
    if num >= dim:
        accumulator = CovarianceAccumulator(dim, samples.device)
        accumulator.update(samples)
        return accumulator.fit(n_components)
    mean = samples.mean(0)
    centered = samples - mean
    values, vectors = torch.linalg.eigh(centered @ centered.T)
    values, vectors = values[-n_components:].flip(0), vectors[:, -n_components:].flip(1)
    if values[-1] <= values[0] * 1e-12:
        raise ValueError(
            f"The fit images span fewer than {n_components} dimensions: fit on more (or more "
            "varied) images or choose a smaller subspace.")
    components = (centered.T @ vectors) / values.sqrt()
    return PCABasis(mean, components.T.contiguous())


def _sqrt_ratio(total: float, count: int, dims: int) -> float:
    return math.sqrt(total / count / dims)


class _FirstPass:
    """Streaming sums of the first pass: pixel moments, downsampling residuals and PCA fits."""

    def __init__(self, first: torch.Tensor, subspace_sizes: Sequence[int] | None,
                 methods: Sequence[str], pca_fit_images: int | None,
                 patch_pca_fit_images: int | None, max_images: int | None,
                 max_covariance_dim: int):
        _, c, h, w = first.shape
        if h != w:
            raise ValueError(f"Images must be square; got {h}x{w}.")
        self.channels, self.image_size, self.dim = c, h, c * h * w
        sizes = list(subspace_sizes) if subspace_sizes else default_subspace_sizes(h)
        if not sizes:
            raise ValueError(f"Image size {h} has no halving subspace of size 4 or more: give "
                             "the subspace sizes explicitly.")
        self.halvings = {s: subspace_lib.num_halvings(h, s) for s in sizes}
        if any(k == 0 for k in self.halvings.values()):
            raise ValueError(f"Subspace sizes must be smaller than the image size {h}; got "
                             f"{sorted(sizes, reverse=True)}.")
        self.methods = methods
        self.pca_fit_images, self.patch_pca_fit_images = pca_fit_images, patch_pca_fit_images
        self.count = self.pca_fit_count = self.patch_fit_count = 0
        self.pixel_sum = torch.zeros_like(first[0])
        self.pixel_sq_sum = torch.zeros_like(first[0])
        self.down_sums = dict.fromkeys(self.halvings, 0.0)
        # The global PCA streams a d x d covariance unless d is large or exceeds the number of
        # fit images; then it keeps the fit images and uses their (smaller) Gram matrix.
        fit_cap = min(v for v in (pca_fit_images, max_images, math.inf) if v is not None)
        self.pca_accumulator = None
        if "pca" in methods and self.dim <= min(max_covariance_dim, fit_cap):
            self.pca_accumulator = CovarianceAccumulator(self.dim, first.device)
        self.pca_rows: list[torch.Tensor] = []
        self.patch_accumulators = {}
        if "patch_pca" in methods:
            self.patch_accumulators = {s: CovarianceAccumulator(c * 4**k, first.device)
                                       for s, k in self.halvings.items()}

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a float64 batch [B, C, S, S]."""
        if x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"All images must have the shape of the first batch "
                             f"{(self.channels, self.image_size, self.image_size)}; got "
                             f"{tuple(x.shape[1:])}.")
        b = x.shape[0]
        self.count += b
        self.pixel_sum += x.sum(0)
        self.pixel_sq_sum += x.pow(2).sum(0)
        if "downsample" in self.methods:
            for s, k in self.halvings.items():
                self.down_sums[s] += float(downsampling_sq_distance(x, k).sum())
        take = _take(b, self.pca_fit_count, self.pca_fit_images) if "pca" in self.methods else 0
        if take:
            rows = x[:take].flatten(1)
            if self.pca_accumulator is not None:
                self.pca_accumulator.update(rows)
            else:
                self.pca_rows.append(rows.to(torch.float32).cpu())
            self.pca_fit_count += take
        take = (_take(b, self.patch_fit_count, self.patch_pca_fit_images)
                if "patch_pca" in self.methods else 0)
        if take:
            for s, k in self.halvings.items():
                self.patch_accumulators[s].update(patchify(x[:take], 2**k))
            self.patch_fit_count += take

    def mean_distance(self) -> float:
        """sqrt(E ||x - E x||^2 / d)."""
        variance = self.pixel_sq_sum / self.count - (self.pixel_sum / self.count) ** 2
        return math.sqrt(max(float(variance.sum()), 0.0) / self.dim)


def rmsd_table(dataset: Iterable, subspace_sizes: Sequence[int] | None = None,
               methods: Sequence[str] = METHODS, max_images: int | None = None,
               pca_fit_images: int | None = DEFAULT_PCA_FIT_IMAGES,
               patch_pca_fit_images: int | None = DEFAULT_PATCH_PCA_FIT_IMAGES,
               device: torch.device | str | None = None, progress: bool = False,
               max_covariance_dim: int = MAX_COVARIANCE_DIM) -> dict:
    """Per-orthogonal-dimension RMSD of `dataset` (pixels in [0,1]) to each subspace.

    `dataset` is re-iterable (two passes when PCA or patch-PCA is asked for) and yields image
    batches [B, C, S, S] or {"image": batch} dicts. Returns {"num_images", "image_size",
    "channels", "mean_distance", "rmsd": {method: {size: r or None}}, "fit_images": {...}};
    a PCA value is None when it has more components than the fit images allow.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(
            f"Unknown subspace method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}.")
    for name, value in (("pca_fit_images", pca_fit_images),
                        ("patch_pca_fit_images", patch_pca_fit_images)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be positive (or None for all images); got {value}.")
    device = torch.device(device) if device is not None else torch.device("cpu")

    stats: _FirstPass | None = None
    bar = _progress(progress, max_images, "RMSD pass 1/2" if _two_pass(methods) else "RMSD")
    for images in image_batches(dataset, max_images):
        x = images.to(device=device, dtype=torch.float64)
        if stats is None:
            stats = _FirstPass(x, subspace_sizes, methods, pca_fit_images, patch_pca_fit_images,
                               max_images, max_covariance_dim)
        stats.add(x)
        bar.update(x.shape[0])
    bar.close()
    if stats is None:
        raise ValueError("The dataset yielded no images: check the dataset and max_images.")

    count, halvings = stats.count, stats.halvings
    orth_dims = {s: stats.dim - stats.channels * s**2 for s in halvings}
    result = {"num_images": count, "image_size": stats.image_size, "channels": stats.channels,
              "mean_distance": stats.mean_distance(), "rmsd": {}, "fit_images": {}}
    if "downsample" in methods:
        result["rmsd"]["downsample"] = {
            str(s): _sqrt_ratio(stats.down_sums[s], count, orth_dims[s]) for s in halvings}
    pca_bases: dict[int, PCABasis | None] = {}
    if "pca" in methods:
        result["fit_images"]["pca"] = stats.pca_fit_count
        pca_bases = _fit_global_pca(stats.pca_accumulator, stats.pca_rows, halvings,
                                    stats.channels, device)
    patch_bases = {s: acc.fit(stats.channels) for s, acc in stats.patch_accumulators.items()}
    if "patch_pca" in methods:
        result["fit_images"]["patch_pca"] = stats.patch_fit_count
    if not (pca_bases or patch_bases):
        return result

    # Second pass: residuals to the fitted PCA subspaces, over the same images.
    pca_sums = dict.fromkeys(pca_bases, 0.0)
    patch_sums = dict.fromkeys(patch_bases, 0.0)
    bar = _progress(progress, count, "RMSD pass 2/2")
    for images in image_batches(dataset, count):
        x = images.to(device=device, dtype=torch.float64)
        flat = x.flatten(1)
        for s, basis in pca_bases.items():
            if basis is not None:
                pca_sums[s] += float(basis.sq_residual(flat).sum())
        for s, basis in patch_bases.items():
            patch_sums[s] += float(basis.sq_residual(patchify(x, 2 ** halvings[s])).sum())
        bar.update(x.shape[0])
    bar.close()
    if pca_bases:
        result["rmsd"]["pca"] = {
            str(s): None if basis is None else _sqrt_ratio(pca_sums[s], count, orth_dims[s])
            for s, basis in pca_bases.items()}
    if patch_bases:
        result["rmsd"]["patch_pca"] = {
            str(s): _sqrt_ratio(patch_sums[s], count, orth_dims[s]) for s in patch_bases}
    return result


def _fit_global_pca(accumulator: CovarianceAccumulator | None, rows: list[torch.Tensor],
                    halvings: dict[int, int], channels: int,
                    device: torch.device) -> dict[int, PCABasis | None]:
    """Fit one PCA with the most components needed and truncate it for each subspace size."""
    num = accumulator.count if accumulator is not None else sum(r.shape[0] for r in rows)
    dim = accumulator.dim if accumulator is not None else rows[0].shape[1]
    wanted = {s: channels * s**2 for s in halvings}
    feasible = {s: n for s, n in wanted.items() if n <= min(num - 1, dim)}
    for s in sorted(set(wanted) - set(feasible), reverse=True):
        log.warning("PCA for subspace %d needs %d components but %d fit images allow at most "
                    "%d; reporting null (fit on more images: pca_fit_images).", s, wanted[s], num,
                    max(min(num - 1, dim), 0))
    bases: dict[int, PCABasis | None] = dict.fromkeys(wanted)
    if not feasible:
        return bases
    most = max(feasible.values())
    if accumulator is not None:
        full = accumulator.fit(most)
    else:
        full = fit_pca(torch.cat(rows).to(device), most)
    for s, n in feasible.items():
        bases[s] = full.truncated(n)
    return bases


def _two_pass(methods: Sequence[str]) -> bool:
    return "pca" in methods or "patch_pca" in methods


def _take(batch: int, seen: int, limit: int | None) -> int:
    return batch if limit is None else max(0, min(batch, limit - seen))


def _progress(enabled: bool, total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


# --------------------------------------------------------------------------------------------
# Command line.

def format_rmsd_table(table: dict) -> str:
    """Plain-text table: one row per subspace size, one column per method."""
    methods = list(table["rmsd"])
    sizes = sorted({int(s) for values in table["rmsd"].values() for s in values}, reverse=True)
    lines = [f"{'size':>6}  " + "  ".join(f"{m:>10}" for m in methods)]
    for size in sizes:
        cells = []
        for method in methods:
            value = table["rmsd"][method].get(str(size))
            cells.append(f"{'-':>10}" if value is None else f"{value:>10.5f}")
        lines.append(f"{size:>6}  " + "  ".join(cells))
    lines.append(f"distance to the mean: {table['mean_distance']:.5f} "
                 f"({table['num_images']} images of {table['image_size']}x{table['image_size']})")
    return "\n".join(lines)


def _define_flags() -> None:
    from absl import flags
    from ml_collections.config_flags import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Config of the full-size model (its data section selects the dataset).",
        lock_config=True)
    flags.DEFINE_enum("split", "train", ["train", "eval"], "Dataset split to measure.")
    flags.DEFINE_integer("max_images", None, "Use at most this many images (default: all).")
    flags.DEFINE_string("methods", ",".join(METHODS), "Subspaces: comma list of "
                        f"{', '.join(METHODS)}.")
    flags.DEFINE_alias("subspace", "methods")
    flags.DEFINE_string("sizes", None, "Subspace sizes, e.g. 16,8,4 (default: every halving down "
                        "to 4).")
    flags.DEFINE_integer("pca_fit_images", DEFAULT_PCA_FIT_IMAGES,
                         "Images the global PCA is fit on (0: all).")
    flags.DEFINE_integer("patch_pca_fit_images", DEFAULT_PATCH_PCA_FIT_IMAGES,
                         "Images the patch PCA is fit on (0: all).")
    flags.DEFINE_string("out", None, "JSON file for the table (default: printed only).")
    flags.DEFINE_string("stats_file", str(subspace_lib.DEFAULT_RMSD_PATH),
                        "Statistics file that upsampling reads; with --update_stats the "
                        "downsampling RMSDs replace the dataset's entry at this size in it.")
    flags.DEFINE_bool("update_stats", False, "Write the downsampling RMSDs into --stats_file "
                      "(a tracked file by default: only when asked).")
    flags.DEFINE_bool("progress", True, "Show progress bars.")
    flags.mark_flag_as_required("config")


def _cli() -> None:
    import json
    from pathlib import Path

    from absl import flags

    import cli
    import datasets
    from analysis.cli import UsageError, check_full_size, parse_sizes
    from files import atomic_write_text
    from models.utils import config_device

    FLAGS = flags.FLAGS
    config = FLAGS.config
    check_full_size(config)
    methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"--methods '{FLAGS.methods}' must list some of {', '.join(METHODS)}.")
    sizes = parse_sizes(FLAGS.sizes, "--sizes") if FLAGS.sizes else None
    cli.check_range(FLAGS.max_images, "--max_images", low=1)
    cli.check_range(FLAGS.pca_fit_images, "--pca_fit_images", low=0)
    cli.check_range(FLAGS.patch_pca_fit_images, "--patch_pca_fit_images", low=0)
    if FLAGS.out:
        cli.check_writable(FLAGS.out, "--out", is_dir=False)
    if FLAGS.update_stats:
        if "downsample" not in methods:
            raise UsageError("--update_stats writes the downsampling RMSDs: include downsample "
                             "in --methods.")
        cli.check_writable(FLAGS.stats_file, "--stats_file", is_dir=False)
    name = subspace_lib.dataset_stats_name(config)
    train_ds, eval_ds, _ = datasets.get_dataset(config, uniform_dequantization=False,
                                                evaluation=True)
    dataset = train_ds if FLAGS.split == "train" else eval_ds
    table = rmsd_table(dataset, sizes, methods, max_images=FLAGS.max_images,
                       pca_fit_images=FLAGS.pca_fit_images or None,
                       patch_pca_fit_images=FLAGS.patch_pca_fit_images or None,
                       device=config_device(config), progress=FLAGS.progress)
    table = {"dataset": name, "split": FLAGS.split, **table}
    print(format_rmsd_table(table))
    if FLAGS.out:
        atomic_write_text(Path(FLAGS.out), json.dumps(table, indent=2) + "\n")
        print(f"saved {FLAGS.out}")
    if FLAGS.update_stats:
        values = {int(s): r for s, r in table["rmsd"]["downsample"].items()}
        path = subspace_lib.write_rmsd(name, table["image_size"], values, FLAGS.stats_file)
        print(f"updated '{name}' at {table['image_size']}x{table['image_size']} in {path}")


if __name__ == "__main__":
    import cli
    from analysis.cli import run

    _define_flags()
    cli.start(lambda argv: run(_cli))
