"""The engine's bad-input error: flags, checkpoints and run folders."""

from common import InputError


class UsageError(InputError):
    """Bad input from the user (flags, files, checkpoints), with a message that names the fix."""
