"""Errors a user can cause.

Everything raised as `RelayError` is a mistake in the user's input (a config value, a file, a
flag): the CLI prints its message on one line and exits with status 2. Anything else that
escapes is a bug and keeps its traceback.
"""


class RelayError(Exception):
    """A user-caused error whose message names the field or file and what would be valid."""


class ConfigError(RelayError, ValueError):
    """An invalid configuration value (also a ValueError, as callers of configs expect)."""
