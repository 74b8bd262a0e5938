"""The data layer's bad-input error."""

from common import InputError


class DataError(InputError):
    """Missing, corrupt or inconsistent data; the message is one line naming it and the fix."""
