"""Errors that the command line reports as one clear line instead of a traceback."""


class BrainDDPMError(Exception):
    """An expected failure: bad input, bad config, missing file. The message says what and where."""


class ConfigError(BrainDDPMError):
    """A configuration value is wrong; the message names the key."""


class BadInputError(BrainDDPMError):
    """An input file cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class CheckpointError(BrainDDPMError):
    """A checkpoint or model file cannot be used: corrupt, unsafe, or from an incompatible run."""
