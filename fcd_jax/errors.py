"""The exceptions users see as one line (``main.py`` prints them without a stack trace)."""


class FcdError(Exception):
    """A problem with the user's input (data, checkpoint, config) whose message names the fix."""


class DataError(FcdError):
    """Missing, unreadable or inconsistent images, masks or datasets."""


class CheckpointError(FcdError):
    """A checkpoint that cannot be read, or does not fit the configured model."""


class TrainingError(FcdError):
    """Training went wrong in a way the user must act on (e.g. a NaN loss)."""


class ConfigError(FcdError, ValueError):
    """A config value that cannot work (unknown name, impossible size)."""


class WorkdirError(FcdError):
    """A workdir or output folder that cannot be used: in use by another run, not writable, full."""
