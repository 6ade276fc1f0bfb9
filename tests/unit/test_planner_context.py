"""The planner under context parallelism: a rank keeps the activations of s/N tokens plus the
other ranks' K/V for backward; weights are alike and the optimizer is sharded over DP x CP; the
model FLOPs and tokens/s are the whole sequence's on all GPUs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fusedkv_megatron.config import KVSharingConfig
from fusedkv_megatron.planner.context import gathered_kv_bytes, plan_context_parallel
from fusedkv_megatron.planner.flops import throughput
from fusedkv_megatron.planner.layout import Job, Layout, Machine, PlanError
from fusedkv_megatron.planner.search import plan
from fusedkv_megatron.training.model_size import ModelShape

SHAPE = ModelShape(16, 1024, 2816, 16, 16, 64, 128000, True)
JOB = Job(SHAPE, KVSharingConfig("fusedkv"), 32768)
MACHINE = Machine(8, 1, 80.0)


def test_context_parallel_divides_activations_and_keeps_throughput():
    one = plan(JOB, Layout(dp=8, micro_batch_size=1, num_microbatches=8), MACHINE)
    two = plan_context_parallel(
        JOB, Layout(dp=4, micro_batch_size=1, num_microbatches=16), MACHINE, 2
    )
    (r1,), (r2,) = one.ranks, two.ranks
    assert r2.weights == r1.weights and r2.optimizer == r1.optimizer  # sharded over 8 either way
    local = plan(
        replace(JOB, seq_length=16384),
        Layout(dp=8, micro_batch_size=1, num_microbatches=16),
        MACHINE,
    )
    kv = gathered_kv_bytes(JOB, Layout(micro_batch_size=1), 2)
    assert kv == 2 * 16384 * 1 * 16 * 64 * 2  # K and V of the other half, bf16
    assert r2.activations == local.ranks[0].activations + 16 * kv  # 16 attention layers
    assert r2.activations < 0.6 * r1.activations
    assert two.speed.model_flops_per_step == pytest.approx(one.speed.model_flops_per_step)
    # tokens/s of the whole sequence on all 8 GPUs, at the CP run's 16 microbatches per step
    # (the CP=1 plan above has 8, which amortises the DP communication differently)
    same_steps = throughput(JOB, Layout(dp=8, micro_batch_size=1, num_microbatches=16), MACHINE)
    assert two.speed.tokens_per_s == pytest.approx(same_steps.tokens_per_s)


def test_full_recompute_frees_the_gathered_kv_and_bad_lengths_are_named():
    lay = Layout(dp=4, micro_batch_size=1, num_microbatches=16, recompute="full")
    local = plan(replace(JOB, seq_length=16384), replace(lay, dp=8), MACHINE)
    assert (
        plan_context_parallel(JOB, lay, MACHINE, 2).ranks[0].activations
        == local.ranks[0].activations
    )
    with pytest.raises(PlanError, match="not divisible by 2 x CP=8"):
        plan_context_parallel(replace(JOB, seq_length=32764), Layout(dp=2), MACHINE, 4)
