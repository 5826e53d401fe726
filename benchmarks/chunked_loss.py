"""Chunked LM head + loss against the plain one, side by side: step peak memory and time.

    python benchmarks/chunked_loss.py [--vocab 151936] [--batch 4] [--seq 512]

A 2-layer Llama with Qwen2's vocabulary (the head and the logits dominate), two AdamW steps in
a fresh process per variant, RSS high-water above the post-import baseline (glibc's mmap
threshold pinned, as in the planner's measurements).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def child(variant: str, vocab: int, batch: int, seq: int) -> None:
    from budgetune.plan.measure import pin_mmap_threshold

    pin_mmap_threshold()
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from budgetune.metrics import peak_rss_bytes

    from budgetune import lm_loss as ev
    if variant == "plain":
        ev.loss_chunk = lambda config: 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                                                         num_hidden_layers=2, num_attention_heads=4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    base, t = peak_rss_bytes(), time.perf_counter()
    for _ in range(2):
        loss, n = ev.token_losses(model, {"input_ids": ids, "labels": ids.clone()})
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"{(peak_rss_bytes() - base) / 2**20:.0f} {(time.perf_counter() - t) / 2:.3f} {(loss / n).item():.6f}")


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        child(sys.argv[2], *map(int, sys.argv[3:6]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    rows = {}
    for variant in ("plain", "chunked"):
        out = subprocess.run([sys.executable, __file__, "_child", variant, str(args.vocab), str(args.batch), str(args.seq)],
                             capture_output=True, text=True, check=True).stdout.split()
        rows[variant] = (float(out[0]), float(out[1]), float(out[2]))
    print(f"vocab {args.vocab}, {args.batch}×{args.seq} tokens per step\n")
    print("| loss path | step peak MB | s / step | loss |\n|---|---|---|---|")
    for variant, (mb, s, loss) in rows.items():
        print(f"| {variant} | {mb:,.0f} | {s:.2f} | {loss:.4f} |")
    print(f"\nchunked / plain: memory {rows['chunked'][0] / rows['plain'][0]:.2f}×, time {rows['chunked'][1] / rows['plain'][1]:.2f}×")


if __name__ == "__main__":
    main()
