"""The metrics layer's bad-input error."""

from common import InputError


class MetricsError(InputError):
    """Bad input to an FID evaluation; the message is one line naming the problem and the fix."""
