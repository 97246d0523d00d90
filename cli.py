"""Command-line support for the entry scripts: one-sentence errors, flag parsing and checks.

Only entry scripts (`main.py`, `subspace_sample.py`, `subspace_inpainting.py`, `demo.py`,
`compute_dataset_stats.py`, the analysis command lines) import this module; library code takes
explicit, already parsed arguments. Importing it loads neither torch nor absl.

Every failure the user can fix is reported by `run_entry_point` as one line
`error: <sentence>` on stderr (rank 0 only under torchrun) with exit status 1, never a traceback;
SUBSPACE_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from errors import ReportableError


class UsageError(ValueError):
    """Bad command-line input."""


# What `run_entry_point` reports as a sentence; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError, ReportableError)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_sentence(error: OSError) -> str:
    """An OSError as a sentence: what failed, on which file, and what to do."""
    # Errors raised by the project carry their own sentence as the only argument.
    if error.errno is None and error.args:
        return str(error.args[0])
    filename = error.filename if error.filename is not None else None
    where = f" ({filename})" if filename is not None else ""
    if error.errno == errno.ENOSPC:
        return (f"The disk is full{where}: free some space (earlier complete outputs and "
                "checkpoints are intact) and run again.")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Permission denied{where}: choose a location you can write to."
    reason = error.strerror or type(error).__name__
    return f"{reason}{where}."


def error_sentence(error: BaseException) -> str:
    """The one-line message `run_entry_point` prints for a user error.

    Project errors carry a sentence as their first argument. An OSError from the system becomes
    its strerror and file name (disk full and permission problems say what to do); a KeyError
    whose argument is a bare key says which entry was missing.
    """
    if isinstance(error, OSError):
        message = _os_error_sentence(error)
    elif isinstance(error, KeyError):
        key = error.args[0] if error.args else None
        if isinstance(key, str) and " " in key.strip():
            message = key
        else:
            message = (f"A required entry {key!r} is missing from the input (a file of the "
                       "wrong kind?); check the files given on the command line.")
    else:
        message = str(error.args[0]) if error.args else type(error).__name__
    return _one_line(message) or type(error).__name__


def is_main_rank() -> bool:
    """True unless this is a non-zero rank of a torchrun launch (read from RANK)."""
    return os.environ.get("RANK", "0") == "0"


def run_entry_point(body: Callable[..., Any], *args, **kwargs) -> None:
    """Run an entry script's `body(*args, **kwargs)`, reporting user errors as one sentence.

    A ValueError (UsageError and checkpoint errors included), KeyError, OSError or
    ReportableError becomes `error: <sentence>` on stderr and exit status 1; under torchrun only
    rank 0 prints it (every rank exits with 1). SUBSPACE_DEBUG=1 re-raises instead. Under
    torchrun only rank 0 logs progress; the other ranks log warnings and errors.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not is_main_rank():
        logging.getLogger().setLevel(logging.WARNING)
    try:
        body(*args, **kwargs)
    except USER_ERRORS as error:
        if os.environ.get("SUBSPACE_DEBUG"):
            raise
        if is_main_rank():
            print(f"error: {error_sentence(error)}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# Flag values


def parse_int_list(text: str | int | Sequence, flag: str) -> tuple[int, ...]:
    """Parse a comma list of integers such as `--subspace 16,8`; `flag` names it in errors."""
    if isinstance(text, int):
        return (text,)
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(int(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise UsageError(f"{flag} must be a comma-separated list of integers; got '{text}'.") \
            from None
    if not values:
        raise UsageError(f"{flag} is empty: give at least one value.")
    return values


def parse_float_list(text: str | float | Sequence, flag: str) -> tuple[float, ...]:
    """Parse a comma list of finite numbers such as `--time 0.5,0.6`; `flag` names it in errors."""
    if isinstance(text, (int, float)):
        values: tuple[float, ...] = (float(text),)
    else:
        items = text.split(",") if isinstance(text, str) else list(text)
        try:
            values = tuple(float(str(item).strip()) for item in items if str(item).strip())
        except ValueError:
            raise UsageError(f"{flag} must be a comma-separated list of numbers; got '{text}'.") \
                from None
    if not values:
        raise UsageError(f"{flag} is empty: give at least one value.")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} must hold finite numbers; got '{text}'.")
    return values


def parse_times(text: str | float | Sequence, flag: str = "--time") -> tuple[float, ...]:
    """Cutoff times of `--time`: a comma list of numbers in [0, 1]."""
    times = parse_float_list(text, flag)
    if any(not 0.0 <= t <= 1.0 for t in times):
        raise UsageError(f"{flag} {text} must lie in [0, 1] (fractions of the diffusion time).")
    return times


def parse_sizes(text: str | int | Sequence, flag: str,
                full_size: int | None = None) -> tuple[int, ...]:
    """Subspace sizes of a flag such as `--subspace 16,8`: positive, and with `full_size` each a
    power-of-two fraction full_size / 2^k (k >= 1) of the full image side."""
    sizes = parse_int_list(text, flag)
    if any(s <= 0 for s in sizes):
        raise UsageError(f"{flag} '{text}' must list positive sizes, e.g. 16,8.")
    if full_size is not None:
        valid = []
        side = int(full_size)
        while side % 2 == 0 and side > 1:
            side //= 2
            valid.append(side)
        bad = [s for s in sizes if s not in valid]
        if bad:
            raise UsageError(
                f"{flag} {bad[0]} is not a subspace of the {full_size}x{full_size} model: valid "
                f"sizes are {', '.join(map(str, valid)) or 'none'} (the full size halved).")
    return sizes


def parse_paths(text: str, flag: str) -> list[str]:
    """A comma list of file names such as `--ckpt_subspace A.pth,B.pth` (empty items dropped)."""
    paths = [p.strip() for p in str(text or "").split(",") if p.strip()]
    if not paths:
        raise UsageError(f"{flag} is empty: give at least one file.")
    return paths


def parse_plan(subspace, time, ckpt_subspace, ckpt_full: str, full_size: int,
               flags: tuple[str, str, str, str] = ("--subspace", "--time", "--ckpt_subspace",
                                                   "--ckpt_full")
               ) -> tuple[tuple[int, ...], tuple[float, ...], list[str]]:
    """The subspace-plan flags of an entry script, checked together: sizes (`parse_sizes`),
    cutoff times (`parse_times`), one subspace checkpoint per size, and existing checkpoint
    files. `flags` names them in errors. Returns (sizes, cutoff times, subspace checkpoints)."""
    size_flag, time_flag, sub_flag, full_flag = flags
    sizes = parse_sizes(subspace, size_flag, full_size)
    times = parse_times(time, time_flag)
    ckpts = parse_paths(ckpt_subspace, sub_flag)
    if len(ckpts) != len(sizes):
        raise UsageError(f"Got {len(sizes)} subspace sizes {list(sizes)} but {len(ckpts)} "
                         f"{sub_flag} files: give one per size, same order.")
    check_checkpoint_files([ckpt_full], full_flag)
    check_checkpoint_files(ckpts, sub_flag)
    return sizes, times, ckpts


def check_range(value: float | int | None, flag: str, low: float | None = None,
                high: float | None = None, low_open: bool = False,
                high_open: bool = False) -> None:
    """Refuse a numeric flag outside [low, high] (an open end with `low_open`/`high_open`);
    None (the flag left at its unset default) passes."""
    if value is None:
        return
    bad = (not math.isfinite(float(value))
           or (low is not None and (value <= low if low_open else value < low))
           or (high is not None and (value >= high if high_open else value > high)))
    if not bad:
        return
    if low is not None and high is not None:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UsageError(f"{flag} must lie in {span}; got {value}.")
    if low is not None:
        relation = "greater than" if low_open else "at least"
        raise UsageError(f"{flag} must be {relation} {low:g}; got {value}.")
    relation = "less than" if high_open else "at most"
    raise UsageError(f"{flag} must be {relation} {high:g}; got {value}.")


# First bytes of a torch.save file: a zip archive, or (legacy format) a protocol-2 pickle.
_TORCH_HEADERS = (b"PK\x03\x04", b"\x80")


def check_checkpoint_files(paths: Sequence[str | os.PathLike], flag: str) -> None:
    """Refuse a checkpoint flag whose files do not exist, are not files, or are no torch.save
    files at all (a text file, an image), naming the first such file."""
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise UsageError(f"{flag}: no checkpoint file at {path}; check the path.")
        if not path.is_file():
            raise UsageError(f"{flag}: {path} is not a file; give a checkpoint file.")
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head and not head.startswith(_TORCH_HEADERS):
            raise UsageError(f"{flag}: {path} is not a PyTorch checkpoint (it starts with "
                             f"{head!r}, not a torch.save header); give a .pth checkpoint file.")


def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = True) -> None:
    """Refuse an output location that cannot be created or written, without creating anything.

    `path` is a folder (`is_dir`) or a file whose folder must be writable. The nearest existing
    ancestor must be a writable folder and no existing component may be a file in the way.
    """
    path = Path(path)
    folder = path if is_dir else path.parent
    if not is_dir and path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name.")
    probe = folder if str(folder) else Path(".")
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, not a folder; choose another "
                         "location.")
    try:  # a real probe: permission bits do not tell root, /proc or read-only mounts apart
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
    except OSError as error:
        raise UsageError(f"{flag} {path}: cannot write in {probe} ({error.strerror}); choose a "
                         "location you can write to.") from None
    if not is_dir and path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path} exists and cannot be replaced; choose another file.")


