"""User-facing errors: each one is printed as a single clear line by the CLIs (no traceback)."""
from __future__ import annotations


class TitansError(Exception):
    """Base class of errors caused by the user's input (files, configs, plans, ids)."""


class ConfigError(TitansError):
    """A config file or value is wrong; the message names the key."""


class InputError(TitansError):
    """An input stream, checkpoint or argument is unusable; the message names it."""


class PlanError(TitansError):
    """A memory plan does not fit its budget."""
