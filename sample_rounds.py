"""The one resumable round sampler behind every sample file (`main.py --mode eval`,
`--mode eval_subspace`, `subspace_sample.py`).

N samples are drawn in rounds of B: round r holds min(B, N - r B) samples (a round may hold more,
e.g. a sampler of fixed batch shape) and is seeded with `torch.manual_seed(seed_of_round(r))`
before it is drawn, so a round is the same whichever process draws it and whenever. Each round is
written atomically to FOLDER/samples_{r}.npz (uint8 NHWC under the key `samples`, the original
evaluation format) as soon as it is drawn. A later run with the same settings skips every round
on disk that holds the samples it needs, so an interrupted run resumes and a larger N extends the
samples; the settings are recorded beside the folder and checked first (`sample_settings`).
Under torchrun the rounds still to draw are split across ranks (`distributed.map_rounds`); rank 0
writes every file.

Construct a `RoundSampler` before anything expensive (it checks the settings), then call
`run(draw)` with the function that draws one round (the settings are recorded then).
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distributed
import sample_settings
from files import atomic_numpy_save, remove_stale_temporaries

logger = logging.getLogger(__name__)

ROUND_GLOB = "samples_*.npz"


def round_path(folder: str | os.PathLike, r: int) -> Path:
    """FOLDER/samples_{r}.npz, the file of round r."""
    return Path(folder) / f"samples_{r}.npz"


def round_sizes(total: int, batch: int) -> list[int]:
    """Samples each round contributes to `total` samples in rounds of `batch` (the last one
    cut)."""
    return [min(batch, total - start) for start in range(0, total, batch)]


@dataclasses.dataclass
class Round:
    """One drawn round: uint8 NHWC samples, anything the caller wants back from the round
    (`info`, e.g. network-evaluation counts) and a note for the log line."""

    samples: np.ndarray
    info: Any = None
    note: str = ""


@dataclasses.dataclass
class Rounds:
    """What `RoundSampler.run` returns: on rank 0 the first `total` samples and the (round,
    info) of every round drawn in this run, in round order; on other ranks None and []."""

    samples: np.ndarray | None
    drawn: list[tuple[int, Any]]


def _check_samples(samples: np.ndarray, path: Path,
                   image_shape: tuple[int, ...] | None) -> np.ndarray:
    if samples.ndim != 4 or samples.dtype != np.uint8 or (
            image_shape is not None and tuple(samples.shape[1:]) != tuple(image_shape)):
        wanted = "[N, " + ", ".join(map(str, image_shape)) + "]" if image_shape else "NHWC"
        raise ValueError(f"{path} holds samples of shape {samples.shape} ({samples.dtype}), not "
                         f"uint8 {wanted}: choose another name for the output or delete it.")
    return samples


def _load(path: Path, image_shape: tuple[int, ...] | None) -> np.ndarray:
    try:
        if path.suffix == ".npy":
            samples = np.load(path)
        else:
            with np.load(path) as archive:
                samples = archive["samples"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a readable sample file ({error}): choose another name "
                         "for the output or delete it.") from None
    return _check_samples(samples, path, image_shape)


class RoundSampler:
    """Resumable sampling of `total` samples in rounds of `batch` into `folder` (see the module
    docstring).

    `settings` is the record of everything that makes the samples (seed and batch included),
    compared with the record of an earlier run; `seed_of_round(r)` is the seed of round r.
    `output`, when given, receives the `total` samples as one `.npy` file at the end; an output
    left by an earlier version of `subspace_sample.py` (one file, no round folder) is split into
    its rounds. `image_shape` (H, W, C) is checked on the samples read back.
    """

    def __init__(self, folder: str | os.PathLike, total: int, batch: int,
                 seed_of_round: Callable[[int], int], settings: Mapping[str, Any],
                 output: str | os.PathLike | None = None,
                 image_shape: tuple[int, int, int] | None = None):
        if total < 1 or batch < 1:
            raise ValueError(f"Sampling needs at least one sample in rounds of at least one; "
                             f"got {total} samples in rounds of {batch}.")
        self.folder, self.total, self.batch = Path(folder), int(total), int(batch)
        self.seed_of_round = seed_of_round
        self.output = None if output is None else Path(output)
        self.image_shape = image_shape
        self.sizes = round_sizes(self.total, self.batch)
        main = distributed.is_main_process()
        if main:
            self._remove_stale_temporaries()
        exists = self._round_files() != {} or (self.output is not None
                                               and self.output.is_file())
        problem = distributed.broadcast_from_main(
            sample_settings.settings_problem(self.folder, settings, exists) if main else None)
        if problem:
            raise sample_settings.SettingsMismatchError(problem)
        # Recorded when sampling starts, so a failure before it (e.g. a checkpoint that does
        # not load) leaves nothing behind.
        self.settings = None if exists else dict(settings)
        self.done: dict[int, np.ndarray] = {}

    def _round_files(self) -> dict[int, Path]:
        found = {}
        if self.folder.is_dir():
            for path in self.folder.glob(ROUND_GLOB):
                index = path.stem.removeprefix("samples_")
                if index.isdigit():
                    found[int(index)] = path
        return found

    def _remove_stale_temporaries(self) -> None:
        """What a killed run left while writing this sampler's files (never anything else)."""
        places = [(self.folder, ROUND_GLOB)]
        sidecar = sample_settings.settings_path(self.folder)
        places.append((sidecar.parent, glob.escape(sidecar.name)))
        if self.output is not None:
            places.append((self.output.parent, glob.escape(self.output.name)))
        for folder, names in places:
            for stale in remove_stale_temporaries(folder, names):
                logger.info("Removed %s, left by an interrupted write.", stale)

    def _load_done(self) -> dict[int, np.ndarray]:
        """The rounds on disk that hold at least the samples this run needs from them."""
        files = self._round_files()
        if not files and self.output is not None and self.output.is_file():
            # One file of an earlier version: its whole rounds become round files.
            earlier = _load(self.output, self.image_shape)
            for r, start in enumerate(range(0, len(earlier), self.batch)):
                files[r] = round_path(self.folder, r)
                atomic_numpy_save(files[r], samples=earlier[start:start + self.batch])
        done = {}
        for r, size in enumerate(self.sizes):
            if r in files:
                samples = _load(files[r], self.image_shape)
                if len(samples) >= size:
                    done[r] = samples
        return done

    def run(self, draw: Callable[[int, int], Round]) -> Rounds:
        """Draw the rounds not on disk with `draw(r, size)` (seeded first) and return the
        samples; `draw` must return at least `size` samples."""
        main = distributed.is_main_process()
        if main:
            if self.settings is not None:
                sample_settings.record_settings(self.folder, self.settings)
            self.done = self._load_done()
        todo: list[int] = distributed.broadcast_from_main(
            [r for r in range(len(self.sizes)) if r not in self.done] if main else None)
        num_rounds = len(self.sizes)
        logger.info("%d samples in %d rounds of %d into %s: %d rounds on disk, %d to draw.",
                    self.total, num_rounds, self.batch, self.folder, num_rounds - len(todo),
                    len(todo))

        def one_round(r: int) -> Round:
            torch.manual_seed(self.seed_of_round(r))
            drawn = draw(r, self.sizes[r])
            if len(drawn.samples) < self.sizes[r]:
                raise RuntimeError(f"Round {r} drew {len(drawn.samples)} samples, fewer than "
                                   f"the {self.sizes[r]} it needs.")
            return drawn

        def keep(r: int, drawn: Round) -> None:
            path = round_path(self.folder, r)
            atomic_numpy_save(path, samples=drawn.samples)
            self.done[r] = drawn.samples
            note = f" ({drawn.note})" if drawn.note else ""
            logger.info("Sampling round %d/%d saved to %s%s.", r + 1, num_rounds, path, note)

        results = distributed.map_rounds(todo, one_round, on_result=keep)
        if results is None:
            return Rounds(None, [])
        samples = np.concatenate([self.done[r] for r in range(num_rounds)])[:self.total]
        if self.output is not None:
            atomic_numpy_save(self.output, samples=samples)
        return Rounds(samples, [(r, drawn.info) for r, drawn in zip(todo, results)])
