"""What a demo run does: its modes and settings, the fixed sizes and samplers, the model
config, the committed checkpoints and their manifest.

The demo (`demo.py`, orchestrated by `demo_run.run_demo`) is the main job of the paper on MNIST
(default) or the built-in dataset (`DEMO_DATASETS`), sized for a laptop. Modes
(`DemoSettings.for_mode`): `full` (the measured laptop run), `quick` (sampling and table from
the committed checkpoints of assets/checkpoints/<dataset>, no training, no likelihood) and
`smoke` (a few training steps and tiny sample counts, for the tests). Every other demo module
imports this one; it imports none of them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
import torch

from models import utils as mutils

ROOT = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
FULL_SIZE = 32
SUBSPACE_SIZES = (16, 8)
# The samplers compared at the same N: name -> subspace sizes of the plan (empty: full only).
SAMPLERS: dict[str, tuple[int, ...]] = {"full only": (), "subspace 16": (16,),
                                        "subspace 16, 8": (16, 8)}
MODES = ("full", "quick", "smoke")
# The claim on the full model's quality: its FID at most this many times the held-out floor's
# at the same count (Inception FID where available, else the proxy's).
FLOOR_FACTORS = {"fid": 3.0, "proxy_fid": 2.0}


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    """A dataset the demo runs on: its config, its subspace statistics entry, where its
    committed checkpoints and results live."""

    name: str
    config_module: str
    # The entry of assets/subspace_rmsd.json (and of a run's subspace_rmsd.json).
    stats_name: str
    description: str
    # Its name in figure titles.
    title: str

    @property
    def checkpoints(self) -> Path:
        """Folder of the committed EMA weights and their manifest."""
        return ROOT / "assets" / "checkpoints" / self.name

    @property
    def assets(self) -> Path:
        """Folder of the committed run's table and figures."""
        return ROOT / "assets" / "demo" / self.name


DEMO_DATASETS = {
    "mnist": DemoDataset("mnist", "configs.mnist.subvp_ddpmpp_small", "mnist",
                         "MNIST digits (60,000 training / 10,000 test, zero-padded to 32x32, "
                         "one channel)", "MNIST"),
    "builtin": DemoDataset("builtin", "configs.builtin.subvp_ddpmpp_small", "builtin",
                           "the built-in dataset (32x32 crops of the scikit-image photographs)",
                           "built-in"),
}
DEFAULT_DATASET = "mnist"


def demo_dataset(name: str) -> DemoDataset:
    """The demo dataset called `name` (a key of DEMO_DATASETS)."""
    if name not in DEMO_DATASETS:
        raise ValueError(f"Unknown demo dataset '{name}': choose one of "
                         f"{', '.join(DEMO_DATASETS)}.")
    return DEMO_DATASETS[name]


