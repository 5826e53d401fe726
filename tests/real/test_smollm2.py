"""LoRA fine-tuning of the real SmolLM2-135M-Instruct (from its GGUF file) for a few steps.

One module-scoped run (seq_len 256, 3 steps of one row) is shared by the asserts: the model's own chat
template renders the data, the loss mask is exactly the assistant tokens under the real
tokenizer, held-out loss falls, and the adapter and merged exports load with plain
transformers/peft and generate (GGUF → train → export → reload).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from budgetune.data.corpora import stdlib_api_chat
from budgetune.data.formats import DEFAULT_CHAT_TEMPLATE, ChatFormat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(smollm2_gguf, tmp_path_factory):
    import sys

    from budgetune.config import load_config
    from budgetune.train import train

    train_module = sys.modules["budgetune.train"]  # the package exports the function under the same name

    tmp = tmp_path_factory.mktemp("smollm2")
    train_file, eval_file, held = stdlib_api_chat(tmp / "data", heldout=8, limit=48)
    cfg = load_config({
        "model": {"name": str(smollm2_gguf)},  # the .gguf file itself
        "data": {"train": [str(train_file)], "eval": [str(eval_file)], "seq_len": 256},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "optim": {"lr": 2e-3},
        "schedule": {"name": "constant", "warmup": 0.0},
        "budget": {"steps": 3},
        "train": {"micro_batch": 1, "grad_accum": 1},
        "eval": {"every": None, "max_tokens": 4096},
        "checkpoint": {"every": None},
        "plan": {"auto": False},
        "output": {"dir": str(tmp / "run"), "report": False},
    })
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "say", lambda message, *a, **k: lines.append(str(message)))
        summary = train(cfg)
    return {"summary": summary, "cfg": cfg, "log": lines, "held": held, "train_file": train_file, "tmp": tmp}


def _conversations(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def test_the_models_own_chat_template_renders_the_data(run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run["summary"]["run_dir"] + "/model"))
    assert tokenizer.chat_template and tokenizer.chat_template != DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(_conversations(run["train_file"], 1)[0]["messages"], tokenize=False)
    # SmolLM2's template adds its own system turn when the conversation has none
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert not any("ChatML template" in line or "has none" in line for line in run["log"]), run["log"]


def test_loss_mask_is_exactly_the_assistant_tokens(run):
    from budgetune.models import load_tokenizer

    tokenizer = load_tokenizer(run["cfg"], log=lambda m: None)
    records = _conversations(run["train_file"], 6)
    # and a multi-turn conversation with a system turn: two assistant spans
    records.append({"messages": [{"role": "system", "content": "Answer tersely."},
                                 {"role": "user", "content": "What does len do?"},
                                 {"role": "assistant", "content": "`builtins.len(obj)` — Return the number of items."},
                                 {"role": "user", "content": "And abs?"},
                                 {"role": "assistant", "content": "`builtins.abs(x)` — Return the absolute value."}]})
    encoded = ChatFormat.encode(records, [f"r{i}" for i in range(len(records))], tokenizer, run["cfg"].data)
    for record, (ids, mask) in zip(records, encoded):
        ids, mask = np.asarray(ids), np.asarray(mask)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        spans = [tokenizer.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
        wanted = [m["content"] + "<|im_end|>\n" for m in record["messages"] if m["role"] == "assistant"]
        assert spans == wanted
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(record["messages"], tokenize=False)


def test_heldout_loss_falls(run):
    s = run["summary"]
    assert s["steps"] == 3
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.05, (s["eval_loss_before"], s["eval_loss_after"])


def test_exports_load_with_plain_transformers_and_peft_and_generate(run):
    """GGUF → train → export (adapter and merged) → reload: the adapter on its base and the
    merged model compute the same function, one the base did not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budgetune.export import export

    run_dir = run["summary"]["run_dir"]
    adapter_dir, merged_dir = export(run_dir), export(run_dir, merge=True)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does dumps in the json module do?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        base_logits = base(prompt).logits
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        adapter_logits = adapted(prompt).logits
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
        merged_logits = merged(prompt).logits
    assert torch.allclose(adapter_logits, merged_logits, atol=1e-3, rtol=0)
    assert (merged_logits - base_logits).abs().max() > 0.1  # training changed the function
    for model in (adapted, merged):
        out = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
        text = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
        assert len(text.strip()) > 0
