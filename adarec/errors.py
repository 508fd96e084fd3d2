"""Errors that end a run with one clear message instead of a traceback.

The CLI catches AdarecError, prints its message and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class AdarecError(Exception):
    """A problem the user can fix (bad file, bad config, bad request)."""


class DataError(AdarecError):
    """A data file is missing, malformed or unusable; the message names the file (and line)."""


class ConfigError(AdarecError):
    """A config file or override is invalid; the message lists what would be valid."""


class BackendError(ConfigError, RuntimeError):
    """kernels.backend (or ADAREC_KERNELS) asks for a fused op that cannot run here."""


class UnknownBackend(ConfigError, ValueError):
    """kernels.backend (or ADAREC_KERNELS) is not one of the backend names."""
