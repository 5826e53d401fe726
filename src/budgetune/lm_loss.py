"""The language-model loss of one batch, per token: the summed next-token cross-entropy (`token_losses`: training,
held-out loss, the planner's probes) and every target's log-probability (`token_logps`: the preference objectives).

The LM head and the loss run in one of three ways, chosen per model and device: Liger's fused linear +
cross-entropy when fastpath.py attached it (CUDA), the chunked head + loss below for large vocabularies, else the
plain head and `F.cross_entropy`. Below the objectives and evaluate.py, which both use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from .data import IGNORE
from .fastpath import fused_loss


# Chunked linear + cross-entropy (ours: a few lines of torch, no kernel library needed). With a
# large vocabulary the [B, T, V] fp32 logits and their softmax are the biggest tensors of a step
# (Qwen2's 152k vocabulary: 4.7 GB for 8 × 1024 tokens). The LM head then runs per chunk of
# tokens under activation checkpointing, so only one chunk's logits exist at a time, in
# forward and in backward (recomputed there). Only for architectures whose logits are the head's
# output unchanged (no soft-capping or scaling after it).
CHUNKED_FROM_VOCAB = 32768
LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk (Qwen2's vocabulary: 441 tokens)
CHUNKABLE = {"llama", "mistral", "qwen2", "qwen3", "gpt_neox", "phi3", "olmo", "olmo2", "smollm3", "granite"}


def loss_chunk(config) -> int:
    """Tokens per chunk of the chunked head + loss for a model config; 0 = the plain path."""
    vocab = getattr(config, "vocab_size", 0)
    if getattr(config, "model_type", None) in CHUNKABLE and vocab >= CHUNKED_FROM_VOCAB:
        return max(64, LOSS_CHUNK_BYTES // (4 * vocab))
    return 0


def _chunk_loss(hidden, targets, weight, bias):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE, reduction="sum")


def _final_hidden(model, head, batch: dict) -> torch.Tensor:
    head.forward = lambda x: x  # the model returns its final hidden states as "logits"
    try:
        return model(**batch, use_cache=False).logits
    finally:
        del head.forward


def token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over labelled targets, number of targets)."""
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers keep the model in .module
    head = inner.get_output_embeddings()
    plain_head = isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear
    fused = fused_loss(head) if plain_head else None  # Liger's fused linear + cross-entropy (fastpath.py), on CUDA
    chunk = loss_chunk(inner.config) if plain_head else 0
    if fused is not None:
        hidden = _final_hidden(model, head, batch)
        # the kernel wants one dtype: under autocast (step.py) the autocast dtype, with autocast off inside it
        kind = hidden.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        weight, bias = (p if p is None or p.dtype == dtype else p.to(dtype) for p in (head.weight, head.bias))
        with torch.autocast(kind, enabled=False):
            loss = fused(weight, hidden[:, :-1].flatten(0, 1).to(dtype), targets.flatten(), bias)
        return loss, (targets != IGNORE).sum()
    if not chunk:
        logits = model(**batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return loss, (targets != IGNORE).sum()
    hidden = _final_hidden(model, head, batch)
    hidden, flat = hidden[:, :-1].flatten(0, 1), targets.flatten()
    loss = torch.zeros((), device=hidden.device)
    for start in range(0, flat.numel(), chunk):
        piece = slice(start, start + chunk)
        loss = loss + torch.utils.checkpoint.checkpoint(_chunk_loss, hidden[piece], flat[piece], head.weight, head.bias,
                                                        use_reentrant=False)
    return loss, (targets != IGNORE).sum()


def _chunk_token_logps(hidden, targets, weight, bias):
    return -F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE, reduction="none")


def token_logps(model, batch: dict) -> torch.Tensor:
    """log p(target) of every next-token target, [B, T-1] (0 where the label is IGNORE); the same
    chunked head as `token_losses` for large vocabularies."""
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    chunk = loss_chunk(inner.config) if isinstance(head, torch.nn.Linear) and type(head) is torch.nn.Linear else 0
    if not chunk:
        logits = model(**batch, use_cache=False).logits
        return -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                reduction="none").view_as(targets)
    hidden = _final_hidden(model, head, batch)
    hidden, flat = hidden[:, :-1].flatten(0, 1), targets.flatten()
    pieces = [torch.utils.checkpoint.checkpoint(_chunk_token_logps, hidden[i : i + chunk], flat[i : i + chunk], head.weight,
                                                head.bias, use_reentrant=False) for i in range(0, flat.numel(), chunk)]
    return torch.cat(pieces).view_as(targets)
