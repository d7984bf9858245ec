"""The one error type for bad training data."""


class DataError(ValueError):
    """Input data that cannot be used; the message starts with where (`file:line:` or `file:row N:`)."""
