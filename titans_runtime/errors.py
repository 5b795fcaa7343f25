"""User-facing errors: each one is printed as a single clear line by the CLIs (no traceback)."""
from __future__ import annotations

import sys


class TitansError(Exception):
    """Base class of errors caused by the user's input (files, configs, plans, ids)."""


class ConfigError(TitansError):
    """A config file or value is wrong; the message names the key."""


class InputError(TitansError):
    """An input stream, checkpoint or argument is unusable; the message names it."""


class PlanError(TitansError):
    """A memory plan does not fit its budget."""


def report_error(exc: TitansError) -> int:
    """Print a user-facing error the CLIs' way and return their exit code (2): one `error:` line on stderr;
    a multi-line message (e.g. a plan table) puts its details on stdout and its last line on stderr."""
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) > 1:
        print("\n".join(lines[:-1]), file=sys.stdout)
    print(f"error: {lines[-1]}", file=sys.stderr)
    return 2
