"""`budgetune demo chat` end to end with a tiny budget (one optimizer step, four held-out
questions; the time budget raised so the step budget governs even on a busy machine): it runs,
prints base and tuned answers side by side, and reports its figures."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_chat_end_to_end(smollm2_gguf, tmp_path, monkeypatch, capsys):
    import sys

    from budgetune.cli import main
    from budgetune.demo import demo_chat  # noqa: F401  (loads the module)

    demo_module = sys.modules["budgetune.demo"]  # the package exports the function under the same name

    monkeypatch.setattr(demo_module, "CHAT_HELDOUT", 4)
    monkeypatch.setattr(demo_module, "CHAT_SHOWN", 2)
    monkeypatch.setattr(demo_module, "CHAT_ANSWER_TOKENS", 12)  # generation is most of this test's time
    out_dir = tmp_path / "demo-chat"
    assert main(["demo", "chat", "--budget.steps", "1", "--budget.time", "30m", "--train.micro_batch", "1", "--train.grad_accum", "1", "--output.dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert text.count("base:") == 2 and text.count("tuned:") == 2 and text.count("docstring:") == 2
    assert "format accuracy" in text and "held-out loss" in text
    assert (out_dir / "model" / "adapter_config.json").is_file()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 1
