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
    cfg = load_config(tiny_config(tmp_path, corpus, budget={"steps": 5, "trainable": 40000}))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.best.recipe.method == "lora"
    assert any(c.recipe.method == "full" and "trainable" in c.why_not for c in plan.candidates)
    planned = apply_plan(cfg, plan)
    assert planned.method.name == "lora"
    summary = train(cfg, quiet=True)
    assert summary["method"] == "lora" and summary["trainable_parameters"] <= 40000
    assert summary["predicted"]["peak_memory_mb"] > 0 and summary["predicted"]["tokens_per_s"] > 0
    # each tokens/s number says what it is: the planner's guess, and the run's own calibration (steps 2-4)
    assert summary["predicted"]["tokens_per_s_basis"] == "device guess, uncalibrated"
    assert summary["predicted"]["tokens_per_s_calibrated"] > 0
    assert summary["predicted"]["tokens_per_s_calibrated_from"] == "median of steps 2–4"


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


# --------------------------------------------------------------------------- the batch for the budget


def test_batch_rule_on_hand_computed_cases():
    from budgetune.budget import Budget
    from budgetune.plan.batch import batch_tokens_for, choose_batch
    from budgetune.plan.scaling import scratch_lr as step_law_lr  # the planner's LR from scratch: Step Law's, capped

    assert batch_tokens_for(1e6, scratch=True) == pytest.approx(0.58 * 10 ** (6 * 0.571))  # 1,546.8
    assert batch_tokens_for(1e6, scratch=True) == pytest.approx(1546.8, rel=1e-3)
    assert batch_tokens_for(100, scratch=True) == 256  # a floor: a step of a handful of tokens is noise
    # fine-tuning: a third of Step Law's constant (the batch sweeps of docs/benchmarks.md)
    assert batch_tokens_for(1e6, scratch=False) == pytest.approx(0.19 * 10 ** (6 * 0.571))  # 506.7
    assert batch_tokens_for(1e6, scratch=False) == pytest.approx(506.7, rel=1e-3)
    assert batch_tokens_for(1e5, scratch=False) == 256  # 136 tokens → the floor
    assert step_law_lr(1e9, 1e10) == pytest.approx(1.79 * 1e9**-0.713 * 1e10**0.307)  # 5.5e-4: the law as published
    assert step_law_lr(1e6, 1e6) == 1.5e-3  # the law says 6.56e-3 for a 1M-parameter model: capped
    # a token budget: D is the budget
    choice = choose_batch(Budget(tokens=1e6), None, 6e6, seq_len=512, world=1, scratch=True)
    assert choice.tokens_in_budget == 1e6 and choice.rows_per_step == 3  # 1,547 / 512 → 3 rows
    # a time budget: D = 90% of the time at the predicted speed (150 s × 4,000 tokens/s → 540k tokens)
    choice = choose_batch(Budget(time_s=150), 4000.0, 6e6, seq_len=512, world=1, scratch=True,
                          non_embedding_params=1e6, choose_lr=True)
    assert choice.tokens_in_budget == pytest.approx(540_000)
    assert choice.batch_tokens == int(0.58 * 540_000 ** 0.571)  # 1,087
    assert choice.rows_per_step == 2
    assert choice.lr == 1.5e-3 and choice.lr_step_law == pytest.approx(1.79 * 1e6**-0.713 * 540_000**0.307)  # 5.4e-3
    assert "peak LR 0.0015 (Step Law: 1.79·N^−0.713·D^0.307 = 0.00543, capped at 0.0015)" in choice.describe(512)
    assert "because the budget buys ~540k tokens" in choice.describe(512)
    # fine-tuning at the same budget: 0.19 · 540k^0.571 = 356 tokens → one row of 512, the LR stays optim.lr
    choice = choose_batch(Budget(time_s=150), 4000.0, 6e6, seq_len=512, world=1, scratch=False,
                          non_embedding_params=1e6, choose_lr=True)
    assert choice.batch_tokens == int(0.19 * 540_000 ** 0.571) == 356
    assert choice.rows_per_step == 1 and choice.lr is None
    assert "fine-tuning rule B = 0.19·D^0.571 = 356" in choice.describe(512)
    # ten minutes at 7,700 tokens/s (D = 4.16M): 1,140 tokens → two rows of 512 (Step Law would take seven)
    choice = choose_batch(Budget(time_s=600), 7700.0, 6e6, seq_len=512, world=1, scratch=False)
    assert choice.rows_per_step == 2
    assert choose_batch(Budget(time_s=600), 7700.0, 6e6, seq_len=512, world=1, scratch=True).rows_per_step == 7
    # the smallest of several budgets decides; two processes get whole rows each
    choice = choose_batch(Budget(time_s=150, tokens=2e5), 4000.0, 6e6, seq_len=256, world=2, scratch=True)
    assert choice.tokens_in_budget == 2e5 and choice.rows_per_step % 2 == 0
    # a step budget alone gives no D: the configured batch stays
    assert choose_batch(Budget(steps=100), 4000.0, 6e6, seq_len=256, world=1, scratch=True) is None
    # unpacked rows count their real tokens: ten minutes' 1,143 tokens are six rows holding 190 on average, not two of 512
    choice = choose_batch(Budget(time_s=600), 7700.0, 6e6, seq_len=512, world=1, scratch=False, tokens_per_row=190.0)
    assert choice.batch_tokens == int(0.19 * (0.9 * 600 * 7700) ** 0.571) == 1143 and choice.rows_per_step == 6
    assert "batch ~1.14k tokens/step (6 unpacked rows × 190 real tokens on average, of up to 512)" in choice.describe(512)


