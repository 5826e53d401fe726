"""A real pretrained model on the CPU: LoRA vs QLoRA (NF4) vs full fine-tuning, the QLoRA merge
gap, and LoftQ vs plain QLoRA initialisation — on SmolLM2-135M-Instruct.

    python benchmarks/real_models.py --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf [--seconds 75] [--out DIR] [--skip PARTS]

Only part 3 (training at equal wall-clock) and 4 (which needs its QLoRA run) are timings;
run them alone under a benchmark lock with `--skip memory,loftq` if the machine is shared.

Needs `pip install gguf` (transformers reads the GGUF file and dequantises it). The GGUF is
converted once to a float safetensors folder under --out (`model.name` points at it).

1. Data: the standard library's docstring → function chats (`stdlib_chat`, 600 chats, 20%
   held out), rendered with the model's own chat template, seq_len 256, micro-batch 2;
   held-out loss on the first --eval-tokens (1,024) held-out tokens.
2. Memory, predicted vs measured, per method: the training step's peak (above the post-import
   baseline) measured in a fresh process by `plan.measure.measure_step_memory` (2 steps on a
   random-init model of the same shape), against `plan.memory.estimate_memory`'s step bytes.
3. Equal wall-clock: LoRA r16, QLoRA (NF4 + double quantisation) r16 and full fine-tuning,
   each `budget.time: --seconds` (load excluded, data preparation and the final eval
   included); held-out loss before/after, median tokens/s, peak RSS of the run (its
   summary) and the planner's prediction for it.
4. The QLoRA merge gap (on part 3's QLoRA run, or with part 3 skipped on a run of
   --merge-steps steps): held-out loss of the trained forward (NF4 base + adapter) vs the
   `export --merge` model (base dequantised, adapter folded in, plain fp32 transformers), and,
   for comparison, the adapter put on the original full-precision weights.
5. LoftQ vs plain QLoRA init at step 0 (r16 and r64): held-out loss and logits RMSE /
   KL(full ‖ quantised) against the full-precision model on the held-out rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from _runs import train_in_process


def convert(gguf: Path, folder: Path) -> Path:
    """The GGUF dequantised by transformers, saved as a safetensors folder (once)."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained (its "quantizer" is the GGUF reader): the same
    # dequantised weights in a fresh model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(folder)
    return folder


