"""budgetune: train the best causal language model your budget allows.

The commands are functions here: `train`, `tune`, `plan`, `evaluate`, `export`, `demo`, `report`, `fetch`. They are
imported eagerly on purpose: a submodule imported after the package would otherwise
replace the function of the same name (`budgetune.train` the function, not the module).
"""

from .config import Config, load_config
from .demo import demo
from .errors import BudgetuneError, ConfigError, DataError
from .evaluate import evaluate
from .export import export
from .models import fetch
from .plan.search import make_plan as plan
from .report import report
from .tune import train_or_race as train  # one run, or the race first when tune.fraction is set (tune.py)
from .tune import tune

__version__ = "0.1.0"

__all__ = ["Config", "load_config", "train", "tune", "plan", "demo", "evaluate", "export", "report", "fetch", "BudgetuneError", "ConfigError", "DataError"]
