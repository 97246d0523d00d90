"""The project's error for failures that are not bugs (a diverged run, a full disk).

`cli.run_entry_point` prints any `ReportableError` as one sentence and exits with status 1;
library code raises it without knowing about the command line. It lives in a module of its own,
importing nothing, so that every layer may raise it.
"""
from __future__ import annotations


class ReportableError(RuntimeError):
    """A failure that is not a bug, reported to the user as one sentence (e.g. a diverged run)."""