DEFAULT_LR = 1e-3


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run does, for one mode (`for_mode`)."""

    mode: str
    train: bool
    train_steps: dict[int, int]
    train_batch: int = 32
    # Learning rate per image size (sizes not listed: 1e-3).
    lr: dict[int, float] = dataclasses.field(default_factory=dict)
    warmup: int = 100
    # The 16x16 and 8x8 models only run above their cutoffs, so they train on t in [this, 1]
    # (the cutoffs are raised to it if the divergence puts them lower).
    subspace_min_time: float = 0.2
    num_steps: int = 50
    num_samples: int = 512
    sample_batch: int = 128
    # Step counts of the quality-against-cost curve (empty: no curve); num_steps is reused.
    curve_steps: tuple[int, ...] = (10, 25, 50)
    bootstrap_resamples: int = 200
    # The proxy KID's reference: the first this many training images (all of the built-in
    # dataset's 3301; 5000 of MNIST's 60,000, where the KID blocks of all would cost minutes).
    kid_reference_images: int = 5000
    # Inception FID and KID of the table's rows (N = num_steps) and of the held-out floor,
    # where the dataset's torch Inception statistics are committed; the curve stays proxy-only.
    inception: bool = True
    grid_samples: int = 64
    # Images per panel of nearest.png (the closest samples beside their nearest training image).
    nearest_panel: int = 8
    divergence: bool = True
    divergence_images: int = 512
    divergence_times: int = 21
    threshold: float = 3e-3
    floor_factor: float = 2.0
    untrained_floor: float = 0.3
    bpd: bool = True
    bpd_images: int = 64
    bpd_batch: int = 32
    bpd_tol: float = 1e-4
    langevin_snr: float = 0.01
    langevin_steps: int = 2
    # Used only for an untrained full model (see `choose_threshold`).
    fallback_cutoffs: tuple[float, float] = (0.5, 0.6)
    seed: int = 42
    dataset: str = DEFAULT_DATASET

    @classmethod
    def for_mode(cls, mode: str, dataset: str = DEFAULT_DATASET) -> DemoSettings:
        """The settings of `full`, `quick` or `smoke` (see the module docstring) on `dataset`
        (a key of DEMO_DATASETS)."""
        demo_dataset(dataset)
        return dataclasses.replace(cls._for_mode(mode), dataset=dataset)

    @classmethod
    def _for_mode(cls, mode: str) -> DemoSettings:
        if mode == "full":
            # The full model at twice the subspace models' rate: the same bits/dim in 1600
            # steps as in 2400 at 1e-3 (docs/demo.md, "The 15-minute budget").
            return cls(mode, train=True, train_steps={32: 1600, 16: 800, 8: 800},
                       lr={32: 2e-3})
        if mode == "quick":
            return cls(mode, train=False, train_steps={}, divergence=False, bpd=False,
                       curve_steps=())
        if mode == "smoke":
            return cls(mode, train=True, train_steps={32: 4, 16: 4, 8: 4}, train_batch=4,
                       warmup=1, num_steps=10, num_samples=8, sample_batch=4,
                       curve_steps=(5, 10), bootstrap_resamples=20, kid_reference_images=1000,
                       grid_samples=4, divergence_images=4, divergence_times=3, bpd_images=2,
                       bpd_batch=2, bpd_tol=1e-2)
        raise ValueError(f"Unknown demo mode '{mode}': choose one of {', '.join(MODES)}.")

    @property
    def data(self) -> DemoDataset:
        """The dataset of this run."""
        return demo_dataset(self.dataset)

    def learning_rate(self, image_size: int) -> float:
        """The learning rate of the model at `image_size`."""
        return float(self.lr.get(int(image_size), DEFAULT_LR))

    def training_key(self) -> dict:
        """The settings that determine the trained weights (a workdir keeps one set)."""
        return {"config": self.data.config_module, "train_steps": {str(k): v for k, v in
                                                          self.train_steps.items()},
                "train_batch": self.train_batch,
                "lr": {str(k): self.learning_rate(k) for k in self.train_steps},
                "warmup": self.warmup,
                "subspace_min_time": self.subspace_min_time, "seed": self.seed}


def demo_config(image_size: int, settings: DemoSettings,
                device: torch.device | None = None) -> ml_collections.ConfigDict:
    """The small sub-VP DDPM++ config of the run's dataset at `image_size` with the demo's
    training settings."""
    import importlib

    config = importlib.import_module(settings.data.config_module).get_config()
    config.data.image_size = int(image_size)
    steps = settings.train_steps.get(int(image_size), 1)
    config.training.update(n_iters=steps, snapshot_freq=steps, batch_size=settings.train_batch,
                           snapshot_freq_for_preemption=min(100, steps), log_freq=25,
                           eval_freq=max(steps, 1), snapshot_sampling=False)
    config.optim.update(lr=settings.learning_rate(image_size), warmup=settings.warmup)
    if int(image_size) < FULL_SIZE:
        config.training.min_time = settings.subspace_min_time
    config.model.num_scales = settings.num_steps
    config.seed = settings.seed
    config.device = device if device is not None else mutils.default_device()
    return config


def checkpoint_path(size: int, dataset: str, folder: Path | None = None) -> Path:
    """Path of the committed EMA weights of the size-`size` model of `dataset` (in `folder`,
    default the dataset's committed checkpoints)."""
    folder = demo_dataset(dataset).checkpoints if folder is None else Path(folder)
    return folder / f"subvp_ddpmpp_small_{int(size)}.pth"


def read_manifest(dataset: str, folder: Path | None = None) -> dict:
    """The manifest of the committed checkpoints of `dataset` (how they were produced, their
    cutoffs)."""
    folder = demo_dataset(dataset).checkpoints if folder is None else Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: produce the committed checkpoints with `python demo.py "
            f"--mode full --dataset {dataset} --export_assets`.")
    return json.loads(path.read_text())


def plans(cutoffs: dict[int, float]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The samplers that the cutoffs allow, and why any other was left out (a nested plan
    needs the 8x8 cutoff after the 16x16 one)."""
    chosen, skipped = {}, {}
    for name, sizes in SAMPLERS.items():
        times = [cutoffs[s] for s in sizes]
        if all(a < b for a, b in zip(times, times[1:])):
            chosen[name] = sizes
        else:
            skipped[name] = (f"cutoffs {times} for sizes {list(sizes)} do not increase, so the "
                             "smaller level would never run")
    return chosen, skipped
