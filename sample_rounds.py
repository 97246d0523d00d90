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
import itertools
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distributed
import sample_settings
from errors import ReportableError
from files import atomic_numpy_save, remove_stale_temporaries

logger = logging.getLogger(__name__)

ROUND_GLOB = "samples_*.npz"
# Rounds handed to `distributed.map_rounds` at a time (per process), so the list of rounds to
# draw never grows with the requested sample count.
_CHUNK = 64


def round_path(folder: str | os.PathLike, r: int) -> Path:
    """FOLDER/samples_{r}.npz, the file of round r."""
    return Path(folder) / f"samples_{r}.npz"


def round_sizes(total: int, batch: int) -> list[int]:
    """Samples each round contributes to `total` samples in rounds of `batch` (the last one
    cut). A list as long as the number of rounds: the sampler itself uses `round_size`."""
    return [min(batch, total - start) for start in range(0, total, batch)]


def round_size(total: int, batch: int, r: int) -> int:
    """Samples round r contributes to `total` samples in rounds of `batch` (the last one cut)."""
    return min(batch, total - r * batch)


def _bytes_text(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB", "EB"):
        if size < 1000 or unit == "EB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_space(folder: str | os.PathLike, total: int, image_shape: tuple[int, ...],
                output: str | os.PathLike | None = None,
                count_name: str = "the sample count") -> None:
    """Refuse, before anything starts, a sample count whose uint8 samples (H x W x C bytes
    each) would not fit: the round files plus the final `.npy` (when `output` is given) must fit
    in the free space of the folder's disk (what earlier runs left there counts as free: it is
    kept or replaced), and the samples, returned as one array at the end, in the machine's
    memory. `count_name` names the setting in the sentence."""
    per_sample = math.prod(int(n) for n in image_shape)
    shape = "x".join(str(int(n)) for n in image_shape)
    folder = Path(folder)
    copies = 1 if output is None else 2
    needed = int(total) * per_sample * copies
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    present = 0
    if folder.is_dir():
        present += sum(p.stat().st_size for p in folder.glob(ROUND_GLOB) if p.is_file())
    if output is not None and Path(output).is_file():
        present += Path(output).stat().st_size
    free = shutil.disk_usage(probe).free + present
    what = "the round files and the final .npy" if output is not None else "the round files"
    if needed > free:
        raise ReportableError(
            f"{count_name} {total} (samples of {shape} uint8) would need "
            f"{_bytes_text(needed)} on disk ({what}), more than the {_bytes_text(free)} free "
            f"in {probe}: ask for fewer samples or free space.")
    memory = _physical_memory()
    if memory is not None and int(total) * per_sample > memory:
        raise ReportableError(
            f"{count_name} {total} (samples of {shape} uint8) would need "
            f"{_bytes_text(int(total) * per_sample)} of memory to return them as one array, more "
            f"than this machine's {_bytes_text(memory)}: ask for fewer samples.")


class NonFiniteSamples(ReportableError):
    """A sampling round came out with NaN or infinite values."""


def check_finite(samples: torch.Tensor, r: int, source: str) -> None:
    """Stop the run when round r's samples (floats, before the conversion to uint8, which would
    hide NaN as black pixels) hold NaN or infinite values; `source` names the checkpoint files
    that made them."""
    finite = torch.isfinite(samples.detach())
    if bool(finite.all()):
        return
    bad = int((~finite).flatten(1).any(1).sum())
    raise NonFiniteSamples(
        f"Sampling round {r} came out with NaN or infinite values in {bad} of {len(samples)} "
        f"samples ({source}), so the run stopped: nothing of this round was saved or scored "
        "(the rounds saved before it are kept); check the checkpoints and the sampler settings "
        "(too few steps, too large a step size).")


