"""Corpora that are already on every machine: the Python standard library's sources.

`stdlib_chat` turns documented stdlib functions into a chat-format instruction set
(docstring → function), used by the benchmarks and handy for trying fine-tuning offline.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_chat(out: Path, limit: int = 2000, max_chars: int = 3000) -> Path:
    """Write up to `limit` {"messages": [...]} lines: user gives a docstring, assistant the function."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out, "w", encoding="utf-8") as handle:
        for path in sorted(stdlib_dir().glob("*.py")):
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few stdlib files are deliberately invalid (test data): skip them
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                doc = ast.get_docstring(node)
                code = ast.get_source_segment(source, node)
                if not doc or not code or len(code) > max_chars or len(doc) < 20:
                    continue
                messages = [
                    {"role": "system", "content": "You write Python functions from their documentation."},
                    {"role": "user", "content": f"Write `{node.name}` ({path.stem}):\n{doc}"},
                    {"role": "assistant", "content": code},
                ]
                handle.write(json.dumps({"messages": messages}) + "\n")
                count += 1
                if count >= limit:
                    return out
    return out
