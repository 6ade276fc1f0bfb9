"""torchrun worker: every variant at TP=2 and TP=2 + sequence parallel, with the TP=1 weights
loaded shard by shard; writes the loss and the gathered gradients for the test to compare.

Gradients go through Megatron's DDP and finalize_model_grads, as in training (that is where
sequence-parallel norm grads and q/k-norm grads are summed over TP ranks).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from fusedkv_megatron import compat
from tests.distributed.sharding import gather_full, load_full_state
from tests.tiny import L, tiny_batch, tiny_model


def run(case: dict, ref: dict, sequence_parallel: bool):
    model = tiny_model(
        case["variant"],
        case.get("layers", L),
        kv_overrides=case["kv"],
        sequence_parallel=sequence_parallel,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
    )
    load_full_state(model, ref["state"])
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    tokens, labels, pos = tiny_batch()
    loss = ddp(tokens, pos, None, labels=labels)
    loss.sum().backward()
    finalize_model_grads([ddp])
    grads = {n: gather_full(n, p, p.main_grad, model) for n, p in model.named_parameters()}
    return loss.detach(), grads


def main(ref_path: str, out_path: str):
    compat.apply()  # Megatron's CPU patches, before seeding
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model_parallel_cuda_manual_seed(1234)
    refs = torch.load(ref_path)
    results = {}
    for key, ref in refs.items():
        for sp in (False, True):
            results[f"{key}/sp={sp}"] = run(ref["case"], ref, sp)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
