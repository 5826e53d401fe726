"""AdamW on the CPU: torch's three implementations side by side, per update and per training step.

    python benchmarks/adamw_cpu.py [--models demo,smollm2] [--rows 2] [--seq 512] [--steps 20]

torch's AdamW picks its single-tensor path on the CPU unless told otherwise (no foreach, no fused);
transformers' Trainer asks for the fused kernel (`adamw_torch_fused`, its default since torch 2.8).
For each model (random init from its config, no download) and each implementation, in a fresh
process: milliseconds per optimizer update (random gradients, after warm-up updates), milliseconds
per whole training step (forward + backward + update on `rows` × `seq` tokens, budgetune's loss), the
update's share of the step, and the RSS high-water the update adds above the step without it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

MODELS = {  # transformers configs: the demo's llama-tiny (BPE vocab 2048) and SmolLM2-135M's architecture
    "demo": dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True),
}
VARIANTS = {"single-tensor (torch's CPU default)": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def child(model_name: str, variant: str, rows: int, seq: int, steps: int) -> dict:
    from budgetune.plan.measure import pin_mmap_threshold

    pin_mmap_threshold()  # glibc returns big temporaries to the OS at once, so the high-water mark sees them
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from budgetune.lm_loss import token_losses
    from budgetune.metrics import peak_rss_bytes
    from budgetune.optim import param_groups
    from budgetune.plan.measure import _reset_peak_rss, _rss_bytes

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[model_name]))
    optimizer = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-4, betas=(0.9, 0.95), **VARIANTS[variant])
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(0))

    def train_step(update: bool) -> None:
        loss, n = token_losses(model, {"input_ids": ids, "labels": ids.clone()})
        (loss / n).backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocate the moments, let the allocator settle
        train_step(True)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(True)
    step_s = (time.perf_counter() - t) / steps
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    _reset_peak_rss()
    before = _rss_bytes()
    optimizer.step()  # the update's own transients: what it allocates above weights, gradients and moments
    peak_added = max(0, peak_rss_bytes() - before)
    t = time.perf_counter()
    for _ in range(steps * 5):
        optimizer.step()
    update_s = (time.perf_counter() - t) / (steps * 5)
    return {"update_ms": 1e3 * update_s, "step_ms": 1e3 * step_s, "peak_added_mb": peak_added / 2**20,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "threads": torch.get_num_threads()}


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="demo,smollm2")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"{args.rows} × {args.seq} tokens per training step, {args.steps} timed steps, "
          f"{args.steps * 5} timed updates, each variant in a fresh process\n")
    print("| model | AdamW | ms / update | ms / training step | update's share of the step | RSS the update adds |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "_child", name, variant, str(args.rows), str(args.seq), str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout.splitlines()[-1]
            r = json.loads(out)
            print(f"| {name} ({r['params_m']:.1f}M) | {variant} | {r['update_ms']:.1f} | {r['step_ms']:.0f} | "
                  f"{r['update_ms'] / r['step_ms']:.1%} | {r['peak_added_mb']:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
