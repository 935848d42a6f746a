"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class KdpipeError(Exception):
    """Bad input or a refused operation; the message says what is wrong and what to do."""


class ConfigError(KdpipeError):
    """One or more configuration values are invalid; the message lists every problem."""


class CacheMismatchError(KdpipeError):
    """A cache or run was made with settings that differ from the ones asked for."""


class CorruptCacheError(KdpipeError):
    """A file does not match what the manifest says about it."""
