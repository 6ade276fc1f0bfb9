"""torchrun worker (4 processes): what the planner predicts, measured on every rank.

Phase 1, TP=2 x PP=2: the parameters each rank's stage model stores, for every variant (tied
and untied embeddings), and the bytes each stage's forward saves for backward (SP off and on,
no and full recompute; the second stage gets a tensor of the width the first sends). Phase 2, TP=2 x DP=2: the bytes autograd saves for backward in one
forward, for every variant with sequence parallelism off and on, in three recompute modes.
Phase 3, the trainer's own training step (`initialize.setup`, `Trainer.train_step`) at
TP=2 x DP=2 (SP off with the gradient reduce after backward, SP on with it overlapped) and
PP=2 x DP=2: the bytes every rank hands to each collective and send during a training step,
counted by wrapping torch.distributed (tests/comm_counter.py), for every variant.
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


# (name, TP, PP, SP, overlap grad reduce); 4 processes, DP = 4 / (TP x PP)
COMM_LAYOUTS = (
    ("tp2-dp2", 2, 1, False, False),
    ("tp2-sp-dp2-overlap", 2, 1, True, True),
    ("pp2-dp2", 1, 2, False, False),
)
COMM_MICROBATCHES = 2
CONTROL_BYTES = 64  # loss sums, token counts, grad norm, finite flags: not modelled


def _trainer_args(variant: str, tp: int, pp: int, sp: bool, overlap: bool):
    from fusedkv_megatron.training.arguments import parse_args, validate_args

    dp = 4 // (tp * pp)
    argv = [
        "--kv-sharing", variant, "--num-layers", str(pm.LAYERS),
        "--hidden-size", str(pm.HIDDEN), "--ffn-hidden-size", str(pm.FFN),
        "--num-attention-heads", str(pm.HEADS), "--num-query-groups", str(pm.groups(variant)),
        "--kv-channels", str(pm.HEAD_DIM), "--seq-length", str(pm.SEQ),
        "--max-position-embeddings", str(pm.SEQ), "--micro-batch-size", str(pm.MBS),
        "--global-batch-size", str(pm.MBS * dp * COMM_MICROBATCHES), "--train-iters", "10",
        "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", str(pm.VOCAB - 1), "--make-vocab-size-divisible-by", "1", "--bf16",
        "--use-distributed-optimizer", "--tensor-model-parallel-size", str(tp),
        "--pipeline-model-parallel-size", str(pp),
    ]  # fmt: skip
    argv += ["--sequence-parallel"] if sp else []
    argv += ["--overlap-grad-reduce"] if overlap else []
    return validate_args(parse_args(argv), world_size=4, cuda=False)


def _samples(n: int) -> list[dict]:
    import numpy as np

    gen = np.random.default_rng(0)
    out = []
    for _ in range(n):
        ids = gen.integers(0, pm.VOCAB - 1, pm.SEQ + 1)
        out.append(
            {
                "tokens": ids[:-1],
                "labels": ids[1:],
                "loss_mask": np.ones(pm.SEQ, np.float32),
                "position_ids": np.arange(pm.SEQ),
            }
        )
    return out


def _group_names() -> dict[tuple[int, ...], str]:
    ranks = dist.get_process_group_ranks
    return {
        tuple(ranks(ps.get_tensor_model_parallel_group())): "tp",
        tuple(ranks(ps.get_data_parallel_group())): "dp",
        tuple(ranks(ps.get_pipeline_model_parallel_group())): "pp",
    }


def comm_bytes() -> dict:
    """Bytes per (group, op) of one training step, per rank; control messages apart."""
    from types import SimpleNamespace

    from fusedkv_megatron.training.checkpointing import TrainState
    from fusedkv_megatron.training.initialize import setup
    from fusedkv_megatron.training.loop import Trainer
    from tests.comm_counter import CollectiveCounter

    out = {}
    counter = CollectiveCounter().install()
    try:
        for name, tp, pp, sp, overlap in COMM_LAYOUTS:
            for variant in VARIANTS:
                args = _trainer_args(variant, tp, pp, sp, overlap)
                rt = setup(args)
                data = _samples(4 * args.global_batch_size)
                signals = SimpleNamespace(received=None)
                trainer = Trainer(rt, data, None, None, None, signals, None)
                it = trainer._data(data, 0)
                state = TrainState()
                counter.calls.clear()
                counter.counting = True
                trainer.train_step(
                    state, it, False, trainer.batch_sizes.at(state.consumed_train_samples)
                )
                counter.counting = False
                names = _group_names()
                totals, control = {}, 0
                for op, ranks, nbytes in counter.calls:
                    if nbytes <= CONTROL_BYTES:
                        control += nbytes
                        continue
                    group = names.get(ranks, f"group of {len(ranks)}")
                    if group == "pp" and op == "all_reduce":
                        group = "embedding"  # the first and last stage: the tied embedding
                    key = f"{group}/{op}"
                    totals[key] = totals.get(key, 0) + nbytes
                key = f"{name}/{variant}/pp={ps.get_pipeline_model_parallel_rank()}/" \
                      f"tp={ps.get_tensor_model_parallel_rank()}/" \
                      f"dp={ps.get_data_parallel_rank()}"  # fmt: skip
                out[key] = {"bytes": totals, "control": control, "vocab": rt.padded_vocab_size}
                del trainer, rt
                ps.destroy_model_parallel()
    finally:
        counter.uninstall()
    return out


def main(out_path: str) -> None:
    compat.apply()  # Megatron's CPU patches, before seeding
    dist.init_process_group("gloo")
    params, stages = tp2_pp2()
    results = {
        "parameters": _gather(params),
        "stages": _gather(stages),
        "saved": _gather(saved_tp2()),
        "comm": _gather(comm_bytes()),
    }
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
