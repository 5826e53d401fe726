"""Model loading: local folders through the real hub-loading path, scratch presets, architectures."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.config import load_config
from budgetune.errors import ConfigError
from budgetune.models import PRESETS, model_config
from budgetune.train import train

from helpers import tiny_config, write_chat_jsonl


@pytest.fixture(scope="module")
def local_model(tmp_path_factory, tokenizer):
    """A 'pretrained' model folder as the hub would give it: config, safetensors, tokenizer."""
    folder = tmp_path_factory.mktemp("hub") / "tiny-llama"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_a_local_pretrained_folder(tmp_path, local_model, method):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    cfg = tiny_config(tmp_path, data, model={"init": "pretrained", "name": str(local_model), "preset": None},
                      tokenizer={"train_vocab_size": 0}, method={"name": method}, budget={"steps": 8}, optim={"lr": 1e-2})
    summary = train(cfg, quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    if method == "lora":
        import json

        adapter = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(local_model)


def test_pickle_only_checkpoints_are_refused(tmp_path, local_model):
    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(local_model)
    model.save_pretrained(folder, safe_serialization=False)
    (folder / "model.safetensors").unlink(missing_ok=True)
    cfg = tiny_config(tmp_path, write_chat_jsonl(tmp_path / "c.jsonl"), model={"init": "pretrained", "name": str(folder), "preset": None},
                      tokenizer={"train_vocab_size": 0, "name": str(local_model)})
    with pytest.raises(ConfigError, match="could not be loaded"):
        train(cfg, quiet=True)


@pytest.mark.parametrize("preset", ["qwen2-test", "gpt-neox-test"])
def test_other_architectures_train_with_lora_and_gradient_checkpointing(tmp_path, preset):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    summary = train(tiny_config(tmp_path, data, model={"preset": preset, "gradient_checkpointing": True},
                                method={"name": "lora", "r": 4}, budget={"steps": 6}, optim={"lr": 1e-2}), quiet=True)
    assert summary["steps"] == 6 and summary["eval_loss_after"] < summary["eval_loss_before"]


def test_flops_budget_governs(tmp_path):
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    summary = train(tiny_config(tmp_path, data, budget={"steps": None, "flops": 2e9}), quiet=True)
    assert summary["governing_budget"] == "flops"
    assert 2e9 <= summary["flops"] < 2e9 + 4 * 64 * summary["flops_per_token"]


def test_scratch_config_follows_arch_overrides():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = None, 0, 0

        def __len__(self):
            return 500

    cfg = load_config({"model": {"init": "scratch", "preset": "llama-tiny", "arch": {"hidden_size": 96}},
                       "data": {"train": ["x"]}, "budget": {"steps": 1}})
    config = model_config(cfg, Tok())
    assert config.hidden_size == 96 and config.head_dim == 96 // PRESETS["llama-tiny"]["num_attention_heads"]
    assert config.vocab_size == 500
    bad = load_config({"model": {"init": "scratch", "preset": "llama-tiny", "arch": {"hiden_size": 96}},
                       "data": {"train": ["x"]}, "budget": {"steps": 1}})
    with pytest.raises(ConfigError, match="model.arch.hiden_size"):
        model_config(bad, Tok())
