"""Move full (TP=1) tensors in and out of a tensor-parallel model, for tests.

Megatron shards a parameter marked `tensor_model_parallel` in contiguous chunks along its
`partition_dim`, with one exception: SwiGLU's linear_fc1 holds [gate_r; up_r] on rank r, so the
full [gate; up] matrix is split per half.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _is_glu_fc1(name: str, model) -> bool:
    return name.endswith("linear_fc1.weight") and model.config.gated_linear_unit


def shard_of(name: str, param, full: torch.Tensor, model) -> torch.Tensor:
    """This rank's piece of the full tensor `full` for parameter `param`."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim)[rank], up.chunk(tp, dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def gather_full(name: str, param, local: torch.Tensor, model) -> torch.Tensor:
    """The full tensor from every TP rank's piece `local` of parameter `param`."""
    if not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    group = ps.get_tensor_model_parallel_group()
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, local.contiguous(), group=group)
    dim = param.partition_dim
    if _is_glu_fc1(name, model):
        halves = [p.chunk(2, dim=dim) for p in pieces]
        return torch.cat(
            [torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], dim
        )
    return torch.cat(pieces, dim=dim)


def load_full_state(model, full: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard_of(name, p, full[name], model))