def _write_failure(path: Path, error: OSError, safe: str) -> ReportableError:
    """A failed write of a sample file as one sentence: which file, why, and what is safe."""
    import errno

    if error.errno == errno.ENOSPC:
        reason = "the disk is full"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "permission denied"
    else:
        reason = _one_line(error.strerror or (error.args[0] if error.args else "")
                           or type(error).__name__)
    return ReportableError(f"Cannot write {path}: {reason}; {safe}, so free space (or fix the "
                           "folder) and run the same command again to go on from there.")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


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
    its rounds. `image_shape` (H, W, C) is checked on the samples read back, and with it a count
    whose samples would not fit on disk or in memory is refused first (`check_space`, naming
    `count_name`). Nothing here grows with `total` but the samples themselves.
    """

    def __init__(self, folder: str | os.PathLike, total: int, batch: int,
                 seed_of_round: Callable[[int], int], settings: Mapping[str, Any],
                 output: str | os.PathLike | None = None,
                 image_shape: tuple[int, int, int] | None = None,
                 count_name: str = "the sample count"):
        if total < 1 or batch < 1:
            raise ValueError(f"Sampling needs at least one sample in rounds of at least one; "
                             f"got {total} samples in rounds of {batch}.")
        self.folder, self.total, self.batch = Path(folder), int(total), int(batch)
        self.seed_of_round = seed_of_round
        self.output = None if output is None else Path(output)
        self.image_shape = image_shape
        self.num_rounds = -(-self.total // self.batch)
        main = distributed.is_main_process()
        if image_shape is not None and main:
            check_space(self.folder, self.total, image_shape, self.output, count_name)
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
        for r in sorted(files):
            if r < self.num_rounds:
                samples = _load(files[r], self.image_shape)
                if len(samples) >= round_size(self.total, self.batch, r):
                    done[r] = samples
        return done

    def _todo(self, done: set[int]) -> Iterator[list[int]]:
        """The rounds not in `done`, in order, in lists of at most `_CHUNK` per process."""
        rounds = (r for r in range(self.num_rounds) if r not in done)
        size = _CHUNK * distributed.get_world_size()
        while chunk := list(itertools.islice(rounds, size)):
            yield chunk

    def run(self, draw: Callable[[int, int], Round]) -> Rounds:
        """Draw the rounds not on disk with `draw(r, size)` (seeded first) and return the
        samples; `draw` must return at least `size` samples."""
        main = distributed.is_main_process()
        if main:
            if self.settings is not None:
                sample_settings.record_settings(self.folder, self.settings)
            self.done = self._load_done()
        # Only the rounds on disk travel: what is left to draw follows from them on every rank.
        done = set(distributed.broadcast_from_main(sorted(self.done) if main else None))
        num_rounds = self.num_rounds
        logger.info("%d samples in %d rounds of %d into %s: %d rounds on disk, %d to draw.",
                    self.total, num_rounds, self.batch, self.folder, len(done),
                    num_rounds - len(done))

        def one_round(r: int) -> Round:
            size = round_size(self.total, self.batch, r)
            torch.manual_seed(self.seed_of_round(r))
            drawn = draw(r, size)
            if len(drawn.samples) < size:
                raise RuntimeError(f"Round {r} drew {len(drawn.samples)} samples, fewer than "
                                   f"the {size} it needs.")
            return drawn

        def keep(r: int, drawn: Round) -> None:
            path = round_path(self.folder, r)
            try:
                atomic_numpy_save(path, samples=drawn.samples)
            except OSError as error:
                raise _write_failure(path, error, f"the {len(self.done)} rounds already in "
                                     f"{self.folder} are complete and safe") from error
            self.done[r] = drawn.samples
            note = f" ({drawn.note})" if drawn.note else ""
            logger.info("Sampling round %d/%d saved to %s%s.", r + 1, num_rounds, path, note)

        drawn_rounds: list[tuple[int, Any]] = []
        for chunk in self._todo(done):
            results = distributed.map_rounds(chunk, one_round, on_result=keep)
            if results is not None:
                drawn_rounds += [(r, drawn.info) for r, drawn in zip(chunk, results)]
        if not main:
            return Rounds(None, [])
        samples = np.concatenate([self.done[r] for r in range(num_rounds)])[:self.total]
        if self.output is not None:
            try:
                atomic_numpy_save(self.output, samples=samples)
            except OSError as error:
                raise _write_failure(self.output, error, f"all {num_rounds} rounds are complete "
                                     f"and safe in {self.folder} (nothing is drawn again)") \
                    from error
        return Rounds(samples, drawn_rounds)
