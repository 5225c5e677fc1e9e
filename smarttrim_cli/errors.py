"""User-facing errors: the CLI prints these as one line and exits non-zero, never a traceback."""


class SmartTrimError(Exception):
    """A mistake in the user's input (bad file, bad option); message names the file and the problem."""

    exit_code = 2


class ValidationFailed(SmartTrimError):
    """A check the user asked for did not pass (tolerance, speed-up gate)."""

    exit_code = 1