def _open_config(tmp_path, **sections):
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    cfg = tiny_config(tmp_path, corpus, **sections)
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in ("micro_batch", "grad_accum")}
    cfg["optim"] = {}
    return cfg


def test_plan_chooses_the_batch_and_lr_from_the_budget(tmp_path):
    cfg = load_config(_open_config(tmp_path, budget={"steps": None, "tokens": 20_000}))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    rows = round(max(256, 0.58 * 20_000 ** 0.571) / 64)  # seq_len 64 in tiny_config; 166 tokens → the 256-token floor
    assert plan.batch.rows_per_step == rows
    assert all(c.recipe.micro_batch * c.recipe.grad_accum == rows for c in plan.candidates)
    planned = apply_plan(cfg, plan)
    assert planned.optim.lr == pytest.approx(plan.batch.lr)  # scratch, LR left open: Step Law's LR
    assert any("because the budget buys ~20k tokens" in n for n in plan.notes)


def test_the_batch_speed_probe_times_the_step_the_rule_expects_not_the_largest_that_fits(tmp_path, monkeypatch):
    """Before choosing the batch the planner times one step; that step has the rows the rule gives at the device
    guess's speed (5 rows of 64 tokens for a 1 s budget here), not the largest micro-batch memory allows (8)."""
    from budgetune.plan import search

    cfg = load_config(_open_config(tmp_path, budget={"steps": None, "time": "1s"}))
    expected = make_plan(cfg, probe_steps=0, log=lambda m: None, measure_batch_speed=False).batch.rows_per_step  # at the guess
    largest = make_plan(load_config(_open_config(tmp_path / "s", budget={"steps": 3})), probe_steps=0,
                        log=lambda m: None).candidates[0].recipe.micro_batch  # no D: memory's choice
    timed = []
    real = search._calibrate
    monkeypatch.setattr(search, "_calibrate", lambda config, cands, *a, **k: timed.extend(c.recipe.micro_batch for c in cands)
                        or real(config, cands, *a, **k))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert timed == [expected] and expected < largest
    assert plan.measured_tokens_per_s and plan.batch.tokens_in_budget == pytest.approx(0.9 * plan.measured_tokens_per_s)


def test_pinned_batch_lr_and_micro_batch_stay(tmp_path):
    base = _open_config(tmp_path, budget={"steps": None, "tokens": 20_000})
    cfg = load_config(base, {"train": {"batch_tokens": 512}, "optim": {"lr": 1e-3}})
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.batch is None and all(c.recipe.micro_batch * c.recipe.grad_accum == 8 for c in plan.candidates)
    assert apply_plan(cfg, plan).optim.lr == 1e-3
    # a pinned micro-batch is a memory detail: accumulation fills the chosen batch
    cfg = load_config(base, {"train": {"micro_batch": 2}})
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert {(c.recipe.micro_batch, c.recipe.grad_accum) for c in plan.candidates} == {(2, max(1, round(plan.batch.rows_per_step / 2)))}
    # grad_accum pinned: rows per step = micro_batch × grad_accum, as before
    cfg = load_config(base, {"train": {"grad_accum": 2}})
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.batch is None and all(c.recipe.micro_batch * c.recipe.grad_accum == 16 for c in plan.candidates)


