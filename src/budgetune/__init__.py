"""budgetune: train the best causal language model your budget allows."""

from .config import Config, load_config
from .errors import BudgetuneError, ConfigError, DataError

__version__ = "0.1.0"


def train(config=None, overrides=None, **kwargs):
    """Train within the budget; see budgetune.train.train."""
    from .train import train as _train

    return _train(config, overrides, **kwargs)


def demo(overrides=None, **kwargs):
    from .demo import demo as _demo

    return _demo(overrides, **kwargs)


def evaluate(run_dir, **kwargs):
    from .evaluate import evaluate as _evaluate

    return _evaluate(run_dir, **kwargs)


def export(run_dir, merge=False, **kwargs):
    from .export import export as _export

    return _export(run_dir, merge=merge, **kwargs)


__all__ = ["Config", "load_config", "train", "demo", "evaluate", "export", "BudgetuneError", "ConfigError", "DataError"]