def base_config(model_dir: Path, chat: Path, out: Path, **sections) -> dict:
    cfg = {
        "model": {"name": str(model_dir)},
        "data": {"train": [str(chat)], "seq_len": 256, "eval_fraction": 0.2, "cache_dir": str(out / "cache")},
        "train": {"micro_batch": 2, "seed": 0},
        "eval": {"max_tokens": EVAL_TOKENS, "every": None},
        "checkpoint": {"every": None},
        "schedule": {"name": "cosine", "warmup": 0.05},
        "plan": {"auto": False},
        "output": {"report": False, "overwrite": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


EVAL_TOKENS = 1024  # held-out tokens per evaluation (4 rows; --eval-tokens): a 135M forward on a shared 2-core CPU is slow

RUNS = [  # label, method, model extras, optimizer
    ("LoRA r16", {"name": "lora", "r": 16}, {}, {"lr": 1e-3}),
    ("QLoRA NF4 r16", {"name": "lora", "r": 16}, {"quantize": "nf4"}, {"lr": 1e-3}),
    ("full FT", {"name": "full"}, {}, {"lr": 5e-5}),
]


def train_run(cfg: dict, out: Path) -> dict:
    try:
        return train_in_process(cfg, out)  # `out` is the run's output.dir at every call
    except RuntimeError as e:
        raise SystemExit(f"run {out} failed:\n{e}") from None


def step_memory(model: Path, recipe) -> tuple[float, float]:
    """(measured, predicted) peak MiB of the training step above the post-import baseline."""
    from transformers import AutoConfig

    from budgetune.plan.measure import measure_step_memory
    from budgetune.plan.memory import estimate_memory

    config = AutoConfig.from_pretrained(str(model))
    d = {k: v for k, v in config.to_dict().items() if k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings", "head_dim", "rope_theta")}
    measured = measure_step_memory(d, recipe, timeout=3600)  # two steps of a 135M model: minutes on a busy CPU
    predicted = estimate_memory(config, recipe, "cpu", overhead_bytes=measured["baseline_bytes"])
    return measured["peak_bytes"] / 2**20, predicted.step_bytes / 2**20


def heldout(model, rows) -> float:
    import torch

    from budgetune.evaluate import heldout_loss

    return heldout_loss(model, rows, 2, EVAL_TOKENS, torch.device("cpu"))


def eval_rows(cfg_dict: dict):
    from budgetune.config import load_config
    from budgetune.data import prepare_data
    from budgetune.models import load_tokenizer

    cfg = load_config(cfg_dict)
    tokenizer = load_tokenizer(cfg, log=lambda m: None)
    return prepare_data(cfg, tokenizer, seed=0, log=lambda m: None).eval


def logits_error(model, reference_logits, x) -> tuple[float, float]:
    """(RMSE of the logits, mean KL(reference ‖ model) per token) on the batch x."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    rmse = (logits - reference_logits).pow(2).mean().sqrt().item()
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference_logits.log_softmax(-1), log_target=True, reduction="none")
    return rmse, kl.sum(-1).mean().item()


def main() -> None:
    global EVAL_TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--seconds", type=float, default=75, help="wall-clock budget of each training run")
    ap.add_argument("--out", type=Path, default=Path("/tmp/budgetune-real-models"))
    ap.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="held-out tokens per evaluation")
    ap.add_argument("--loftq-ranks", default="16,64", help="comma-separated LoRA ranks for part 5")
    ap.add_argument("--merge-steps", type=int, default=40, help="steps of the QLoRA run for the merge gap when part 3 is skipped")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: memory, train, merge, loftq")
    args = ap.parse_args()
    EVAL_TOKENS = args.eval_tokens
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from budgetune.data.corpora import stdlib_chat
    from budgetune.plan.recipe import Recipe

    t0 = time.time()
    model = convert(args.gguf, args.out / "smollm2-135m-instruct")
    chat = stdlib_chat(args.out / "chat.jsonl", limit=600)
    print(f"model folder {model} (converted from {args.gguf.name}); {time.time() - t0:.0f}s", flush=True)
    results: dict = {"seconds": args.seconds}

    if "memory" not in skip:
        results["memory"] = {}
        for label, method, extra, _ in sorted(RUNS, key=lambda run: "quantize" not in run[2]):  # QLoRA first
            recipe = Recipe(method=method["name"], lora_r=method.get("r", 16), micro_batch=2, seq_len=256,
                            quantize=extra.get("quantize"), extra={"double_quant": True})
            measured, predicted = step_memory(model, recipe)
            results["memory"][label] = {"measured_mb": round(measured, 1), "predicted_mb": round(predicted, 1),
                                        "error": round(predicted / measured - 1, 3)}
            print(f"step memory {label}: measured {measured:.0f} MiB, predicted {predicted:.0f} MiB "
                  f"({100 * (predicted / measured - 1):+.1f}%)", flush=True)

    runs: dict = {}
    if "train" not in skip:
        for label, method, extra, optim in RUNS:
            run_dir = args.out / "runs" / label.split()[0].lower().replace(" ", "-")
            cfg = base_config(model, chat, args.out, model={"name": str(model), **extra}, method=method, optim=optim,
                              budget={"time": f"{args.seconds:g}s"}, output={"dir": str(run_dir), "report": False, "overwrite": True})
            s = train_run(cfg, run_dir)
            runs[label] = run_dir
            pred = s.get("predicted") or {}
            results.setdefault("train", {})[label] = {
                "eval_loss_before": round(s["eval_loss_before"], 4), "eval_loss_after": round(s["eval_loss_after"], 4),
                "steps": s["steps"], "tokens": s["tokens"], "tokens_per_s_median": s["train_tokens_per_s_median"],
                "peak_rss_mb": s["peak_memory_mb"], "predicted_peak_mb": pred.get("peak_memory_mb"),
                "trainable": s["trainable_parameters"], "elapsed_s": s["elapsed_s"]}
            print(f"{label}: loss {s['eval_loss_before']:.4f} → {s['eval_loss_after']:.4f} in {s['steps']} steps, "
                  f"{s['train_tokens_per_s_median']} tok/s, peak RSS {s['peak_memory_mb']:.0f} MB (predicted "
                  f"{pred.get('peak_memory_mb')} MB)", flush=True)

    rows = eval_rows(base_config(model, chat, args.out, output={"dir": str(args.out / "rows")}, budget={"steps": 1}))
    if "merge" not in skip and "QLoRA NF4 r16" not in runs:  # no timed run: a QLoRA run of a fixed step count
        run_dir = args.out / "runs" / "qlora-steps"
        label, method, extra, optim = RUNS[1]
        s = train_run(base_config(model, chat, args.out, model={"name": str(model), **extra}, method=method, optim=optim,
                                  budget={"steps": args.merge_steps}, output={"dir": str(run_dir), "report": False, "overwrite": True}),
                      run_dir)
        runs[label] = run_dir
        results["merge_run"] = {"steps": s["steps"], "eval_loss_before": round(s["eval_loss_before"], 4),
                                "eval_loss_after": round(s["eval_loss_after"], 4)}
        print(f"QLoRA run for the merge gap: {results['merge_run']}", flush=True)
    if "merge" not in skip:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from budgetune.evaluate import load_trained
        from budgetune.export import export

        run_dir = runs["QLoRA NF4 r16"]
        trained, _, _ = load_trained(run_dir)
        merged_dir = export(run_dir, merge=True, overwrite=True)
        merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
        on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(run_dir / "model"))
        gap = {"trained_forward": heldout(trained, rows), "merged_export": heldout(merged, rows),
               "adapter_on_full_precision_base": heldout(on_full, rows)}
        results["merge_gap"] = {k: round(v, 5) for k, v in gap.items()}
        print(f"QLoRA merge gap: {gap}", flush=True)
        del trained, merged, on_full

    if "loftq" not in skip:
        from transformers import AutoModelForCausalLM

        from budgetune.config import load_config
        from budgetune.methods import get_method
        from budgetune.models import load_model, load_tokenizer

        full = AutoModelForCausalLM.from_pretrained(str(model))
        x = torch.stack([rows.batch([i])["input_ids"][0] for i in range(min(4, len(rows)))])
        with torch.no_grad():
            ref = full(input_ids=x).logits.float()
        out = {"full precision": {"heldout_loss": round(heldout(full, rows), 4)}}
        del full
        for r in map(int, args.loftq_ranks.split(",")):
            for init in ("default", "loftq"):
                cfg = load_config(base_config(model, chat, args.out, model={"name": str(model), "quantize": "nf4"},
                                              method={"name": "lora", "r": r, "alpha": 2 * r, "init": init},
                                              output={"dir": str(args.out / "loftq")}, budget={"steps": 1}))
                t = time.time()
                m = get_method("lora").prepare(load_model(cfg, load_tokenizer(cfg, log=lambda m: None), torch.device("cpu"), frozen_base=True),
                                               cfg.method)
                init_s = time.time() - t
                rmse, kl = logits_error(m, ref, x)
                label = f"NF4 + LoRA r{r} " + ("LoftQ init" if init == "loftq" else "plain init (B = 0)")
                out[label] = {"heldout_loss": round(heldout(m, rows), 4), "logits_rmse": round(rmse, 4), "kl": round(kl, 5),
                              "load_and_init_s": round(init_s, 1)}
                print(f"{label}: {out[label]}", flush=True)
                del m
        results["loftq"] = out

    # parts run separately (--skip) accumulate in one results file
    path = args.out / "results.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    results = {**previous, **results}
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
