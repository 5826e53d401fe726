"""QLoRA (model.quantize) and LoftQ on tiny random-init and tiny trained models, on the CPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

pytest.importorskip("bitsandbytes")

from budgetune.config import load_config  # noqa: E402
from budgetune.errors import ConfigError  # noqa: E402
from budgetune.methods import METHODS, get_method  # noqa: E402
from budgetune.train import train  # noqa: E402

from helpers import interrupted_and_uninterrupted, tiny_config, write_chat_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_chat_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", n=80)


def _bnb_layers(model):
    import bitsandbytes as bnb

    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, chat):
    """One QLoRA (NF4 + LoRA) run from scratch; the quantised base seen before and after training."""
    tmp = tmp_path_factory.mktemp("qlora")
    seen = {}
    lora = get_method("lora")
    real_prepare = lora.prepare

    def spy(model, opts):
        seen["before"] = {n: m.weight.detach().clone() for n, m in _bnb_layers(model).items()}
        seen["model"] = real_prepare(model, opts)
        return seen["model"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora, "prepare", spy)
        summary = train(tiny_config(tmp, chat, model={"init": "scratch", "preset": "llama-test", "quantize": "nf4"},
                                    method={"name": "lora", "r": 8}, budget={"steps": 20}), quiet=True)
    return tmp / "run", summary, seen


def test_qlora_trains_with_the_base_quantised_and_frozen(qlora_run):
    run, summary, seen = qlora_run
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2
    before = seen["before"]
    assert len(before) == 2 * 7  # every linear of both decoder layers; the LM head is not quantised
    after = _bnb_layers(seen["model"])
    for name, weight in before.items():
        layer = after["base_model.model." + name + ".base_layer"]
        assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
        assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested  # double quantisation
        assert torch.equal(layer.weight, weight)  # the base did not move
    head = seen["model"].get_base_model().lm_head
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    # the saved base of a scratch run is the quantised base
    saved = json.loads((run / "base" / "config.json").read_text())
    assert saved["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # parameters counted at their real size, not the packed uint8 size
    assert summary["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_config(seen["model"].config).parameters()) \
        + summary["trainable_parameters"]
    assert summary["predicted"]["memory_terms_mb"]["weights"] > 0


@pytest.mark.slow
def test_qlora_resume_is_exact(tmp_path, chat, monkeypatch):
    straight, resumed = interrupted_and_uninterrupted(
        tmp_path, chat, monkeypatch, model={"init": "scratch", "preset": "llama-test", "quantize": "nf4"},
        method={"name": "lora", "r": 4}, budget={"steps": 8}, checkpoint={"every": 0.5})
    assert straight and straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)


def test_qlora_export_adapter_and_merged(qlora_run):
    from peft import PeftModel

    from budgetune.evaluate import load_trained
    from budgetune.export import export

    run = qlora_run[0]
    trained, _, _ = load_trained(run)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained(input_ids=x).logits

    adapter = export(run)
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])  # quantised, as its config says
    assert _bnb_layers(base)
    from budgetune.quantize import finish

    loaded = PeftModel.from_pretrained(finish(base), str(adapter))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, reference, rtol=0, atol=0)

    merged = export(run, merge=True)
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(str(merged))
    assert not _bnb_layers(plain) and all(p.dtype == torch.float32 for p in plain.parameters())
    with torch.no_grad():
        out = plain(input_ids=x).logits
    # dequantised base + folded adapter: the trained forward up to fp32 rounding
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_other_quantisations_train(tmp_path, chat, quantize):
    summary = train(tiny_config(tmp_path, chat, model={"init": "scratch", "preset": "llama-test", "quantize": quantize},
                                method={"name": "lora", "r": 8}, budget={"steps": 12}), quiet=True)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def _quantized_tiny(tmp_path, chat, method: dict, quantize="nf4"):
    from budgetune.models import load_model, load_tokenizer

    cfg = load_config(tiny_config(tmp_path, chat, model={"init": "scratch", "preset": "llama-test", "quantize": quantize}, method=method))
    tokenizer = load_tokenizer(cfg, log=lambda m: None)
    return cfg, load_model(cfg, tokenizer, torch.device("cpu"), frozen_base=True)


@pytest.mark.parametrize("name", ["rslora", "dora", "loraplus", "adalora", "ia3", "vera", "miss"])
def test_every_quantized_base_method_gets_gradients_only_in_its_adapter(tmp_path, chat, name):
    assert METHODS[name].quantized_base
    cfg, model = _quantized_tiny(tmp_path, chat, {"name": name})
    model = get_method(name).prepare(model, cfg.method)
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=x, labels=x).loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(not m.weight.requires_grad for m in _bnb_layers(model).values())


@pytest.mark.parametrize("method, words", [
    ({"name": "full"}, "full fine-tuning"),
    ({"name": "freeze"}, "freeze-tuning"),
    ({"name": "lisa"}, "LISA"),
    ({"name": "pissa"}, "PiSSA"),
    ({"name": "tied-lora"}, "tied-LoRA"),
])
def test_methods_that_cannot_run_on_a_quantised_base_are_refused(tmp_path, chat, method, words):
    with pytest.raises(ConfigError, match=words):
        load_config(tiny_config(tmp_path, chat, model={"init": "scratch", "preset": "llama-test", "quantize": "nf4"}, method=method))


@pytest.mark.slow
def test_bad_quantize_config_exits_2_and_writes_nothing(tmp_path, chat):
    for i, (model, method, words) in enumerate([
        ({"quantize": "nf4"}, {"name": "full"}, "full fine-tuning"),
        ({"quantize": "nf3"}, {"name": "lora"}, "model.quantize"),
        ({}, {"name": "lora", "init": "loftq"}, "loftq"),
    ]):
        folder = tmp_path / str(i)
        cfg = tiny_config(folder, chat, model={"init": "scratch", "preset": "llama-test", **model}, method=method)
        (path := tmp_path / f"{i}.yaml").write_text(yaml.safe_dump(cfg))
        done = subprocess.run([sys.executable, "-m", "budgetune", "train", str(path)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert words in done.stderr and "Traceback" not in done.stderr
        assert not (folder / "run").exists()


@pytest.mark.slow
def test_loftq_starts_closer_to_the_full_precision_model(tmp_path, chat):
    """A briefly trained tiny model, quantised to NF4: the LoftQ adapter at step 0 brings the
    quantised model closer to the full-precision one than plain QLoRA init (B = 0)."""
    from budgetune.evaluate import heldout_loss
    from budgetune.models import load_model, load_tokenizer
    from budgetune.data import prepare_data

    trained = tmp_path / "fp"
    train(tiny_config(trained, chat, method={"name": "full"}, budget={"steps": 30}), quiet=True)
    source = trained / "run" / "model"
    full = AutoModelForCausalLM.from_pretrained(str(source))

    def quantized(init: str):
        cfg = load_config(tiny_config(tmp_path / init, chat, model={"init": "pretrained", "name": str(source), "quantize": "nf4"},
                                      tokenizer={"name": str(source), "train_vocab_size": 0}, method={"name": "lora", "r": 16, "init": init}))
        tokenizer = load_tokenizer(cfg, log=lambda m: None)
        model = get_method("lora").prepare(load_model(cfg, tokenizer, torch.device("cpu"), frozen_base=True), cfg.method)
        return cfg, tokenizer, model

    cfg, tokenizer, plain = quantized("default")
    _, _, loftq = quantized("loftq")
    rows = prepare_data(cfg, tokenizer, seed=0, log=lambda m: None).eval

    def loss(model):
        return heldout_loss(model, rows, 4, 4096, torch.device("cpu"))

    x = torch.tensor([rows.batch([i])["input_ids"][0].tolist() for i in range(min(4, len(rows)))])
    with torch.no_grad():
        ref = full(input_ids=x).logits
        err = {name: (m(input_ids=x).logits - ref).pow(2).mean().sqrt().item() for name, m in (("plain", plain), ("loftq", loftq))}
    gap = {name: abs(loss(m) - loss(full)) for name, m in (("plain", plain), ("loftq", loftq))}
    assert err["loftq"] < 0.8 * err["plain"], err
    assert gap["loftq"] < gap["plain"], gap
    assert all(math.isfinite(v) for v in gap.values())
