"""The one family of errors siftune raises on purpose.

Every message says what was wrong and what to do about it. Code that catches
``SiftError`` catches everything siftune raises deliberately; anything else
escaping is a bug.
"""


class SiftError(Exception):
    """Base class of every error siftune raises on purpose."""


class ConfigError(SiftError, ValueError):
    """A configuration field, CLI flag or argument has an invalid value."""


class TargetError(SiftError, ValueError):
    """The target/dense module patterns do not match the model as expected."""


class IncrementError(SiftError, ValueError):
    """An increment file is missing, corrupt, or does not fit the base model."""


class DataError(SiftError, ValueError):
    """A dataset file or built-in dataset cannot be read or has bad rows."""


class ModelLoadError(SiftError, ValueError):
    """A model name or path cannot be resolved or loaded offline."""


class CheckpointError(SiftError, ValueError):
    """A training checkpoint is missing, corrupt, or does not match the run resuming from it."""


class WriteError(SiftError, OSError):
    """An output file cannot be written (disk full, read-only folder, permission denied)."""


class DistributedError(SiftError, RuntimeError):
    """A collective failed or timed out: another process of the job failed or stopped responding."""


class NonFiniteGradientError(SiftError, FloatingPointError):
    """The gradient of a step held NaN or Inf and the policy is ``"raise"``."""
