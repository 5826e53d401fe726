"""Training FLOPs per token (METHODS.md §2).

A dense matmul weight costs 2 FLOPs per token forward, 2 for the input gradient and 2
for its weight gradient: 6 per parameter when it trains, 4 when it is frozen (adapter
methods). Causal attention adds about 6 · n_layers · seq · d_model per token (QKᵀ and
AV, forward and backward). Embedding lookups are not matmuls and are not counted.
"""

from __future__ import annotations


def matmul_parameters(model) -> tuple[int, int]:
    """(all, trainable) parameters that take part in matmuls: everything but the input embedding."""
    from ..quantize import numel  # a packed 4-bit weight holds two parameters per element

    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    seen, total, trainable = {id(embedding)} if not tied else set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += numel(p)
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def flops_per_token(config, seq_len: int, n_matmul: int, n_trainable: int) -> float:
    layers = getattr(config, "num_hidden_layers", 0) or 0
    d_model = getattr(config, "hidden_size", 0) or 0
    return 4.0 * n_matmul + 2.0 * n_trainable + 6.0 * layers * seq_len * d_model
