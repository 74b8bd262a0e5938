"""One exception for bad input: the scripts print its message as one line and exit with 2."""


class UsageError(ValueError):
    """Bad input from the user (flags, files, checkpoints), with a message that names the fix."""
