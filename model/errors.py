"""Errors a user can cause.

Everything raised as `RelayError` is a mistake in the user's input (a config value, a file, a
flag): the CLI prints its message on one line and exits with status 2. A stage of a run that
stops on anything else raises `StageFailed`: one line on the terminal, exit status 1, the
traceback in the run's log. Anything else that escapes is a bug and keeps its traceback.
"""


class RelayError(Exception):
    """A user-caused error whose message names the field or file and what would be valid."""


class ConfigError(RelayError, ValueError):
    """An invalid configuration value (also a ValueError, as callers of configs expect)."""


class StageFailed(Exception):
    """A run's stage stopped on an error that is not the user's (a bug, a lost node, damaged
    data): `message` is the one line for the terminal, `log` the file with the whole story."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message, log)
        self.message, self.log = message, log

    def __str__(self) -> str:
        return self.message
