"""User-facing errors: bad config or bad data. The CLI prints them as one line and exits 2."""


class BudgetuneError(Exception):
    """An error the user can fix; the message says where (file, line or key) and what to do."""

    exit_code = 2


class ConfigError(BudgetuneError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(BudgetuneError):
    """A data file cannot be read or does not have the expected format."""


class RunStopped(BudgetuneError):
    """The run stopped part-way and left a checkpoint to resume from (its folder is kept)."""


class Interrupted(RunStopped):
    """SIGINT / SIGTERM: a checkpoint was written; `train --resume` continues."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "killed by signal N"


class TrainingError(RunStopped):
    """Training cannot go on (non-finite losses that persist, out of memory at micro-batch 1)."""

    exit_code = 3
