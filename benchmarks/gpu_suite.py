"""The GPU suite: budgetune's fast path against the standard stack, one command, one table.

    python benchmarks/gpu_suite.py                      # on one GPU (H100: ≤ 9 minutes)
    python benchmarks/gpu_suite.py --cpu                # tiny shapes, fewer rows (what CI runs; automatic without CUDA)
    python benchmarks/gpu_suite.py --models 0.5b --methods full,lora --stacks budgetune,trainer

For random-init Qwen2-shaped models (~0.5B and ~1.5B: Qwen2.5-0.5B / -1.5B's shapes, 151,936-token
vocabulary) and full fine-tuning, LoRA (r 16, all linears) and QLoRA (NF4 base + LoRA), on a
variable-length chat set (Python standard-library functions as {user: docstring, assistant: code},
budgetune.data.corpora.stdlib_chat) at seq_len 2048, with the same micro-batch everywhere:
- budgetune: its own setup() and fit() (the real loop: packed rows, the attention / precision /
  kernel choices `auto` makes on this machine), pinned to the row's recipe (plan.auto off; the
  planner still predicts the peak), finish() left out — the final save writes gigabytes and
  measures the disk, not the step;
- transformers `Trainer`, dynamic padding (DataCollatorForSeq2Seq pads each micro-batch to its
  longest example), bf16 autocast on a GPU;
- TRL `SFTTrainer`, `padding_free=True` (each micro-batch is one unpadded row with position_ids).
The peers get the same model (budgetune's loader: same config, seeded init, same attention
implementation, no Liger), tokenizer and tokenised examples. A micro-batch is `--micro-batch`
rows: packed rows of seq_len tokens for budgetune, examples for the peers (so tokens per step
differ; the table shows them).

Every row is its own process (clean CUDA peaks). Columns: tokens/s (non-padding tokens, the timed
steps after `--warmup`), MFU (tokens/s × budgetune's FLOPs per token ÷ the device's dense bf16
peak), peak memory (`torch.cuda.max_memory_allocated` / `max_memory_reserved`; on the CPU the
process's RSS high-water), and for budgetune rows the planner's predicted peak against the measured allocated peak (on CUDA without the prediction's
framework-overhead term, which max_memory_allocated does not see; on the CPU the whole process).

Installs nothing at run time: bring a venv with budgetune[bench] (trl), and optionally
budgetune[liger] and flash-attn (docs/benchmarks.md says what to carry to the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()

# Qwen2.5-0.5B / -1.5B shapes (tied embeddings), random init; `tiny`: the CPU mode's
MODELS = {
    "0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096),
    "tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
}
METHODS = {"full": {"method": {"name": "full"}}, "lora": {"method": {"name": "lora", "r": 16}},
           "qlora": {"method": {"name": "lora", "r": 16}, "model": {"quantize": "nf4"}}}
STACKS = ("budgetune", "trainer", "trl")
NAMES = {"budgetune": "budgetune", "trainer": "Trainer (dynamic padding)", "trl": "TRL SFTTrainer (padding_free)"}


def row_config(work: Path, model: str, method: str, seq_len: int, micro_batch: int, steps: int, compile_: bool) -> dict:
    cfg = {
        "model": {"init": "scratch", "arch": MODELS[model]},
        "tokenizer": {"train_vocab_size": 4096},
        "data": {"train": [str(work / "chat.jsonl")], "format": "chat", "seq_len": seq_len, "eval_fraction": 0.02,
                 "cache_dir": str(work / "cache")},
        "train": {"micro_batch": micro_batch, "grad_accum": 1, "seed": 0, "compile": compile_},
        "budget": {"steps": steps},
        "eval": {"every": None, "max_tokens": seq_len},
        "checkpoint": {"every": None},
        "plan": {"auto": False, "probe": False},
        "output": {"dir": str(work / "runs" / f"{model}-{method}"), "overwrite": True, "report": False},
    }
    for section, values in METHODS[method].items():
        cfg.setdefault(section, {}).update(values)
    return cfg


# --- one row, in its own process ----------------------------------------------------------------------


def _memory(device) -> dict:
    import torch

    from budgetune.metrics import peak_rss_bytes

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return {"allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20, "reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"allocated_mb": peak_rss_bytes() / 2**20, "reserved_mb": None}


def _timed(tokens: list[float], seconds: list[float], warmup: int) -> float:
    """Tokens/s over the steps after warmup (all steps when there are too few)."""
    start = warmup if len(tokens) > warmup else 0
    return sum(tokens[start:]) / max(sum(seconds[start:]), 1e-9)


def run_budgetune(spec: dict) -> dict:
    from budgetune.config import load_config
    from budgetune.console import quiet_libraries
    from budgetune.fastpath import describe
    from budgetune.rundir import RunDir
    from budgetune.train import _accelerator, fit, setup

    quiet_libraries()
    cfg = load_config(spec["config"])
    run_dir = RunDir(Path(cfg.output.dir))
    run_dir.check(False, True)
    run_dir.prepare(False, True)
    lock = run_dir.lock_and_sign()
    try:
        accelerator = _accelerator(cfg, run_dir)
        run = setup(cfg, run_dir, accelerator, False, False, show=False)
        fit(run)
        run.checkpointer.wait()
    finally:
        lock.close()
    tokens = [r * s for r, s in zip(run.step_rates, run.step_seconds)]
    prediction = run.prediction or {}
    # on CUDA max_memory_allocated sees tensors only: compare the prediction without its framework-overhead
    # term; on the CPU the RSS peak holds the whole process, as the prediction's total does
    overhead = prediction.get("memory_terms_mb", {}).get("overhead", 0) if run.device.type == "cuda" else 0
    attention = run.raw_model.config._attn_implementation
    return {"tokens_per_s": _timed(tokens, run.step_seconds, spec["warmup"]), "tokens_per_step": statistics.mean(tokens),
            "fpt": run.fpt, "steps": run.clock.steps, "attention": attention,
            "fast_path": describe(cfg, run.device.type, attention),
            "predicted_mb": (prediction["peak_memory_mb"] - overhead) if prediction else None, **_memory(run.device)}


def run_peer(spec: dict) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from budgetune.config import load_config
    from budgetune.console import quiet_libraries
    from budgetune.data import prepare_data
    from budgetune.methods import get_method
    from budgetune.models import load_model, load_tokenizer
    from budgetune.plan import flops_per_token, matmul_parameters

    quiet_libraries()
    kind = spec["kind"]
    cuda = torch.cuda.is_available() and not spec["cpu"]
    device = torch.device("cuda" if cuda else "cpu")
    cfg = load_config(spec["config"], {"model": {"liger": False}})  # the standard stack: no Liger
    tokenizer = load_tokenizer(cfg, log=lambda m: None)
    method = get_method(cfg.method.name)
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg, tokenizer, device, frozen_base=method.adapter)  # same attention implementation as budgetune's
    if not cfg.model.quantize:
        model = model.to(device)
    model = method.prepare(model, cfg.method)
    n_matmul, n_trainable = matmul_parameters(model)
    fpt = flops_per_token(model.config, cfg.data.seq_len, n_matmul, n_trainable)
    cfg.data.pack = False  # one example per row: each peer batches them its own way
    rows = prepare_data(cfg, tokenizer, seed=cfg.train.seed, log=lambda m: None).train
    examples = []
    for i in range(len(rows)):
        n = int(rows.attention_mask[i].sum())
        examples.append({"input_ids": rows.input_ids[i, :n].tolist(), "labels": rows.labels[i, :n].tolist()})

    step_tokens: list[float] = []

    def counting(collate):
        def wrapped(features):
            batch = collate(features)
            step_tokens.append(float(batch["input_ids"].numel() if "attention_mask" not in batch else batch["attention_mask"].sum()))
            return batch
        return wrapped

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_begin(self, args, state, control, **kw):
            if not self.ends:
                self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    steps = cfg.budget.steps
    common = dict(output_dir=spec["out"], max_steps=steps, per_device_train_batch_size=cfg.train.micro_batch,
                  gradient_accumulation_steps=1, learning_rate=cfg.optim.lr, use_cpu=not cuda, bf16=cuda, report_to="none",
                  save_strategy="no", eval_strategy="no", logging_steps=10**9, disable_tqdm=True, seed=cfg.train.seed,
                  dataloader_num_workers=0)
    if kind == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        # the examples are already cut to seq_len (budgetune's data layer); TRL refuses max_length with padding_free
        args = SFTConfig(max_length=None, padding_free=True, packing=False, **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tokenizer)
        trainer.data_collator = counting(trainer.data_collator)
    else:
        pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100, return_tensors="pt")
        trainer = Trainer(model=model, args=TrainingArguments(remove_unused_columns=False, **common), train_dataset=examples,
                          data_collator=counting(pad))
    times = StepTimes()
    trainer.add_callback(times)
    trainer.train()
    seconds = [b - a for a, b in zip(times.ends, times.ends[1:])]
    tokens = step_tokens[: len(seconds)]
    return {"tokens_per_s": _timed(tokens, seconds, spec["warmup"]), "tokens_per_step": statistics.mean(tokens), "fpt": fpt,
            "steps": len(seconds), "attention": model.config._attn_implementation, "predicted_mb": None, **_memory(device)}


def in_process(kind: str, spec: dict, timeout: float) -> dict:
    """One row in a fresh process; its JSON result, or {"error": ...}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "kind": kind}, f)
    env_cpu = ["env", "CUDA_VISIBLE_DEVICES="] if spec["cpu"] else []
    try:
        done = subprocess.run([*env_cpu, sys.executable, str(HERE), "_row", f.name], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    if done.returncode:
        return {"error": " ".join(done.stderr.strip().splitlines()[-1:])[:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table -----------------------------------------------------------------------------------------------


def device_peak_flops(cpu: bool) -> tuple[str, float | None]:
    import torch

    from budgetune.plan.throughput import GPU_PEAK_BF16

    if cpu or not torch.cuda.is_available():
        return "CPU", None
    name = torch.cuda.get_device_name(0)
    return name, next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)


def table(results: list[dict], peak: float | None) -> str:
    out = ["| model | method | stack | micro-batch | tokens/step | tokens/s | MFU | peak allocated MB | peak reserved MB | "
           "planner predicted MB | predicted ÷ measured |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["result"]
        head = f"| {r['model']} | {r['method']} | {NAMES[r['stack']]} | {r['micro_batch']} |"
        if "error" in m:
            out.append(head + f" failed: {m['error']} | | | | | | |")
            continue
        mfu = f"{100 * m['tokens_per_s'] * m['fpt'] / peak:.1f}%" if peak else "-"
        reserved = f"{m['reserved_mb']:,.0f}" if m.get("reserved_mb") is not None else "-"
        predicted = f"{m['predicted_mb']:,.0f}" if m.get("predicted_mb") is not None else "-"
        ratio = f"{m['predicted_mb'] / m['allocated_mb']:.2f}" if m.get("predicted_mb") else "-"
        out.append(head + f" {m['tokens_per_step']:,.0f} | {m['tokens_per_s']:,.0f} | {mfu} | {m['allocated_mb']:,.0f} | {reserved} | "
                   f"{predicted} | {ratio} |")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_row":
        spec = json.loads(Path(sys.argv[2]).read_text())
        result = run_budgetune(spec) if spec["kind"] == "budgetune" else run_peer(spec)
        print(json.dumps(result))
        return
    import importlib.util

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes, fewer rows (automatic without CUDA)")
    ap.add_argument("--models", help="comma-separated: 0.5b, 1.5b (GPU default: both) or tiny (CPU)")
    ap.add_argument("--methods", help="comma-separated: full, lora, qlora (GPU default: all; CPU: full)")
    ap.add_argument("--stacks", default=",".join(STACKS), help="comma-separated: budgetune, trainer, trl")
    ap.add_argument("--seq-len", type=int, help="tokens per row (GPU 2048, CPU 256)")
    ap.add_argument("--micro-batch", type=int, help="rows per micro-batch, every stack (GPU 4, CPU 2)")
    ap.add_argument("--steps", type=int, help="optimizer steps per row (GPU 14, CPU 4)")
    ap.add_argument("--warmup", type=int, help="steps left out of tokens/s (GPU 4, CPU 1)")
    ap.add_argument("--compile", action="store_true", help="budgetune rows with train.compile true")
    ap.add_argument("--row-timeout", type=float, default=150, help="seconds before a row is given up")
    ap.add_argument("--deadline", type=float, default=530, help="seconds for the whole suite: rows that would start later are skipped")
    ap.add_argument("--work", help="work folder (keeps the chat set, tokenizer and caches between runs)")
    args = ap.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    models = (args.models or ("tiny" if cpu else "0.5b,1.5b")).split(",")
    methods = (args.methods or ("full" if cpu else "full,lora,qlora")).split(",")
    stacks = args.stacks.split(",")
    seq_len, micro_batch = args.seq_len or (256 if cpu else 2048), args.micro_batch or (2 if cpu else 4)
    steps, warmup = args.steps or (4 if cpu else 14), args.warmup if args.warmup is not None else (1 if cpu else 4)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="budgetune-gpu-suite-"))
    from budgetune.data.corpora import stdlib_chat

    if not (work / "chat.jsonl").exists():
        stdlib_chat(work / "chat.jsonl", limit=300 if cpu else 3000)
    device, peak = device_peak_flops(cpu)
    started = time.monotonic()
    print(f"# gpu_suite on {device}: seq_len {seq_len}, micro-batch {micro_batch}, {steps} steps ({warmup} warm-up) per row", flush=True)
    results = []
    for model in models:
        for method in methods:
            for stack in stacks:
                if stack == "trl" and importlib.util.find_spec("trl") is None:
                    results.append({"model": model, "method": method, "stack": stack, "micro_batch": micro_batch,
                                    "result": {"error": "trl is not installed (pip install 'budgetune[bench]')"}})
                    continue
                left = args.deadline - (time.monotonic() - started)
                cfg = row_config(work, model, method, seq_len, micro_batch, steps, args.compile and stack == "budgetune")
                spec = {"config": cfg, "warmup": warmup, "cpu": cpu, "out": str(work / "peer-out")}
                result = in_process(stack, spec, min(args.row_timeout, left)) if left > 5 else {"error": "skipped: the suite's deadline"}
                results.append({"model": model, "method": method, "stack": stack, "micro_batch": micro_batch, "result": result})
                print(json.dumps(results[-1]), flush=True)
    fast = next((r["result"].get("fast_path") for r in results if r["result"].get("fast_path")), "")
    print(f"\nbudgetune's fast path here: {fast}\n")
    print(table(results, peak))
    print(f"\n{len(results)} rows in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
