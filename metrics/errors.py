"""The one exception type the metrics package raises for bad input."""


class MetricsError(ValueError):
    """Bad input to an FID evaluation; the message is one line naming the problem and the fix."""


def one_line(error):
    """An exception's message collapsed onto one line, for embedding in a MetricsError."""
    return " ".join(str(error).split()) or type(error).__name__
