"""torchrun worker: pipeline-parallel runs (1F1B and interleaved, with TP/SP, uneven stages and
recompute) against a PP=1 reference, many cases per launch.

    torchrun --nproc-per-node N pipeline_worker.py CASES.json RESULTS.json

Each process first builds the PP=1, TP=1 reference of every model in CASES (same seed, CPU
init: identical on every rank) and runs it with Megatron's no-pipelining schedule. Then, per
parallel layout, it builds its stage models with `build_model`, copies the reference weights
in by global layer index (sharded like Megatron shards them), runs the real
`get_forward_backward_func()` schedule over the same microbatches and compares every loss and
every gradient (TP-reduced as finalize_model_grads does) with the reference. It also records
the width of every tensor a stage sends and compares it with `boundary_bytes`.
"""

from __future__ import annotations

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
from megatron.core.distributed.finalize_model_grads import (
    _allreduce_non_tensor_model_parallel_grads,
)
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

import fusedkv_megatron as F
from fusedkv_megatron import compat
from fusedkv_megatron.pipeline import boundary_bytes, pipeline_schedule_kwargs

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN, VOCAB = 16, 4, 2, 8, 32, 64
SEQ, MBS, MICROBATCHES = 8, 2, 4
RTOL = 1e-5  # per tensor: max |diff| <= RTOL * max |reference|


def make_config(case: dict, parallel: bool):
    groups = HEADS if case["variant"] == "vanilla" else GROUPS
    fields = dict(
        num_query_groups=groups,
        kv_channels=HEAD_DIM,
        ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
    )
    if parallel:
        fields.update(
            tensor_model_parallel_size=case.get("tp", 1),
            pipeline_model_parallel_size=case["pp"],
            virtual_pipeline_model_parallel_size=case.get("vpp"),
            sequence_parallel=case.get("sp", False),
            num_layers_in_first_pipeline_stage=case.get("first"),
            num_layers_in_last_pipeline_stage=case.get("last"),
            deallocate_pipeline_outputs=True,
        )
        if case.get("recompute") == "selective":
            fields.update(recompute_granularity="selective")  # core attention
        elif case.get("recompute"):
            fields.update(
                recompute_granularity="full",
                recompute_method=case["recompute"],
                recompute_num_layers=1,
            )
    return F.qwen3_config(case["layers"], HIDDEN, HEADS, **fields)


def make_kv(case: dict) -> F.KVSharingConfig:
    return F.KVSharingConfig(
        case["variant"],
        source_layers=tuple(case["sources"]) if case.get("sources") else None,
        weights_per_head=case.get("per_head", True),
    )


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(MICROBATCHES):
        ids = torch.randint(0, VOCAB, (MBS, SEQ + 1), generator=g)
        out.append(
            dict(
                tokens=ids[:, :-1].contiguous(),
                labels=ids[:, 1:].contiguous(),
                position_ids=torch.arange(SEQ).expand(MBS, SEQ),
            )
        )
    return out


def forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def tied(case: dict) -> dict:
    return dict(share_embeddings_and_output_weights=bool(case.get("tied")))


def reference_key(case: dict) -> str:
    keys = ("variant", "layers", "sources", "per_head", "tied")
    return json.dumps([case.get(k) for k in keys])


def run_reference(case: dict) -> dict:
    """PP=1, TP=1: losses per microbatch and every parameter and gradient by name."""
    torch.manual_seed(1234)
    config = make_config(case, parallel=False)
    model = F.build_model(config, make_kv(case), VOCAB, SEQ, **tied(case))
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches()),
        model=model,
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
    )
    return dict(
        losses=[d["loss"].item() for d in losses],
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        grads={n: p.grad.detach().clone() for n, p in model.named_parameters()},
    )


def global_name(chunk, name: str) -> str:
    """decoder.layers.<local>.… -> decoder.layers.<global>.…; a tied output layer is the
    embedding."""
    if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"
    if name.startswith("decoder.layers."):
        local, rest = name[len("decoder.layers.") :].split(".", 1)
        return f"decoder.layers.{chunk.decoder.layers[int(local)].layer_number - 1}.{rest}"
    return name


