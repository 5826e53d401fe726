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


# `budgetune demo chat` and tests/real: "what does function X of module Y do?" answered in one
# fixed, checkable form, learned from the standard library's own docstrings.
API_QUESTIONS = ("What does {func} in the {module} module do?", "What does the function {func} of {module} do?",
                 "In Python's {module} module, what does {func} do?")


def stdlib_api_answers(max_sentence: int = 150, max_signature: int = 50) -> list[dict]:
    """Public module-level functions of the standard library's top-level modules that have a
    docstring: [{module, func, signature, sentence, answer}], in a stable order.

    answer = "`module.func(signature)` — first docstring sentence."""
    import re

    out = []
    for path in sorted(stdlib_dir().glob("*.py")):
        module = path.stem
        if module.startswith("_") or module.startswith("test") or module == "this":
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (test data)
        seen = set()
        for node in tree.body:  # module level only: methods need their class to be asked about
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_") or node.name in seen:
                continue
            seen.add(node.name)
            doc = ast.get_docstring(node)
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            match = re.match(r"(.+?\.)(?=\s+[A-Z(`]|$)", first)
            sentence = match.group(1) if match else ""
            if sentence.endswith(("e.g.", "i.e.", "etc.")):
                continue
            signature = ast.unparse(node.args)
            if not (15 <= len(sentence) <= max_sentence) or len(signature) > max_signature or not sentence[0].isupper():
                continue
            answer = f"`{module}.{node.name}({signature})` — {sentence}"
            out.append({"module": module, "func": node.name, "signature": signature, "sentence": sentence, "answer": answer})
    return out


def api_question(item: dict, variant: int = 0) -> str:
    return API_QUESTIONS[variant % len(API_QUESTIONS)].format(func=item["func"], module=item["module"])


def api_format_ok(item: dict, text: str) -> bool:
    """Is `text` an answer in the learned form, naming the right function?"""
    import re

    pattern = rf"`{re.escape(item['module'])}\.{re.escape(item['func'])}\([^`]*\)` — \S.*"
    return re.fullmatch(pattern, text.strip(), flags=re.S) is not None


def stdlib_api_chat(folder: Path, heldout: int = 40, limit: int = 0, seed: int = 0) -> tuple[Path, Path, list[dict]]:
    """Write train.jsonl and eval.jsonl of {"messages": [user question, assistant answer]}; the
    held-out functions (a seeded sample of `heldout`) appear in no training question.
    Returns (train file, eval file, held-out items)."""
    import random

    items = stdlib_api_answers()
    random.Random(seed).shuffle(items)
    held, train = items[:heldout], items[heldout:]
    if limit:
        train = train[:limit]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, part in (("train.jsonl", train), ("eval.jsonl", held)):
        path = folder / name
        with open(path, "w", encoding="utf-8") as handle:
            for i, item in enumerate(part):
                messages = [{"role": "user", "content": api_question(item, i)}, {"role": "assistant", "content": item["answer"]}]
                handle.write(json.dumps({"messages": messages}) + "\n")
        files.append(path)
    return files[0], files[1], held
