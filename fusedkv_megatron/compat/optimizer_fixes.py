"""Fixes for three upstream bugs in DistributedOptimizer checkpointing without Apex/TE.

When neither NVIDIA Apex nor Transformer Engine is installed, Megatron-Core (0.16 to 0.19 at
least) wraps torch's AdamW, which keeps a `step` tensor per parameter, while the distributed
optimizer's checkpoint code assumes one step per param group. On CPU this is always the case;
on GPU machines without Apex/TE too. Three consequences (docs/upstream.md, section 3):

a. `sharded_state_dict(is_loading=True)` calls `state_dict()`, which asserts that all params
   share one step, and fails on a fresh optimizer (no state yet). Fix: before loading, create
   the states with one optimizer step at lr=0 and weight decay 0, so no parameter moves (the
   stock dummy-state helper uses the real lr/wd and lets DP shards silently diverge).
b. SILENTLY WRONG: `load_state_dict` puts ONE shared `step` tensor into every parameter's
   state; AdamW increments it once per parameter, so after resume the step counter advances by
   the number of parameters per iteration and the bias correction is wrong. Fix: give every
   parameter its own copy after loading. Only a resume-exactness test catches this.
c. `fully_reshardable` loading copies every live state key, including `step`, which the
   checkpoint's per-parameter state does not carry (KeyError 'step'), and copies in place into
   main params that are views of leaf tensors requiring grad (needs torch.no_grad()).
   SILENTLY WRONG with `dp_reshardable`: the `step` it copies is that of the state built for
   loading (1), not the saved one. Fix: never copy `step` there (load_state_dict has set it).

`apply()` patches the DistributedOptimizer class once; it does nothing when Apex or TE is
present (their fused Adam keeps the step per group). tests/integration/test_trainer_optimizer_fixes.py
checks that each bug still exists upstream without the fix and is gone with it.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.optimizer import distrib_optimizer as _do

DistributedOptimizer = _do.DistributedOptimizer

_originals: dict[str, object] = {}


def needed() -> bool:
    """True when Megatron uses torch's AdamW inside the distributed optimizer."""
    return not _do.HAVE_APEX_OR_TE


def init_state_without_update(optimizer: DistributedOptimizer) -> None:
    """Create Adam states (step 1, zero moments) with one step at lr=0, wd=0 (fix a)."""
    inner = optimizer.optimizer
    saved = [(g["lr"], g["weight_decay"]) for g in inner.param_groups]
    for g in inner.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
    try:
        # One parameter at a time: a zero gradient for all of them at once would hold a copy
        # of the weights in memory during a resume (docs/checkpoints.md).
        for g in inner.param_groups:
            for p in g["params"]:
                if p.numel():
                    p.grad = torch.zeros_like(p)
                    inner.step()
                    p.grad = None
    finally:
        for g, (lr, wd) in zip(inner.param_groups, saved, strict=True):
            g["lr"], g["weight_decay"] = lr, wd


def untie_steps(optimizer: DistributedOptimizer) -> None:
    """Give every parameter's state its own `step` tensor (fix b)."""
    for state in optimizer.optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.detach().clone()


def _sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
    # Also before a save when nothing has stepped yet (e.g. a signal before the first step).
    if len(self.optimizer.state) == 0:
        init_state_without_update(self)
    return _originals["sharded_state_dict"](
        self, model_sharded_state_dict or {}, is_loading=is_loading, **kwargs
    )


def _load_state_dict(self, state_dict):
    result = _originals["load_state_dict"](self, state_dict)
    untie_steps(self)
    return result


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    # A non-tensor entry is skipped by the upstream copy loop: keeps the live `step`, which
    # load_state_dict has just set from the saved param groups. (`dp_reshardable` hands over
    # the step of the state built for loading, 1 after init_state_without_update: copying it
    # would restart Adam's bias correction on every resume.)
    tensors = {**tensors, "step": None}
    with torch.no_grad():
        return _originals["_set_main_param_and_optimizer_states"](self, model_param, tensors)


_PATCHES = {
    "sharded_state_dict": _sharded_state_dict,
    "load_state_dict": _load_state_dict,
    "_set_main_param_and_optimizer_states": _set_main_param_and_optimizer_states,
}


def apply() -> bool:
    """Patch DistributedOptimizer once when needed. Returns True if the fixes are active."""
    if _originals:
        return True
    if not needed():
        return False
    for name, fn in _PATCHES.items():
        original = getattr(DistributedOptimizer, name)
        _originals[name] = original
        setattr(DistributedOptimizer, name, functools.wraps(original)(fn))
    return True


def remove() -> None:
    """Restore the upstream methods (for tests that show the bugs still exist upstream)."""
    for name, original in _originals.items():
        setattr(DistributedOptimizer, name, original)
    _originals.clear()