def test_an_adapter_method_trains_at_a_larger_lr_unless_the_lr_is_pinned(tmp_path):
    from budgetune.plan.batch import ADAPTER_LR_SCALE

    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    open_lr = tiny_config(tmp_path, corpus, budget={"steps": 2})
    del open_lr["optim"]["lr"]  # left open: the default 3e-4 is the base
    cfg = load_config(open_lr, {"method": {"name": "lora"}})
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert apply_plan(cfg, plan).optim.lr == pytest.approx(ADAPTER_LR_SCALE * 3e-4)
    assert f"peak LR {ADAPTER_LR_SCALE * 3e-4:.3g}: lora is an adapter method, trained at {ADAPTER_LR_SCALE:g}× the base LR 0.0003 (pin optim.lr to choose it)" in plan.notes
    summary = train(cfg, quiet=True)  # what the run trains at, and what its folder records
    assert summary["recipe"]["lr"] == pytest.approx(ADAPTER_LR_SCALE * 3e-4)
    assert load_config(Path(summary["run_dir"]) / "config.yaml").optim.lr == pytest.approx(ADAPTER_LR_SCALE * 3e-4)
    pinned = load_config(cfg, {"optim": {"lr": 1e-3}})
    assert apply_plan(pinned, make_plan(pinned, probe_steps=0, log=lambda m: None)).optim.lr == 1e-3
    full = load_config(open_lr, {"method": {"name": "full"}})
    plan = make_plan(full, probe_steps=0, log=lambda m: None)
    assert apply_plan(full, plan).optim.lr == 3e-4 and not any("adapter method" in n for n in plan.notes)


