"""The data layer's errors (torch-free, so planning a sweep can catch them)."""


class DataError(ValueError):
    """Input data is missing or malformed. The message names the file and the fix."""


class CacheError(DataError):
    """A cache directory does not match its manifest. The message names it and the fix."""
