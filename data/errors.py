"""The one error type for bad data, so entry points can print its line and exit 2."""


class DataError(ValueError):
    """Missing, corrupt or inconsistent data; the message is one line naming it and the fix."""
