"""torchrun worker (4 processes): what the planner predicts, measured on every rank.

Phase 1, TP=2 x PP=2: the parameters each rank's stage model stores, for every variant (tied
and untied embeddings), and the bytes each stage's forward saves for backward (SP off and on,
no and full recompute; the second stage gets a tensor of the width the first sends). Phase 2, TP=2 x DP=2: the bytes autograd saves for backward in one
forward, for every variant with sequence parallelism off and on, in three recompute modes.
Rank 0 writes everything as JSON for the test to compare with the planner.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from fusedkv_megatron import VARIANTS, compat
from tests import planner_measure as pm

RECOMPUTE = ("none", "selective", "full-uniform-1")
PIPELINE_RECOMPUTE = ("none", "full-uniform-1")


def _gather(local: dict) -> dict:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return {k: v for part in everyone for k, v in part.items()}


def tp2_pp2() -> tuple[dict, dict]:
    """Parameters per rank; saved bytes of each stage's forward (the second stage fed what
    the first sends), SP off and on, without and with full recompute."""
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1234)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    params, saved = {}, {}
    for variant in VARIANTS:
        for tied in (True, False):
            model, _ = pm.build(variant, tp=2, pp=2, tied=tied)
            params[f"{variant}/tied={tied}/pp={pp}/tp={tp}"] = pm.parameters(model)
        for sp in (False, True):
            for recompute in PIPELINE_RECOMPUTE:
                model, config = pm.build(variant, tp=2, pp=2, sp=sp, recompute=recompute)
                received = pm.stage_input(config, variant) if pp else None
                key = f"{variant}/sp={sp}/{recompute}/pp={pp}/tp={tp}"
                saved[key] = pm.saved_bytes(model, config, received)
    ps.destroy_model_parallel()
    return params, saved


def saved_tp2() -> dict:
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    model_parallel_cuda_manual_seed(1234)
    tp, dp = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    out = {}
    for variant in VARIANTS:
        for sp in (False, True):
            for recompute in RECOMPUTE:
                model, config = pm.build(variant, tp=2, sp=sp, recompute=recompute)
                out[f"{variant}/sp={sp}/{recompute}/dp={dp}/tp={tp}"] = pm.saved_bytes(
                    model, config
                )
    ps.destroy_model_parallel()
    return out


def main(out_path: str) -> None:
    compat.apply()  # Megatron's CPU patches, before seeding
    dist.init_process_group("gloo")
    params, stages = tp2_pp2()
    results = {
        "parameters": _gather(params),
        "stages": _gather(stages),
        "saved": _gather(saved_tp2()),
    }
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
