"""What the command-line scripts share: a parser whose errors are one line, and the one place
where a bad-input error becomes that line and exit code 2."""

import argparse
import sys
from dataclasses import fields

from .errors import InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a flag error is one line on stderr (`prog: error: ... (see --help)`)
    instead of the usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def from_flags(config_class, args: argparse.Namespace, **given):
    """An instance of the dataclass `config_class` from the parsed flags of the same names
    (those `args` has); `given` sets the other fields and overrides flags."""
    flags = {f.name: getattr(args, f.name) for f in fields(config_class) if hasattr(args, f.name)}
    return config_class(**{**flags, **given})


def error_line(error: BaseException) -> str:
    """The one line a user sees for `error`. An error re-raised from a DataLoader worker
    carries the worker's traceback in its message; its last line is the error itself."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(error).__name__


def report(error: InputError) -> int:
    """Print `error` as one line on stderr; returns the exit code, 2."""
    print(f"error: {error_line(error)}", file=sys.stderr)
    return 2
