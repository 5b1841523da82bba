"""The library's own exceptions. Each names the file, line, key or sample at fault."""


class ReinforceLMError(Exception):
    """Base class: every error the library raises on purpose.

    `rank` is set when one process of several found it while training (its own prompts, rewards or
    samples), so the other processes may not have: the CLI then prints it from that process."""

    rank: int | None = None


class ConfigError(ReinforceLMError, ValueError):
    """A bad configuration key or value."""


class DataError(ReinforceLMError, ValueError):
    """A dataset file that cannot be read, or a row that is missing a column or is malformed."""


class RewardError(ReinforceLMError, ValueError):
    """A reward function that cannot be loaded, raises, or returns bad scores."""


class CheckpointError(ReinforceLMError):
    """A checkpoint that cannot be written or resumed."""


class TrainingError(ReinforceLMError):
    """An update that cannot be taken: a non-finite gradient norm."""
