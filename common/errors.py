"""The base class of every bad-input error. Each layer raises its own subclass (UsageError,
ConfigError, DataError, CodecError, MetricsError), and each script catches InputError once:
its message goes to stderr as one line and the script exits with code 2."""


class InputError(ValueError):
    """Bad input from the user (flags, files, checkpoints), with a one-line message that names
    the fix."""


def one_line(error: BaseException) -> str:
    """An exception's message collapsed onto one line, for embedding in an InputError."""
    return " ".join(str(error).split()) or type(error).__name__
