"""The three DistributedOptimizer checkpoint bugs (docs/upstream.md) still exist upstream without
fusedkv_megatron/compat/optimizer_fixes.py, and are gone with it. When an upstream release
fixes one, its "upstream still has the bug" assertion fails: drop that fix then."""

from __future__ import annotations

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.utils import unwrap_model

from fusedkv_megatron.compat import optimizer_fixes
from fusedkv_megatron.training.arguments import parse_args, validate_args
from fusedkv_megatron.training.checkpointing import (
    optimizer_metadata,
    use_in_process_write_queue,
)
from fusedkv_megatron.training.initialize import setup

OPTIMIZER_METADATA = optimizer_metadata(fully_reshardable=True)  # the format fix c is about

pytestmark = pytest.mark.skipif(
    not optimizer_fixes.needed(), reason="Apex/TE present: upstream keeps one step per group"
)


@pytest.fixture
def runtime(dist_single):
    args = parse_args(
        ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads",
         "2", "--seq-length", "16", "--micro-batch-size", "2", "--use-distributed-optimizer",
         "--train-iters", "4"]
    )  # fmt: skip
    validate_args(args, world_size=1, cuda=False)
    rt = setup(args)  # applies the fixes
    yield rt
    optimizer_fixes.apply()  # leave them applied for the other tests


def _inner(rt) -> DistributedOptimizer:
    (opt,) = rt.optimizer.chained_optimizers
    assert isinstance(opt, DistributedOptimizer)
    return opt


def _one_step(rt) -> None:
    for p in rt.model[0].parameters():
        p.main_grad.normal_()
    assert rt.optimizer.step()[0]


def _state(rt, loading: bool) -> dict:
    state = {"model": unwrap_model(rt.model[0]).sharded_state_dict()}
    state["optimizer"] = rt.optimizer.sharded_state_dict(
        state, is_loading=loading, metadata=OPTIMIZER_METADATA
    )
    return state


def _params(rt) -> list[torch.Tensor]:
    return [p.detach().clone() for p in rt.model[0].parameters()]


def test_a_fresh_optimizer_gets_states_without_moving_parameters(runtime):
    optimizer_fixes.remove()
    with pytest.raises(AssertionError):  # upstream: state_dict() asserts on a fresh optimizer
        _state(runtime, loading=True)
    optimizer_fixes.apply()
    before = _params(runtime)
    _state(runtime, loading=True)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(runtime), strict=True))
    steps = {float(s["step"]) for s in _inner(runtime).optimizer.state.values()}
    assert steps == {1.0}


def _save_and_reload(rt, tmp_path):
    _one_step(rt)
    _one_step(rt)
    tmp_path.mkdir(parents=True)
    use_in_process_write_queue()
    dist_checkpointing.save(_state(rt, loading=False), str(tmp_path))
    loaded = dist_checkpointing.load(_state(rt, loading=True), str(tmp_path))
    rt.optimizer.load_state_dict(loaded["optimizer"])


def test_fully_reshardable_load_keeps_the_step_and_needs_no_grad(runtime, tmp_path):
    optimizer_fixes.remove()
    with pytest.raises(KeyError, match="step"):  # upstream: copies a `step` it did not save
        _save_and_reload(runtime, tmp_path / "upstream")
    optimizer_fixes.apply()
    _save_and_reload(runtime, tmp_path / "fixed")


def test_every_parameter_gets_its_own_step_after_loading(runtime, tmp_path):
    fixed_load = DistributedOptimizer.load_state_dict
    DistributedOptimizer.load_state_dict = optimizer_fixes._originals["load_state_dict"]
    try:
        _save_and_reload(runtime, tmp_path / "upstream")
        states = list(_inner(runtime).optimizer.state.values())
        assert len({id(s["step"]) for s in states}) == 1  # upstream: one tensor shared by all
        _one_step(runtime)
        assert float(states[0]["step"]) == 2 + len(states)  # advanced once per parameter
    finally:
        DistributedOptimizer.load_state_dict = fixed_load
    _save_and_reload(runtime, tmp_path / "fixed")
    states = list(_inner(runtime).optimizer.state.values())
    assert len({id(s["step"]) for s in states}) == len(states)
    loaded = float(states[0]["step"])
    _one_step(runtime)
    assert {float(s["step"]) for s in states} == {loaded + 1}
