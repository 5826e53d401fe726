"""The planner: candidates respect pins, recipes that do not fit are dropped with a reason,
training uses the top plan, and `budgetune plan` works on a 7B config with no weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from budgetune.config import load_config
from budgetune.plan.search import apply_plan, candidate_recipes, make_plan
from budgetune.train import train

from helpers import tiny_config, write_text_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_candidates_respect_what_the_user_pinned(tmp_path):
    import torch

    cpu = torch.device("cpu")
    open_cfg = load_config({"model": {"init": "scratch", "preset": "llama-test"}, "data": {"train": ["x"]},
                            "budget": {"steps": 1}, "train": {"grad_accum": 2}})
    recipes = candidate_recipes(open_cfg, cpu)
    assert {r.method for r in recipes} == {"full", "lora"}
    assert {r.gradient_checkpointing for r in recipes} == {False, True}
    assert all(r.micro_batch * r.grad_accum == 16 for r in recipes)  # tokens per step are kept
    pinned = load_config(open_cfg, {"method": {"name": "lora"}, "train": {"micro_batch": 4}, "model": {"gradient_checkpointing": True}})
    recipes = candidate_recipes(pinned, cpu)
    assert all(r.method == "lora" and r.micro_batch == 4 and r.gradient_checkpointing for r in recipes)
    assert sorted(recipes, key=lambda r: r.quantize is not None)[0].quantize is None  # (QLoRA is the only open dimension left)
    no_qlora = candidate_recipes(load_config(pinned, {"model": {"quantize": None}}), cpu)
    assert len(no_qlora) == 1 and no_qlora[0].quantize is None


def test_plan_drops_what_does_not_fit_and_says_why(tmp_path):
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    cfg = load_config(tiny_config(tmp_path, corpus, budget={"steps": 5, "memory": "1MB"}))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.best is None
    assert all(not c.fits and "needs" in c.why_not for c in plan.candidates)
    roomy = make_plan(load_config(cfg, {"budget": {"memory": "8GB", "time": "60s"}}), probe_steps=0, log=lambda m: None)
    assert roomy.best is not None and roomy.best.recipe.method == "full"
    assert roomy.best.tokens_in_budget == pytest.approx(roomy.best.tokens_per_s * 60)


def test_trainable_parameter_cap_selects_lora(tmp_path):
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    cfg = load_config(tiny_config(tmp_path, corpus, budget={"steps": 3, "trainable": 40000}))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.best.recipe.method == "lora"
    assert any(c.recipe.method == "full" and "trainable" in c.why_not for c in plan.candidates)
    planned = apply_plan(cfg, plan)
    assert planned.method.name == "lora"
    summary = train(cfg, quiet=True)
    assert summary["method"] == "lora" and summary["trainable_parameters"] <= 40000
    assert summary["predicted"]["peak_memory_mb"] > 0 and summary["predicted"]["tokens_per_s"] > 0


def test_probe_calibrates_speed(tmp_path):
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    cfg = load_config(tiny_config(tmp_path, corpus, budget={"steps": 3, "time": "30s"}))
    plan = make_plan(cfg, probe_steps=1, log=lambda m: None)
    assert plan.best.probed and plan.best.tokens_per_s > 0


def test_plan_command_on_a_7b_config_without_weights():
    done = subprocess.run([sys.executable, "-m", "budgetune", "plan", str(EXAMPLES / "plan-7b-24gb.yaml"), "--json", "--no-probe"],
                          capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    full = [c for c in plan["candidates"] if c["recipe"]["method"] == "full"]
    assert full and not any(c["fits"] for c in full)
    assert all("needs" in c["why_not"] for c in full)
    assert plan["best"]["recipe"]["method"] == "lora"
    assert plan["best"]["peak_memory_bytes"] <= 24e9
    # full fine-tuning of ~6.7B parameters: fp32 weights alone are ~27 GB
    assert max(c["memory_terms"]["weights"] for c in full) > 24e9


def test_plan_command_on_the_demo_config_proposes_a_scratch_model():
    done = subprocess.run([sys.executable, "-m", "budgetune", "plan", "demo", "--json", "--no-probe"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["best"]["recipe"]["method"] == "full"  # pinned by the demo config
    assert plan["best"]["tokens_in_budget"] > 0 and plan["unique_tokens_estimate"] > 1e6
    scratch = plan["scratch"]
    assert scratch["params"] > 0 and scratch["lr"] > 0 and len(scratch["reasoning"]) >= 3


def test_planner_reads_world_size_and_zero_stage_from_the_launcher(monkeypatch):
    from budgetune.config import load_config
    from budgetune.plan.memory import estimate_memory
    from budgetune.plan.search import distributed_setup, recipe_from_config

    cfg = load_config({"data": {"train": ["x"]}, "budget": {"steps": 1}, "model": {"init": "scratch", "preset": "llama-small"},
                       "tokenizer": {"train_vocab_size": 32000}})
    assert distributed_setup(cfg) == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert distributed_setup(cfg) == (4, 3)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert distributed_setup(cfg) == (4, 2)
    pinned = load_config(cfg, {"plan": {"world_size": 8, "zero_stage": 1}})
    assert distributed_setup(pinned) == (8, 1)

    # ZeRO-3 over 4 processes holds a quarter of the weights and optimizer states of one
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    from budgetune.plan.search import plan_model_config

    config = plan_model_config(cfg)
    one = estimate_memory(config, recipe_from_config(load_config(cfg, {"plan": {"world_size": 1, "zero_stage": 0}}), torch.device("cpu")))
    four = estimate_memory(config, recipe_from_config(load_config(cfg, {"plan": {"world_size": 4, "zero_stage": 3}}), torch.device("cpu")))
    assert four.terms["optimizer_states"] == one.terms["optimizer_states"] // 4
    assert four.terms["weights"] == one.terms["weights"] // 4