# --------------------------------------------------------------------------------------------
# Flag parsing: absl's own parse errors as one sentence too


def _flag_error_sentence(error: Exception) -> str:
    """absl's flag-parsing error as one sentence."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    required = [line.split("=", 1)[0].removeprefix("flag ") for line in lines
                if line.endswith("must have a value other than None.")]
    if required and len(required) == len(lines):
        return f"Give the required flag{'s' if len(required) > 1 else ''} {', '.join(required)}."
    text = " ".join(lines) or type(error).__name__
    if "Unknown command line flag" in text:
        return f"{text}; run with --helpfull to list the flags."
    return text if text.endswith(".") else text + "."


def _config_flag_file(values, name: str, argv: list[str]) -> str | None:
    """The file a config flag `--NAME` names on the command line (the last one given, as absl
    takes it), else its default."""
    given = None
    for index, arg in enumerate(argv):
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                given = arg[len(prefix):]
        if arg in (f"--{name}", f"-{name}") and index + 1 < len(argv):
            given = argv[index + 1]
    if given is not None:
        return given
    default = getattr(values[name], "default_as_str", None)
    return default.strip("'\"") if default and default != "None" else None


def _unknown_config_field(config, path: str) -> str | None:
    """Why the dotted field `path` of an override is not in `config` (a ConfigDict), with the
    nearest field names; None when it is there."""
    import difflib

    holder, walked = config, []
    for part in path.split("."):
        key = part.split("[", 1)[0]
        where = "config" + "".join(f".{w}" for w in walked)
        if not hasattr(holder, "keys") or not callable(holder.keys):
            return (f"{where} is a {type(holder).__name__} value ({holder!r}), not a section, "
                    f"so it has no field '{key}'.")
        fields = [str(k) for k in holder.keys()]
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
            if close:
                fixed = ".".join([*walked, close[0], *path.split(".")[len(walked) + 1:]])
                return f"{where} has no field '{key}': did you mean --config.{fixed}?"
            return f"{where} has no field '{key}'; its fields are {', '.join(sorted(fields))}."
        holder, walked = holder[key], [*walked, key]
    return None


def _override_problem(name: str, filename: str | None, argv: Sequence[str]) -> str | None:
    """The sentence for the first `--NAME.FIELD` override of `argv` that names no field of the
    config file `filename`; None when every override names a field (or the file is at fault)."""
    from ml_collections.config_flags import config_flags

    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    overrides = [m.group(1) for m in map(pattern.match, argv) if m]
    if not overrides or not filename:
        return None
    try:
        config = config_flags.ConfigFileFlagParser(name).parse(filename)
    except Exception:  # noqa: BLE001 - the config file itself is at fault: absl says why
        return None
    for path in overrides:
        problem = _unknown_config_field(config, path)
        if problem:
            return f"--{name}.{path}: {problem}"
    return None


def _config_override_sentence(values, argv: list[str]) -> str | None:
    """One sentence for the first `--config.FIELD` override of `argv` that names no field of
    the loaded config (with the nearest spelling); None when no override is at fault."""
    from ml_collections.config_flags import config_flags

    for name in [n for n in values
                 if isinstance(values[n].parser, config_flags.ConfigFileFlagParser)]:
        problem = _override_problem(name, _config_flag_file(values, name, argv), argv)
        if problem:
            return problem
    return None


def define_config_file(name: str, default: str | None, help_string: str) -> None:
    """`config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)` for an
    entry script. A config flag with a default applies the command line's `--NAME.FIELD`
    overrides as it is defined; a misspelt field there is one line `error: ...` (with the
    nearest field name) and exit status 1, as it is in `parse_flags`."""
    from ml_collections.config_flags import config_flags

    try:
        config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        argv = sys.argv
        named = [a for a in argv if a.startswith((f"--{name}=", f"-{name}="))
                 or a in (f"--{name}", f"-{name}")]
        sentence = None if named else _override_problem(name, default, argv)
        if sentence is None:
            raise
        fail(sentence)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for `app.run(..., flags_parser=parse_flags)`: a bad flag value, a
    missing required flag or an unloadable --config file is one line `error: ...`, exit 1."""
    from absl import flags

    values = flags.FLAGS

    def check_file(name: str, filename: str) -> None:
        if filename and not Path(filename.split(":")[0]).is_file():
            fail(f"--{name} {filename}: no such config file; give the path of a config file "
                  "such as configs/ve/cifar10_ncsnpp_continuous.py.")

    if "config" in values:  # a missing file would fail while the overrides are applied
        named = [a for a in argv if a.startswith(("--config=", "-config="))
                 or a in ("--config", "-config")]
        if named:
            check_file("config", _config_flag_file(values, "config", argv) or "")
    try:
        remaining = values(argv)
    except flags.Error as error:
        fail(_config_override_sentence(values, argv) or _flag_error_sentence(error))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        # ml_collections applies `--config.a.b` overrides while absl parses, and raises these
        # for a field the config does not have (a misspelling, most often).
        sentence = _config_override_sentence(values, argv)
        if sentence is None:
            raise
        fail(sentence)
    for name in ("config",):  # config files load lazily; make a load failure a flag error
        if name not in values or not values[name].present:
            continue
        filename = getattr(values[name], "config_filename", None) or ""
        check_file(name, filename)
        try:
            getattr(values, name)
        except Exception as error:  # noqa: BLE001 - ml_collections raises assorted types
            fail(f"--{name} {filename} cannot be loaded: {_one_line(str(error))}")
    return remaining


def fail(sentence: str) -> None:
    """Print `error: <sentence>` (rank 0) and exit with status 1."""
    if is_main_rank():
        print(f"error: {_one_line(sentence)}", file=sys.stderr)
    sys.exit(1)


def start(main: Callable[[list[str]], Any]) -> None:
    """`absl.app.run(main)` with one-line flag errors (the entry scripts' `__main__`)."""
    from absl import app

    app.run(main, flags_parser=parse_flags)