def test_plan_table_fits_80_columns_uncut():
    """Wide values (long method names, 64×64, GiB, 100k+ tok/s, billions) in a piped 80-column console."""
    import io

    from rich.console import Console

    from budgetune.console import print_plan
    from budgetune.plan.memory import MemoryEstimate
    from budgetune.plan.recipe import Recipe
    from budgetune.plan.search import Candidate, Plan

    def candidate(method, mb, ga, mem, tps, fits=True):
        c = Candidate(Recipe(method=method, micro_batch=mb, grad_accum=ga, gradient_checkpointing=mb > 8),
                      MemoryEstimate({"weights": mem // 2, "activations": mem - mem // 2}), 123_456_789, 6e9, tps, fits=fits,
                      why_not="" if fits else "needs 99 GiB > 20 GiB (largest term: weights 50 GiB)", probed=tps > 1e5)
        c.tokens_in_budget, c.epochs = tps * 36_000, 123.45
        return c

    cands = [candidate("loraplus", 64, 64, 123 * 2**30, 123_456.7), candidate("adalora", 1, 512, 999 * 2**20, 9_999.0),
             candidate("full", 2, 1, 99 * 2**30, 1.0, fits=False)]
    plan = Plan("cuda", 20 * 2**30, cands, 1e9)
    buffer = io.StringIO()
    print_plan(plan, out=Console(file=buffer, width=80, force_terminal=False, highlight=False))
    text = buffer.getvalue()
    table = [line for line in text.splitlines() if line.lstrip().startswith(("#", "1 ", "2 "))]
    assert len(table) == 3, text
    assert all(len(line) <= 80 for line in table) and "…" not in text, text
    for value in ("loraplus", "64×64", "123 GiB", "123,457", "4.44B", "123M", "adalora", "1×512", "999 MiB", "9,999 ≈"):
        assert value in text, (value, text)
    # prose is not hard-wrapped: each note stays one line in a log
    assert any(line.startswith("batch = micro-batch × accumulation;") and "in budget =" in line for line in text.splitlines())


def test_speed_calibration_from_the_first_steps():
    from budgetune.plan.throughput import SpeedCalibration

    speed = SpeedCalibration({"tokens_per_s": 1000.0, "tokens_per_s_basis": "device guess, uncalibrated"})
    assert [speed.record(r) for r in (100.0, 2900.0, 3100.0)] == [None, None, None]  # step 1 is warm-up
    note = speed.record(3000.0)
    assert note == "speed: 3,000 tokens/s calibrated from steps 2–4 (the planner's device guess, uncalibrated: 1,000, 3.00× that)"
    assert speed.record(5000.0) is None and speed.calibrated == 3000.0  # calibrated once
    out = speed.annotate({"tokens_per_s": 1000.0, "peak_memory_mb": 1.0})
    assert out["tokens_per_s"] == 1000.0 and out["tokens_per_s_calibrated"] == 3000.0
    assert "1,000 tokens/s predicted (device guess, uncalibrated), 3,000 calibrated" in speed.describe(3050.0)
    short = SpeedCalibration({"tokens_per_s": 10.0})
    short.record(1.0), short.record(20.0)
    assert short.annotate({"tokens_per_s": 10.0})["tokens_per_s_calibrated"] == 20.0  # a 2-step run: what there is
    assert SpeedCalibration(None).annotate(None) is None


def test_probe_times_only_warmed_up_passes():
    """Passes still getting faster are not timed: the probe reports the settled speed."""
    from budgetune.plan.throughput import WARMUP_MAX, timed_after_warmup

    def passes(durations):
        it = iter(durations)
        calls = []
        return (lambda: calls.append(1) or next(it)), calls

    one_pass, calls = passes([6.0, 3.0, 1.2, 1.15, 1.0, 0.99])  # settled at the 4th (1.15 is not 10% below 1.2)
    assert timed_after_warmup(one_pass, 2) == [1.0, 0.99] and len(calls) == 6
    one_pass, calls = passes([1.0, 1.0, 1.0, 1.0])  # warm from the start: 2 untimed passes
    assert timed_after_warmup(one_pass, 2) == [1.0, 1.0] and len(calls) == 4
    one_pass, calls = passes([2.0 ** -i for i in range(20)])  # never settles: at most WARMUP_MAX untimed
    assert timed_after_warmup(one_pass, 1) == [2.0 ** -WARMUP_MAX] and len(calls) == WARMUP_MAX + 1


def test_cpu_prediction_counts_what_glibc_keeps(monkeypatch):
    """The printed CPU number is RSS under glibc's default allocator: live tensors + the allocator term."""
    import platform

    from transformers import LlamaConfig

    from budgetune.plan.memory import ALLOCATOR_RETENTION, allocator_basis, estimate_memory, with_allocator
    from budgetune.plan.recipe import Recipe

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator term is for glibc")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    for method, ckpt in [("full", False), ("full", True), ("lora", False), ("lora", True)]:
        recipe = Recipe(method=method, micro_batch=4, seq_len=128, gradient_checkpointing=ckpt)
        live = estimate_memory(config, recipe, "cpu")
        held = with_allocator(live, recipe, "cpu")
        transient = live.sizes["activations"] + live.sizes["attention_mask"] + live.sizes["logits_loss"]
        assert held.terms["allocator"] == int(ALLOCATOR_RETENTION[(method == "lora", ckpt)] * transient) > 0
        assert held.total == live.total + held.terms["allocator"]
        assert "glibc's allocator keeps" in allocator_basis(held)
    assert with_allocator(live, recipe, "cuda") is live  # CUDA peaks are allocated tensors
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # pinned: RSS follows the live tensors
    assert with_allocator(live, recipe, "cpu") is live and "RSS follows the tensors" in allocator_basis(live)


def test_train_prediction_names_its_memory_basis(tmp_path, monkeypatch):
    from budgetune.plan.search import plan_for_training

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    _, prediction = plan_for_training(load_config(tiny_config(tmp_path, corpus)), log=lambda m: None)
    assert prediction["memory_terms_mb"]["allocator"] > 0 and "glibc" in prediction["peak_memory_basis"]
    assert prediction["tokens_per_s_basis"] == "device guess, uncalibrated"


def test_plan_on_a_14b_config_for_a_24gib_card_fits_only_qlora():
    """A 14B model's 16-bit base alone (~27.8 GiB) is more than a 24 GiB card: no 16-bit
    recipe fits, and the plan says which bytes value it read budget.memory as."""
    cfg = load_config(EXAMPLES / "plan-14b-24gb.yaml")
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.memory_budget == 24 * 2**30
    assert any("25,769,803,776 bytes = 24.00 GiB = 25.77 GB" in note for note in plan.notes)
    sixteen_bit = [c for c in plan.candidates if c.recipe.method in ("full", "lora") and c.recipe.quantize is None]
    assert sixteen_bit and not any(c.fits for c in sixteen_bit)
    lora = min((c for c in sixteen_bit if c.recipe.method == "lora"), key=lambda c: c.memory.total)
    assert lora.memory.terms["weights"] > 24 * 2**30  # the frozen base alone does not fit
    # only a 4-bit base does (QLoRA), and the plan proposes it
    assert plan.best is not None and plan.best.recipe.method == "lora" and plan.best.recipe.quantize == "nf4"


def test_plan_says_when_budget_memory_in_gb_means_powers_of_ten(tmp_path):
    corpus = write_text_corpus(tmp_path / "c", n_files=2)
    cfg = load_config(tiny_config(tmp_path, corpus, budget={"steps": 3, "memory": "24GB"}))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None)
    assert plan.memory_budget == 24 * 10**9
    note = next(n for n in plan.notes if n.startswith("budget.memory"))
    assert "22.35 GiB = 24.00 GB" in note and "write GiB" in note


def test_time_budget_speed_counts_the_dpo_reference_forward(tmp_path, monkeypatch):
    """The speed a time budget is checked against (`measured_tokens_per_s`: does the budget buy a step,
    how many, which batch) is the probe's next-token speed slowed by the reference forward a DPO step
    with an adapter also runs — not the bare probe speed. SFT (and ORPO: no reference) keep it."""
    import sys

    from budgetune.plan.throughput import ProbeResult

    from helpers import write_preference_jsonl

    search = sys.modules["budgetune.plan.search"]  # (budgetune.plan is also a function's name on the package)
    monkeypatch.setattr(search, "probe", lambda model, recipe, fpt, steps, device, **_: ProbeResult(1000.0, 1000.0 * fpt, 0.1))
    data = write_preference_jsonl(tmp_path / "p.jsonl", n=8)
    speeds = {}
    for objective in ("dpo", "orpo"):
        cfg = load_config(tiny_config(tmp_path, data, objective={"name": objective}, method={"name": "lora", "r": 4},
                                      budget={"time": "60s"}))
        plan = make_plan(cfg, probe_steps=0, log=lambda m: None, measure_batch_speed=True)
        speeds[objective] = plan.measured_tokens_per_s
    assert speeds["orpo"] == pytest.approx(1000.0)
    # a reference forward is ~1/3 of a forward+backward step: the DPO step is slower by about that
    assert 1000.0 / 1.6 < speeds["dpo"] < 1000.0 / 1.15, speeds


def test_padded_width_is_the_mean_longest_row_of_a_micro_batch():
    """What padding makes a step compute on: the longest row of each micro-batch, on average."""
    import math
    import statistics
    from itertools import combinations

    import numpy as np

    from budgetune.plan.throughput import padded_width

    assert padded_width([10, 20, 30], 2) == 27  # the pairs' longest rows: 20, 30, 30
    assert padded_width([10, 20, 30], 1) == 20  # one row: the mean row
    assert padded_width([10, 20, 30], 5) == 30  # more rows than the data: all of them
    lengths = [3, 41, 7, 7, 19, 60, 2, 33]
    assert padded_width(lengths, 3) == math.ceil(statistics.mean(max(c) for c in combinations(lengths, 3)))
    # many rows (no overflow): the sampler's own micro-batches, one epoch's worth, agree
    many = np.random.default_rng(0).integers(10, 500, 20_000)
    drawn = np.random.default_rng(1).permutation(many).reshape(-1, 16).max(axis=1).mean()
    assert padded_width(many, 16) == pytest.approx(drawn, rel=0.01)


def test_unpacked_row_lengths_are_the_rows_real_tokens(tmp_path, tokenizer):
    """The planner's row lengths are exactly the real tokens of the rows `build_rows(pack=False)` makes:
    chat examples (some truncated), preference pairs (some truncated), and long text (cut into rows)."""
    import numpy as np

    from budgetune.config import DataConfig
    from budgetune.data.packing import build_rows, unpacked_row_lengths
    from budgetune.data.tokenize import tokenize_files

    from helpers import write_chat_jsonl, write_preference_jsonl

    dcfg = DataConfig(train=["x"])
    cases = {"chat": write_chat_jsonl(tmp_path / "chat.jsonl", n=20), "preference": write_preference_jsonl(tmp_path / "p.jsonl", n=20),
             "text": sorted(write_text_corpus(tmp_path / "c", n_files=2).iterdir())}
    for name, files in cases.items():
        data = tokenize_files(files if isinstance(files, list) else [files], tokenizer, dcfg, tmp_path / "cache", log=lambda m: None)
        assert data.format == name
        lengths = data.lengths()
        seq_len = int(np.median(lengths))  # some examples longer, some shorter
        rows = build_rows(data, seq_len, False, 0)
        assert rows.truncated > 0 or name == "text"
        assert unpacked_row_lengths(data, seq_len).tolist() == rows.real_tokens.tolist(), name


def _short_rows_config(tmp_path, pack: bool) -> dict:
    from helpers import write_chat_jsonl

    data = write_chat_jsonl(tmp_path / "chat.jsonl", n=40)
    cfg = tiny_config(tmp_path / ("packed" if pack else "unpacked"), data, budget={"time": "60s"})
    cfg["data"].update(seq_len=512, pack=pack)
    return cfg


@pytest.mark.parametrize("pack", [False, True])
def test_probe_times_the_rows_the_run_will_see(tmp_path, monkeypatch, pack):
    """The one-step probe that sizes the batch for a time budget, on examples far shorter than
    data.seq_len: unpacked rows are timed at the data's padded width (the mean longest row of a
    micro-batch) and counted by their real tokens; packed rows stay full seq_len rows."""
    from budgetune import lm_loss
    from budgetune.models import load_tokenizer
    from budgetune.plan import throughput

    shapes, real_losses = [], lm_loss.token_losses

    def recording(model, batch, *args, **kwargs):
        shapes.append(tuple(batch["input_ids"].shape))
        return real_losses(model, batch, *args, **kwargs)

    monkeypatch.setattr(lm_loss, "token_losses", recording)
    # one real pass (its shape recorded), timed as 0.5 s: the tokens counted show in the speed
    monkeypatch.setattr(throughput, "timed_after_warmup", lambda one_pass, steps: (one_pass(), [0.5] * steps)[1])
    cfg = load_config(_short_rows_config(tmp_path, pack))
    plan = make_plan(cfg, probe_steps=0, log=lambda m: None, measure_batch_speed=True)
    (micro_batch, width), = set(shapes)
    if pack:
        assert width == 512 and plan.measured_tokens_per_s == pytest.approx(micro_batch * 512 / 0.5)
        assert plan.tokens_per_row is None
        return
    assert width < 512  # not a full row: no batch of this data is that wide
    from budgetune.data import row_lengths
    from budgetune.plan.throughput import padded_width

    lengths = row_lengths(cfg, load_tokenizer(cfg, log=lambda m: None), log=lambda m: None)
    assert lengths.max() < 200 and micro_batch > 1  # the data's rows are short; the batch pads
    assert width == padded_width(lengths, micro_batch) and lengths.mean() < width <= lengths.max()
    assert plan.measured_tokens_per_s == pytest.approx(micro_batch * lengths.mean() / 0.5)
    assert plan.tokens_per_row == pytest.approx(lengths.mean())
    assert any(n.startswith("probe: unpacked rows") and f"{width} tokens for {micro_batch} row(s)" in n for n in plan.notes)


def test_a_batch_in_tokens_counts_the_real_tokens_of_unpacked_rows(tmp_path):
    """data.pack: false with examples far shorter than data.seq_len: a batch pinned in tokens, and the
    planner's own, are rows holding that many real tokens on average — not rows of seq_len, which
    would round 4 × 60 tokens down to a single row (or, for the rule's batch, far fewer than it asked)."""
    from budgetune.data import row_lengths
    from budgetune.models import load_tokenizer

    raw = _short_rows_config(tmp_path, pack=False)
    cfg = load_config(raw)
    mean = row_lengths(cfg, load_tokenizer(cfg, log=lambda m: None), log=lambda m: None).mean()
    assert mean < 200
    pinned = load_config(raw, {"train": {"batch_tokens": int(4 * mean)}})
    plan = make_plan(pinned, probe_steps=0, log=lambda m: None, measure_batch_speed=False)
    assert plan.best.recipe.micro_batch * plan.best.recipe.grad_accum == 4
    assert plan.tokens_per_row == pytest.approx(mean)
    # open: the rule's tokens, in rows of the data's mean length
    plan = make_plan(load_config(raw, {"budget": {"time": None, "tokens": 5e6}}), probe_steps=0, log=lambda m: None)
    batch = plan.batch
    assert batch.tokens_per_row == pytest.approx(mean) and batch.rows_per_step == round(batch.batch_tokens / mean) > 2
    recipe = plan.best.recipe  # the config pins micro_batch 4: accumulation fills the rows to within one micro-batch
    assert abs(recipe.micro_batch * recipe.grad_accum - batch.rows_per_step) < recipe.micro_batch
    assert "unpacked rows" in batch.describe(512)
    # packed rows stay rows of seq_len
    packed = make_plan(load_config(_short_rows_config(tmp_path, pack=True), {"budget": {"time": None, "tokens": 5e6}}),
                       probe_steps=0, log=lambda m: None)
    assert packed.batch.tokens_per_row is None and packed.batch.rows_per_step == round(packed.batch.batch_tokens / 512)
