"""The settings that made a resumable sample file, recorded beside it and checked on resume.

A sample file (or folder of sampling rounds) grows over several runs: an interrupted run resumes,
a finished one is extended with a larger sample count. Both are only sound when every run draws
from the same distribution with the same seeds, so the first run writes a JSON sidecar
`NAME.settings.json` (config digest, plan, checkpoints with their sha256, sampler, seed, batch
size) and every later run must present identical settings. The sample count is deliberately not
part of the settings. Used by the round sampler (`sample_rounds`), so `--mode eval`,
`eval_subspace` and `subspace_sample.py` record and check the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from files import atomic_write_text

# Config entries that do not change what is sampled: where it runs, and the evaluation switches
# and counts (the sample count may grow between runs).
_IGNORED_CONFIG = ("device",)
_EVAL_KEPT = ("batch_size",)


class SettingsMismatchError(ValueError):
    """A resumed or extended sample file was made with other settings than this run's."""


def settings_path(samples: str | os.PathLike) -> Path:
    """The sidecar of a sample file `D/NAME.npy` or a rounds folder `D/NAME`:
    `D/NAME.settings.json`."""
    samples = Path(samples)
    name = samples.name[:-4] if samples.name.endswith(".npy") else samples.name
    return samples.with_name(f"{name}.settings.json")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_entries(paths: Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """[{path, sha256}] of checkpoint files, for the settings record."""
    return [{"path": str(p), "sha256": file_sha256(p)} for p in paths]


def _plain(value: Any) -> Any:
    """`value` as JSON types (tuples become lists, unknown objects their str)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_digest(config) -> str:
    """sha256 of the config entries that change what is sampled (all but the device and the
    evaluation switches and counts, of which only eval.batch_size is kept)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {k: v for k, v in raw.items() if k not in _IGNORED_CONFIG}
    if isinstance(kept.get("eval"), Mapping):
        kept["eval"] = {k: v for k, v in kept["eval"].items() if k in _EVAL_KEPT}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def settings_problem(samples: str | os.PathLike, settings: Mapping[str, Any],
                     exists: bool) -> str | None:
    """Why samples at `samples` may not be resumed or extended with `settings`, or None.

    `exists` says whether samples are already there. Existing samples need a sidecar with equal
    settings; the sentence names the first differing entries and what to do.
    """
    if not exists:
        return None
    path = settings_path(samples)
    hint = "choose another name for the output or delete the old samples"
    if not path.is_file():
        return (f"{samples} already holds samples but no record of the settings that made them "
                f"({path} is missing), so they cannot be resumed or extended safely: {hint}.")
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"The settings record {path} is unreadable: {hint}."
    before, now = _leaves(recorded), _leaves(_plain(dict(settings)))
    differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not differing:
        return None
    # Each differing value in full (a checkpoint's sha256 included), never cut short.
    shown = "; ".join(f"{k} was {_text(before.get(k, _ABSENT))}, now {_text(now.get(k, _ABSENT))}"
                      for k in differing[:_SHOWN])
    more = f" (+{len(differing) - _SHOWN} more)" if len(differing) > _SHOWN else ""
    return (f"{samples} was made with other settings ({shown}{more}); resuming would mix two "
            f"experiments in one file: {hint}.")


# How many differing entries a refusal names, and how an entry missing on one side reads.
_SHOWN = 4
_ABSENT = object()


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested record as {dotted key: leaf value} (lists are leaves)."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    if not value and prefix:
        return {prefix: value}
    leaves: dict[str, Any] = {}
    for key, item in value.items():
        leaves.update(_leaves(item, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def _text(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, sort_keys=True)


def check_settings(samples: str | os.PathLike, settings: Mapping[str, Any], exists: bool) -> None:
    """Raise `SettingsMismatchError` when `settings_problem` finds one."""
    problem = settings_problem(samples, settings, exists)
    if problem:
        raise SettingsMismatchError(problem)


def record_settings(samples: str | os.PathLike, settings: Mapping[str, Any]) -> Path:
    """Write the sidecar of `samples` atomically and return its path."""
    path = settings_path(samples)
    atomic_write_text(path, json.dumps(_plain(dict(settings)), indent=2, sort_keys=True) + "\n")
    return path
