"""User-facing errors: bad config or bad data. The CLI prints them as one line and exits 2."""


class BudgetuneError(Exception):
    """An error the user can fix; the message says where (file, line or key) and what to do."""

    exit_code = 2


class ConfigError(BudgetuneError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(BudgetuneError):
    """A data file cannot be read or does not have the expected format."""
