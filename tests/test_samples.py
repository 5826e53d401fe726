"""Generation samples (eval / demo): greedy at temperature 0, seeded sampling, the repetition penalty."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from budgetune.config import builtin_config, load_config
from budgetune.evaluate import generate_samples


def _model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=128)
    return AutoModelForCausalLM.from_config(config)


def test_temperature_zero_is_greedy_and_sampling_is_seeded(tokenizer):
    model = _model(tokenizer)
    prompts = ["def ", "import os\n"]
    enc = tokenizer("def ", return_tensors="pt")
    greedy = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generate_samples(model, tokenizer, prompts, 12, "cpu")[0] == tokenizer.decode(greedy[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    state = torch.random.get_rng_state()
    a = generate_samples(model, tokenizer, prompts, 12, "cpu", temperature=1.0, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert a == generate_samples(model, tokenizer, prompts, 12, "cpu", temperature=1.0, seed=3)
    assert a != generate_samples(model, tokenizer, prompts, 12, "cpu", temperature=1.0, seed=4)


def test_repetition_penalty_breaks_a_loop(tokenizer):
    model = _model(tokenizer)
    # a model whose logits ignore the input: greedy output is one token repeated
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.linspace(5.0, 1.0, len(tokenizer)))
        head.bias[tokenizer.convert_tokens_to_ids("a")] = 10.0
        head.bias[tokenizer.eos_token_id] = -100.0
    model.lm_head = head
    looping = generate_samples(model, tokenizer, ["x"], 16, "cpu")
    penalised = generate_samples(model, tokenizer, ["x"], 16, "cpu", repetition_penalty=1e4)
    assert set(looping[0]) == {"a"}
    assert len(set(penalised[0])) == len(penalised[0]) > 4  # no character twice


def test_demo_samples_are_sampled_with_a_penalty():
    cfg = load_config(builtin_config("demo"))
    assert cfg.eval.temperature > 0 and cfg.eval.repetition_penalty > 1 and len(cfg.eval.prompts) >= 3