def tp_shard(full: torch.Tensor, param, name: str, config) -> torch.Tensor:
    """This TP rank's piece of a TP=1 tensor, as Megatron lays it out."""
    tp = ps.get_tensor_model_parallel_world_size()
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    rank = ps.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if "linear_fc1" in name and config.gated_linear_unit:
        # SwiGLU: the TP=1 rows are [gate; up]; each rank holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim)[rank], up.chunk(tp, dim)[rank]], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def run_case(case: dict, ref: dict) -> dict:
    config = make_config(case, parallel=True)
    kv = make_kv(case)
    vpp = case.get("vpp")
    chunks = []
    for v in range(vpp or 1):
        torch.manual_seed(99)
        chunks.append(
            F.build_model(config, kv, VOCAB, SEQ, vp_stage=v if vpp else None, **tied(case))
        )
    # Copy the reference weights in.
    for chunk in chunks:
        with torch.no_grad():
            for name, p in chunk.named_parameters():
                g = global_name(chunk, name)
                p.copy_(tp_shard(ref["params"][g], p, g, config))
    # Record what every non-last chunk sends.
    sent: dict[int, tuple] = {}
    for v, chunk in enumerate(chunks):
        if not ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v if vpp else None):
            chunk.register_forward_hook(
                lambda m, a, out, v=v: sent.__setitem__(v, (tuple(out.shape), out.element_size()))
            )
    schedule_kwargs = pipeline_schedule_kwargs(
        config, kv, seq_length=SEQ, num_microbatches=MICROBATCHES
    )
    if case.get("upstream_p2p_defaults"):
        # Negative control: Megatron's defaults, which qwen3_config replaces for VPP.
        config.batch_p2p_comm, config.overlap_p2p_comm = True, False
    modules = chunks
    if case.get("ddp"):
        # As the trainer runs it: DDP grad buffers, finalize_model_grads (TP norms, tied
        # embedding across the first and last stage) called by the schedule.
        modules = [
            DistributedDataParallel(
                config, DistributedDataParallelConfig(), c, disable_bucketing=i > 0
            )
            for i, c in enumerate(chunks)
        ]
        config.finalize_model_grads_func = finalize_model_grads
    data = batches()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(data) for _ in chunks] if vpp else iter(data),
        model=modules if vpp else modules[0],
        num_microbatches=MICROBATCHES,
        seq_length=SEQ,
        micro_batch_size=MBS,
        **schedule_kwargs,
    )
    if not case.get("ddp"):
        # What finalize_model_grads does across TP (sequence-parallel norms, q/k norms).
        for chunk in chunks:
            chunk.ddp_config = DistributedDataParallelConfig()
        tp_group = ps.get_tensor_model_parallel_group()
        _allreduce_non_tensor_model_parallel_grads(chunks, config, tp_group)

    errors, checked = [], []
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        got = [d["loss"].item() for d in losses]
        if len(got) != MICROBATCHES or any(
            abs(a - b) > RTOL * abs(b) for a, b in zip(got, ref["losses"], strict=False)
        ):
            errors.append(f"losses {got} != reference {ref['losses']}")
    worst = 0.0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            g = global_name(chunk, name)
            checked.append(g)
            grad = p.main_grad if case.get("ddp") else p.grad
            if grad is None:
                errors.append(f"{g}: no gradient")
                continue
            err = rel_err(grad, tp_shard(ref["grads"][g], p, g, config))
            worst = max(worst, err)
            if err > RTOL:
                errors.append(f"{g}: gradient relative error {err:.2e}")
    # The widths actually sent equal boundary_bytes (the minimum: hidden + live sources).
    expected = {
        (b.sender.pp_rank, b.sender.vp_stage): b.total_bytes
        for b in boundary_bytes(config, kv, MBS, SEQ)
    }
    rank = ps.get_pipeline_model_parallel_rank()
    for v, (shape, esize) in sent.items():
        key = (rank, v if vpp else None)
        nbytes = esize * int(torch.tensor(shape).prod())
        if nbytes != expected[key]:
            errors.append(f"chunk {key} sent {shape} = {nbytes} B, boundary_bytes {expected[key]}")
    return dict(
        errors=errors, checked=checked, worst=worst, sent={str(k): v for k, v in sent.items()}
    )


def layout_key(case: dict) -> tuple:
    return case.get("tp", 1), case["pp"], case.get("vpp")


def main(cases_path: str, results_path: str) -> None:
    compat.apply()  # Megatron's CPU patches, before seeding
    dist.init_process_group("gloo")
    cases = json.loads(open(cases_path).read())
    # References first, at TP=PP=1 (the other ranks are data-parallel replicas).
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    refs = {}
    for case in cases:
        key = reference_key(case)
        if key not in refs:
            refs[key] = run_reference(case)
    ps.destroy_model_parallel()

    by_layout = defaultdict(list)
    for case in cases:
        by_layout[layout_key(case)].append(case)
    results = {}
    for (tp, pp, vpp), group in by_layout.items():
        ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp)
        model_parallel_cuda_manual_seed(1234)
        for case in group:
            try:
                out = run_case(case, refs[reference_key(case)])
            except Exception:
                traceback.print_exc()
                out = dict(errors=[traceback.format_exc()], checked=[], worst=None, sent={})
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, out)
            ref_names = set(refs[reference_key(case)]["grads"])
            seen = [n for o in gathered for n in o["checked"]]
            errors = [e for o in gathered for e in o["errors"]]
            missing = ref_names - set(seen)
            if missing and not any("Traceback" in e for e in errors):
                errors.append(f"parameters compared on no rank: {sorted(missing)}")
            results[case["name"]] = dict(
                errors=errors,
                worst=max((o["worst"] for o in gathered if o["worst"] is not None), default=None),
                sent=[o["sent"] for o in gathered],
                checked=len(set(seen)),
            )
        ps.destroy_model_parallel()
    if dist.get_rank() == 0:
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
