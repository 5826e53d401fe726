"""docs/config.md, generated from the config classes so it cannot drift from them.

    python -m budgetune.config_reference > docs/config.md

Every key of every section with its type, default and the comment beside it in the source;
then each method's own `method.*` options (each method module's Options class). A test
checks that docs/config.md equals this output.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from .config import Config

_FIELD = re.compile(r"^\s+(\w+):\s*[^=#]+?(?:=\s*[^#]*)?(?:#\s*(.*))?$")


def _comments(cls) -> dict[str, str]:
    """The `# comment` after each field of a dataclass, read from its source."""
    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD.match(line)
        if match and match.group(2):
            out[match.group(1)] = match.group(2).strip()
    return out


def _type_name(hint) -> str:
    text = str(hint).replace("typing.", "")
    text = re.sub(r"<class '(\w+)'>", r"\1", text).replace("NoneType", "null").replace("None", "null")
    text = re.sub(r"^Optional\[(.*)\]$", r"\1 | null", text).replace("budgetune.config.", "")
    return text.replace("|", "\\|")  # a bare | would split the markdown table cell


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    return ("null" if value is None else repr(value)).replace("|", "\\|")


def _rows(cls, prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    hints, comments = typing.get_type_hints(cls), _comments(cls)
    rows = []
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        text = comments.get(field.name, "").replace("|", "\\|")
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):  # a nested section (data.select): its own keys
            rows.append(f"| `{prefix}{field.name}` | mapping | | {text} |")
            rows += _rows(hint, f"{prefix}{field.name}.")
            continue
        rows.append(f"| `{prefix}{field.name}` | `{_type_name(hint)}` | `{_default(field)}` | {text} |")
        entries = [a for a in typing.get_args(typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint)
                   if dataclasses.is_dataclass(a)]
        for entry in entries:  # list entries that may be mappings (data.train sources)
            rows += _rows(entry, f"{prefix}{field.name}[].")
    return rows


def render() -> str:
    from .methods import METHODS

    lines = ["# Config reference", "",
             "Generated from the config classes by `python -m budgetune.config_reference` (a test keeps it in",
             "step). Any key can be set in the YAML file (`section: {key: value}`) or on the command line",
             "(`--section.key value`). Units: durations `90s`/`10m`/`2h`/`1h30m`, counts `5M`/`2e9`, sizes `24GB`.", ""]
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        cls = hints[field.name]
        if field.name == "method":
            continue
        if not dataclasses.is_dataclass(cls):
            lines += [f"## `{field.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|",
                      f"| `{field.name}` | `{_type_name(cls)}` | `{_default(field)}` | {_comments(Config).get(field.name, '')} |", ""]
            continue
        doc = (inspect.getdoc(cls) or "").splitlines()
        lines += [f"## `{field.name}`", ""]
        if doc and not doc[0].startswith(cls.__name__ + "("):
            lines += [doc[0], ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|", *_rows(cls, f"{field.name}."), ""]
    lines += ["## `method`", "", "`method.name` picks the method (`method: lora` is short for `method: {name: lora}`);",
              "the other `method.*` keys are that method's own options.", ""]
    for name in sorted(METHODS):
        options = METHODS[name].Options
        rows = _rows(options, "method.", skip=("name",))
        lines += [f"### `method.name: {name}`", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""] if rows else ["No options.", ""]
    return "\n".join(lines)




if __name__ == "__main__":
    print(render())
