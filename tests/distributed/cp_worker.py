"""torchrun worker: context parallelism (CP=2, alone and with TP=2 (+SP) or PP=2, with and
without packed-document masks) against the CP=1, TP=PP=1 model, many cases per launch.

    torchrun --nproc-per-node 4 cp_worker.py CASES.json RESULTS.json

As the trainer runs it: every rank builds its model with `build_model`, copies the reference
weights in (TP-sharded, by global layer), wraps it in Megatron's DDP (gradients averaged over
data x context parallel ranks), feeds each microbatch through `batch_on_this_rank` (Megatron's
load-balanced split) and runs `get_forward_backward_func()`. The loss of each microbatch
(summed over CP ranks) and every gradient must equal the reference's; on PP cases every stage
also sends exactly the bytes `boundary_bytes` reports (s/CP rows of hidden state and sources).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
from collections import defaultdict

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

import fusedkv_megatron as F
from fusedkv_megatron import compat
from fusedkv_megatron.context_parallel import batch_on_this_rank
from fusedkv_megatron.pipeline import boundary_bytes, pipeline_schedule_kwargs
from tests.distributed.pipeline_worker import (
    VOCAB,
    global_name,
    make_config,
    make_kv,
    rel_err,
    tied,
    tp_shard,
)

SEQ, MBS, MICROBATCHES = 16, 2, 2
RTOL = 1e-5  # per tensor: max |diff| <= RTOL * max |reference|


def document_mask(lengths: list[int]) -> torch.Tensor:
    """Megatron's packed-document mask [1, s, s] (True = masked out): causal within a
    document, nothing across documents."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same = doc[:, None] == doc[None, :]
    causal = torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    return ~(same & causal)[None]


def batches(documents: bool) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for m in range(MICROBATCHES):
        ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        b = dict(
            tokens=ids[:, :-1].contiguous(),
            labels=ids[:, 1:].contiguous(),
            position_ids=torch.arange(SEQ).expand(MBS, SEQ),
        )
        if documents:
            # Boundaries inside and across the CP chunks (4 tokens each at CP=2).
            splits = ([5, 3, 8], [11, 5]) if m == 0 else ([1, 9, 6], [16])
            b["attention_mask"] = torch.stack([document_mask(s) for s in splits])
        out.append(b)
    return out


def forward_step(data_iterator, model):
    b = batch_on_this_rank(next(data_iterator), ps.get_context_parallel_group())
    out = model(b["tokens"], b["position_ids"], b.get("attention_mask"), labels=b["labels"])

    def loss_func(per_token_loss):
        total = per_token_loss.float().sum()
        count = torch.tensor(per_token_loss.numel(), dtype=torch.int)
        return total, count, {"loss": torch.stack([total.detach().clone(), count.float()])}

    return out, loss_func


def config_for(case: dict, parallel: bool):
    config = make_config(case, parallel)
    if parallel:
        config = dataclasses.replace(config, context_parallel_size=case["cp"])
    return config


def run_reference(case: dict) -> dict:
    """CP=TP=PP=1: the mean token loss per microbatch, every parameter and gradient."""
    torch.manual_seed(1234)
    model = F.build_model(config_for(case, False), make_kv(case), VOCAB, SEQ, **tied(case))
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches(case.get("documents", False))),
        model=model,
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
    )
    return dict(
        losses=[(d["loss"][0] / d["loss"][1]).item() for d in losses],
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: p.grad.detach().clone() for n, p in model.named_parameters()},
    )


def run_case(case: dict, ref: dict) -> dict:
    config = config_for(case, True)
    kv = make_kv(case)
    torch.manual_seed(99)
    model = F.build_model(config, kv, VOCAB, SEQ, **tied(case))
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = global_name(model, name)
            p.copy_(tp_shard(ref["params"][g], p, g, config))
    sent = []
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        model.register_forward_hook(lambda m, a, out: sent.append(out.numel() * out.element_size()))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    config.finalize_model_grads_func = finalize_model_grads
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches(case.get("documents", False))),
        model=ddp,
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        **pipeline_schedule_kwargs(config, kv, seq_length=SEQ, num_microbatches=MICROBATCHES),
    )
    errors, checked, worst = [], [], 0.0
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        got = []
        for d in losses:
            total = d["loss"].clone()
            dist.all_reduce(total, group=ps.get_context_parallel_group())
            got.append((total[0] / total[1]).item())
        if any(abs(a - b) > RTOL * abs(b) for a, b in zip(got, ref["losses"], strict=True)):
            errors.append(f"losses {got} != reference {ref['losses']}")
    for name, p in model.named_parameters():
        g = global_name(model, name)
        checked.append(g)
        err = rel_err(p.main_grad, tp_shard(ref["grads"][g], p, g, config))
        worst = max(worst, err)
        if err > RTOL:
            errors.append(f"{g}: gradient relative error {err:.2e}")
    if sent:
        expected = boundary_bytes(config, kv, MBS, SEQ)[0].total_bytes
        if set(sent) != {expected}:
            errors.append(f"stage sent {sorted(set(sent))} B per microbatch, expected {expected}")
    return dict(errors=errors, checked=checked, worst=worst)


def reference_key(case: dict) -> str:
    return json.dumps([case.get(k) for k in ("variant", "layers", "documents")])


def main(cases_path: str, results_path: str) -> None:
    compat.apply()  # Megatron's CPU patches, before seeding
    dist.init_process_group("gloo")
    cases = json.loads(open(cases_path).read())
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    refs = {}
    for case in cases:
        if reference_key(case) not in refs:
            refs[reference_key(case)] = run_reference(case)
    ps.destroy_model_parallel()

    by_layout = defaultdict(list)
    for case in cases:
        by_layout[(case.get("tp", 1), case.get("pp", 1), case["cp"])].append(case)
    results = {}
    for (tp, pp, cp), group in by_layout.items():
        ps.initialize_model_parallel(tp, pp, context_parallel_size=cp)
        model_parallel_cuda_manual_seed(1234)
        for case in group:
            try:
                out = run_case(case, refs[reference_key(case)])
            except Exception:
                traceback.print_exc()
                out = dict(errors=[traceback.format_exc()], checked=[], worst=None)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, out)
            seen = {n for o in gathered for n in o["checked"]}
            errors = [e for o in gathered for e in o["errors"]]
            missing = set(refs[reference_key(case)]["grads"]) - seen
            if missing and not errors:
                errors.append(f"parameters compared on no rank: {sorted(missing)}")
            results[case["name"]] = dict(
                errors=errors,
                worst=max((o["worst"] for o in gathered if o["worst"] is not None), default=None),
                checked=len(seen),
            )
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
