"""Planning: FLOPs, memory and throughput models, scaling laws, recipe search."""

from .flops import flops_per_token, matmul_parameters

__all__ = ["flops_per_token", "matmul_parameters"]
