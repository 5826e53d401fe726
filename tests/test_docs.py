"""The docs cannot drift: the config reference is generated, and the files and config keys the
docs name exist."""

import re
from pathlib import Path

import pytest

from budgetune.config import load_config
from budgetune.config_reference import render

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_config_reference_is_generated_from_the_config_classes():
    assert (ROOT / "docs" / "config.md").read_text() == render() + "\n", \
        "docs/config.md is stale: python -m budgetune.config_reference > docs/config.md"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_example_files_the_docs_name_exist(page):
    for path in re.findall(r"(examples/[\w./-]+\.(?:yaml|json))", page.read_text()):
        assert (ROOT / path).exists(), f"{page.name} names {path}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_dotted_config_keys_in_the_docs_are_real(page):
    reference = render()
    sections = ("model", "tokenizer", "data", "optim", "schedule", "budget", "train", "eval", "checkpoint", "plan", "output", "method",
                "objective", "tune")
    for key in set(re.findall(r"`-{0,2}((?:%s)\.\w+)(?![.\w])" % "|".join(sections), page.read_text())):
        if key.endswith(".py"):
            continue
        assert f"`{key}`" in reference, f"{page.name} names config key {key}, which does not exist"


def test_the_example_configs_load():
    for path in (ROOT / "examples").glob("*.yaml"):
        load_config(path)
