"""Export round trips: what budgetune writes loads unchanged in transformers and peft."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from budgetune.errors import BudgetuneError
from budgetune.evaluate import evaluate, load_trained
from budgetune.export import export
from budgetune.train import train

from helpers import tiny_config, write_chat_jsonl


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_adapter_and_merged_export(tmp_path, chat_data):
    summary = train(tiny_config(tmp_path, chat_data, method={"name": "lora", "r": 4}, budget={"steps": 6}, optim={"lr": 1e-2}), quiet=True)
    assert summary["trainable_parameters"] < summary["parameters"] / 5
    run = tmp_path / "run"
    trained, tokenizer, _ = load_trained(run)
    ids = torch.tensor([tokenizer("What is 3 plus 4?")["input_ids"]])
    expected = _logits(trained, ids)

    adapter_dir = export(run)
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(run / "base")
    adapter = PeftModel.from_pretrained(base, adapter_dir)
    torch.testing.assert_close(_logits(adapter, ids), expected)
    # the adapter changed the model: logits differ from the bare base
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(run / "base"), ids), expected)

    merged_dir = export(run, merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-5)
    assert AutoTokenizer.from_pretrained(merged_dir)("What is 3 plus 4?")["input_ids"] == ids[0].tolist()

    with pytest.raises(BudgetuneError, match="already exists"):
        export(run, merge=True)


def test_full_export_and_eval(tmp_path, chat_data):
    train(tiny_config(tmp_path, chat_data, budget={"steps": 4}, eval={"prompts": ["What is 1 plus 2?"], "sample_tokens": 5}), quiet=True)
    run = tmp_path / "run"
    out = export(run, out=tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(out)
    trained, tokenizer, _ = load_trained(run)
    ids = torch.tensor([tokenizer("What is 3 plus 4?")["input_ids"]])
    torch.testing.assert_close(_logits(model, ids), _logits(trained, ids))

    result = evaluate(run)
    summary_loss = __import__("json").loads((run / "summary.json").read_text())["eval_loss_after"]
    assert result["eval_loss"] == pytest.approx(summary_loss, rel=1e-4)
    assert result["perplexity"] == pytest.approx(__import__("math").exp(result["eval_loss"]))
    assert len(result["samples"]) == 1 and result["samples"][0]["prompt"] == "What is 1 plus 2?"
