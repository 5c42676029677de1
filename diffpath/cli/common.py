"""What every ``diffpath`` command shares: its one-line error, its warnings, kept work."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CLIError", "DefaultsHelp", "check_sigma", "cli_warnings", "report_kept_work"]


class CLIError(Exception):
    """An error to report in one line."""


class DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Help with every option's default appended (unless it has none, or names it already) and the
    description and epilog printed as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default is argparse.SUPPRESS or not action.option_strings:
            return text
        value = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        if "default" in text or f"({value})" in text:
            return text
        return f"{text} (default: {value})".lstrip()


def check_sigma(sigma: float | None) -> None:
    """One-line error unless ``--smooth-sigma`` is unset or a finite number of pixels, 0 or more."""
    if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
        raise CLIError(f"--smooth-sigma must be a finite number of pixels, 0 or more, got {sigma}")


@contextmanager
def cli_warnings() -> Iterator[None]:
    """Show warnings (skipped files, the GMM grid shrinking...) as one ``diffpath: warning:`` line."""
    from diffpath.data.files import ImageSkippedWarning

    def show(message, category, filename, lineno, file=None, line=None):
        from tqdm.auto import tqdm

        tqdm.write(f"diffpath: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter("always", ImageSkippedWarning)
        warnings.showwarning = show
        yield


def report_kept_work(wd: Path) -> None:
    """Say where an interrupted run left work that a rerun resumes from."""
    if wd.exists():
        print(f"diffpath: partial work kept in {wd}; rerun the same command to resume", file=sys.stderr)
