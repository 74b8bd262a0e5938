"""The base class of every bad-input error. Each layer raises its own subclass (UsageError,
ConfigError, DataError, CodecError, MetricsError), and each script catches InputError once:
its message goes to stderr as one line and the script exits with code 2."""

import pickle
import re


class InputError(ValueError):
    """Bad input from the user (flags, files, checkpoints), with a one-line message that names
    the fix."""


def one_line(error: BaseException) -> str:
    """An exception's message collapsed onto one line, for embedding in an InputError."""
    return " ".join(str(error).split()) or type(error).__name__


def safe_load_failure(error: BaseException) -> str:
    """Why `torch.load(weights_only=True)` could not read a file, in one line. torch's own text
    for a refused pickle advises weights_only=False, which would run any code the file carries,
    and for other bytes names its unpickler's internals: neither is passed on."""
    if isinstance(error, OSError):  # the file could not be read at all (permissions, I/O)
        return one_line(error)
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if isinstance(error, pickle.UnpicklingError) and refused:
        return f"it holds a pickled {refused.group(1)}, which torch does not load safely"
    return "not a file torch can load safely (weights_only=True): not saved by torch, or damaged"
