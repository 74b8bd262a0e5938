"""What the command-line scripts share: a parser whose errors are one line, and the one place
where a bad-input error becomes that line and exit code 2."""

import argparse
import sys

from .errors import InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a flag error is one line on stderr (`prog: error: ... (see --help)`)
    instead of the usage block followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
