"""Speed: FLOPs per step from the model's shape, and a calibration probe on the real device.

Prediction: tokens/s = achieved FLOP/s ÷ FLOPs per token. The achieved rate is first a
device guess, then measured by `probe()`: a few real forward+backward passes of the
candidate recipe on synthetic tokens (the optimizer step is excluded: it is small next to
the matmuls and would change the weights).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .flops import flops_per_token
from .recipe import Recipe

# Rough sustained rates before calibration (FLOP/s): dense bf16 at ~40% MFU on known GPUs,
# and ~30 GFLOP/s per core for fp32 on CPUs with AVX2/AVX-512 (measured here: ~55 GFLOP/s on 2 cores).
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "T4": 65e12}
GPU_MFU_GUESS = 0.4
CPU_FLOPS_PER_CORE = 30e9


def device_flops_guess(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else ""  # planning for another machine
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 100e12)
        return peak * GPU_MFU_GUESS
    return CPU_FLOPS_PER_CORE * max(1, torch.get_num_threads())


def step_flops_per_token(config, recipe: Recipe, n_matmul: int, n_trainable: int) -> float:
    """FLOPs per trained token, including the extra forward that checkpointing recomputes."""
    base = flops_per_token(config, recipe.seq_len, n_matmul, n_trainable)
    if recipe.gradient_checkpointing:
        layers = getattr(config, "num_hidden_layers", 0) or 0
        base += 2.0 * n_matmul + 2.0 * layers * recipe.seq_len * (getattr(config, "hidden_size", 0) or 0)
    return base


@dataclass
class ProbeResult:
    tokens_per_s: float
    achieved_flops: float
    seconds_per_micro_batch: float


def probe(model, recipe: Recipe, fpt: float, steps: int = 2, device: torch.device | None = None) -> ProbeResult:
    """Time `steps` forward+backward passes of one micro-batch (after one warm-up pass)."""
    from ..evaluate import token_losses

    device = device or next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    shape = (recipe.micro_batch, recipe.seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=gen)
    # two examples per row, as packed data has: exercises the block-diagonal mask path
    half = recipe.seq_len // 2
    positions = torch.cat([torch.arange(half), torch.arange(recipe.seq_len - half)]).expand(shape).contiguous()
    batch = {"input_ids": ids, "labels": ids.clone()}
    if recipe.packed:
        batch["position_ids"] = positions
    was_training = model.training
    model.train()
    timings = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss, _ = token_losses(model, {k: v.to(device) for k, v in batch.items()})
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            timings.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    seconds = min(timings)
    tokens_per_s = recipe.micro_batch * recipe.seq_len / seconds
    return ProbeResult(tokens_per_s, tokens_per_s * fpt, seconds)
