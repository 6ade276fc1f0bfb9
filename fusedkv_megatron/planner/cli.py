"""`fusedkv-plan`: will a training run fit its GPUs, and how fast will it go?

    fusedkv-plan --config examples/configs/4b.yaml --gpus-per-node 8 --nodes 16 --gpu-memory 80
    fusedkv-plan --config examples/configs/4b.yaml --gpus-per-node 8 --nodes 16 --gpu-memory 80 --search

The model, parallel and batch flags are fusedkv-pretrain's (same names, same YAML, checked by
the trainer's own argument rules); the machine flags are added here. Data and tokenizer flags
are accepted and ignored, except --vocab-size (default: the paper's 128000). Exit codes: 0 the
layout fits (or --search found layouts), 1 it does not (none found), 2 bad input.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace

from ..config import KVSharingConfig, KVSharingError
from ..training.arguments import ArgumentError, build_parser, parse_args, validate_args
from ..training.model_size import PEAK_BF16_TFLOPS, ModelShape, parameter_count
from . import host_memory
from .comm import step_bytes
from .context import describe_context_parallel, plan_context_parallel
from .efficiency import Efficiency
from .flops import TERM_NAMES, TERMS
from .fusions import Fusions, add_fusion_flags
from .layout import GiB, Job, Layout, Machine, PlanError, layout_from_args
from .network import Network, network_for
from .search import Plan, bound_by, plan, search, ties, why_first

PAPER_VOCAB = 128_000


def planner_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "fusedkv-plan"
    p.description = (
        "Predict per-GPU memory and throughput of a fusedkv-pretrain run (plain Python, no GPU)."
    )
    g = p.add_argument_group("machine")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="per GPU, GiB")
    g.add_argument(
        "--gpu-kind",
        default="H100",
        help=f"for the bf16 peak: {', '.join(PEAK_BF16_TFLOPS)} (default H100)",
    )
    g.add_argument(
        "--reserve-gb",
        type=float,
        default=4.0,
        help="memory kept free for the CUDA context, NCCL and fragmentation (default 4 GiB)",
    )
    net = Network()
    g.add_argument(
        "--nvlink-gbps",
        type=float,
        default=None,
        metavar="GB/s",
        help=f"per GPU and direction inside a node (default by --gpu-kind; H100/H200 "
        f"SXM {net.intra_gbps:g})",
    )
    g.add_argument(
        "--network-gbps",
        type=float,
        default=None,
        metavar="GB/s",
        help=f"per GPU and direction between nodes (default {net.inter_gbps:g}: one "
        "400 Gb/s NIC per GPU)",
    )
    g.add_argument(
        "--network-efficiency",
        type=float,
        default=None,
        help=f"bus bandwidth a large collective reaches / link rate (default {net.efficiency:g})",
    )
    g.add_argument(
        "--nvlink-latency-us",
        type=float,
        default=None,
        help=f"per ring step inside a node (default {net.intra_latency_us:g})",
    )
    g.add_argument(
        "--network-latency-us",
        type=float,
        default=None,
        help=f"per ring step between nodes (default {net.inter_latency_us:g})",
    )
    g = p.add_argument_group("planner")
    eff = Efficiency()
    g.add_argument(
        "--gemm-efficiency",
        type=float,
        default=eff.ceiling,
        help=f"share of the bf16 peak a large GEMM sustains (default {eff.ceiling:g}; "
        "smaller GEMMs get less, docs/planner.md)",
    )
    g.add_argument(
        "--gemm-knee",
        type=float,
        default=eff.knee,
        help=f"GEMM dimension at which the efficiency halves (default {eff.knee:g})",
    )
    g.add_argument(
        "--attention-efficiency",
        type=float,
        default=eff.attention,
        help=f"attention model FLOPs / peak (default {eff.attention:g})",
    )
    g.add_argument("--search", action="store_true", help="list the layouts that fit, best first")
    g.add_argument("--top", type=int, default=15, help="--search: rows to show (default 15)")
    g.add_argument(
        "--norm-impl",
        choices=("fused", "composite"),
        default="fused",
        help="fused: TE / CUDA norms keep the bf16 input (GPU, default); composite: torch's "
        "RMSNorm as it runs on CPU keeps fp32 copies",
    )
    add_fusion_flags(p)
    return p


def trainer_view(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """The arguments as fusedkv-pretrain would derive them for `world_size` processes (the
    trainer's own rules and defaults); data, tokenizer and hardware checks are neutralised."""
    a = copy.copy(args)
    a.mock_data, a.data_path = True, None
    a.train_data_path = a.valid_data_path = a.test_data_path = None
    a.tokenizer_type, a.tokenizer_model = "NullTokenizer", None
    a.vocab_size = args.vocab_size or PAPER_VOCAB
    a.fp8_format, a.skip_train = None, False
    if a.train_iters is None and a.train_samples is None:
        a.train_iters = 1  # the plan does not depend on the training length
    if hasattr(a, "transformer_impl"):
        a.transformer_impl = "local"
    return validate_args(a, world_size=world_size, cuda=False)


def job_and_layout(args: argparse.Namespace, world_size: int) -> tuple[Job, Layout]:
    """A validated trainer namespace -> the planner's Job and Layout."""
    a = trainer_view(args, world_size)
    shape = ModelShape.from_args(a, a.vocab_size)
    kv = KVSharingConfig(
        variant=a.kv_sharing,
        source_layers=tuple(a.kv_source_layers) if a.kv_source_layers else None,
        weights_per_head=not a.shared_fusion_weights,
        fusion_init=a.fusion_init,
    )
    precision = "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32"
    # A planner run plans a GPU run: the fusions are on unless opted out, whatever the
    # trainer's CPU rules would make of them here.
    fusions = Fusions.from_args(args, planner_parser())
    job = Job(shape, kv, a.seq_length, precision, a.make_vocab_size_divisible_by, fusions)
    layout = layout_from_args(a)
    return job, layout


def machine_from_args(args: argparse.Namespace) -> Machine:
    """The machine flags -> Machine (the network from the GPU kind, flags override)."""
    net = network_for(args.gpu_kind)
    overrides = {
        "intra_gbps": args.nvlink_gbps,
        "inter_gbps": args.network_gbps,
        "efficiency": args.network_efficiency,
        "intra_latency_us": args.nvlink_latency_us,
        "inter_latency_us": args.network_latency_us,
    }
    net = replace(net, **{k: v for k, v in overrides.items() if v is not None})
    net.check()
    return Machine(
        args.gpus_per_node, args.nodes, args.gpu_memory, args.gpu_kind, args.reserve_gb, net
    )


def efficiency_from_args(args: argparse.Namespace) -> Efficiency:
    eff = Efficiency(args.gemm_efficiency, args.gemm_knee, args.attention_efficiency)
    eff.check()
    return eff


def plan_from_argv(argv: list[str]) -> tuple[Plan, argparse.Namespace]:
    """Parse fusedkv-plan's command line (YAML + flags) and plan the layout it gives. Raises
    ArgumentError/PlanError/KVSharingError/ValueError for bad input, SystemExit for flags
    argparse rejects."""
    args = parse_args(argv, planner_parser())
    machine = machine_from_args(args)
    job, layout = job_and_layout(args, machine.gpus)
    eff = efficiency_from_args(args)
    if args.context_parallel_size > 1:  # context.py: the sequence split over CP ranks
        cp = args.context_parallel_size
        return plan_context_parallel(job, layout, machine, cp, eff, args.norm_impl), args
    return plan(job, layout, machine, eff, args.norm_impl), args


def layout_flags(layout: Layout) -> list[str]:
    """The fusedkv-pretrain flags that select `layout` (given the same machine and batch)."""
    flags = [
        "--tensor-model-parallel-size",
        str(layout.tp),
        "--pipeline-model-parallel-size",
        str(layout.pp),
        "--sequence-parallel" if layout.sequence_parallel else "--no-sequence-parallel",
        "--micro-batch-size",
        str(layout.micro_batch_size),
    ]
    if layout.vpp:
        flags += ["--virtual-pipeline-model-parallel-size", str(layout.vpp)]
    if layout.recompute != "none":
        flags += ["--recompute-granularity", layout.recompute]
    if layout.recompute == "full":
        flags += [
            "--recompute-method",
            layout.recompute_method,
            "--recompute-num-layers",
            str(layout.recompute_num_layers),
        ]
    return flags


def summary(p: Plan) -> str:
    """One line: the per-GPU peak against the usable memory, and the throughput."""
    m, r, sp = p.machine, p.worst_rank, p.speed
    return (
        f"peak {gib(p.peak)} GiB per GPU of {gib(m.usable_bytes)} usable ({m.gpu_memory_gb:g} GiB "
        f"{m.gpu_kind}, {m.reserve_gb:g} reserved): {'fits' if p.fits else 'DOES NOT FIT'}; "
        f"weights+grads+optimizer {gib(r.static)}, activations {gib(r.activations)} "
        f"({r.in_flight} microbatch(es) in flight), transient {gib(r.transient)}; "
        f"{sp.tokens_per_s:,.0f} tokens/s, {sp.step_time_s:.2f} s/step (predicted MFU "
        f"{sp.mfu:.0%}, bound by {bound_by(p)})"
    )


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f}"


def describe_plan(p: Plan) -> str:
    """A readable report of one plan: model, machine, per-rank memory, throughput, verdict."""
    j, lay, m = p.job, p.layout, p.machine
    s = j.padded_shape(lay)
    lines = [
        f"model: {j.kv.variant}, {s.num_layers} layers, hidden {s.hidden_size}, ffn "
        f"{s.ffn_hidden_size}, heads {s.num_attention_heads}/{s.num_query_groups} KV x "
        f"{s.kv_channels}, vocab {s.vocab_size} (padded), "
        f"{parameter_count(s, j.kv) / 1e6:.1f}M parameters; seq {j.seq_length}, "
        f"global batch {lay.global_batch_size}, {j.precision}",
        f"machine: {m.nodes} node(s) x {m.gpus_per_node} {m.gpu_kind} ({m.gpu_memory_gb:g} GiB, "
        f"{m.reserve_gb:g} reserved -> {gib(m.usable_bytes)} usable); bf16 peak "
        f"{m.peak_tflops:g} TFLOP/s; network {m.net.intra_gbps:g} GB/s in a node, "
        f"{m.net.inter_gbps:g} GB/s between nodes per GPU (x{m.net.efficiency:g} reached"
        f"{', H100 SXM figures assumed for this kind' if m.net.assumed else ''})",
        f"fusions: {j.fusions.describe()}",
        f"layout: {lay.describe()}{'' if lay.distributed_optimizer else ' (no distributed optimizer)'}",
        "per GPU, GiB:  pp rank  params(M)  weights  grads  optim  activations (held)  "
        "transient  peak",
    ]
    for r in p.ranks:
        lines.append(
            f"               {r.pp_rank:>7}  {r.parameters / 1e6:>9.1f}  {gib(r.weights):>7}  "
            f"{gib(r.gradients):>5}  {gib(r.optimizer):>5}  {gib(r.activations):>11} "
            f"({r.in_flight:>2} mb)  {gib(r.transient):>9}  {gib(r.peak):>4}"
        )
    for r in p.ranks:
        for vp, a in enumerate(r.per_microbatch):
            where = f"pp rank {r.pp_rank}" + (f" chunk {vp}" if lay.vpp else "")
            parts = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in a.parts.items() if v)
            received = f", received payload {a.payload_in / 2**20:,.0f}" if a.payload_in else ""
            lines.append(f"per microbatch, MiB ({where}): {parts}{received}")
    sp = p.speed
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += [
        f"peak per GPU: {gib(p.peak)} GiB of {gib(m.usable_bytes)} usable -> {verdict}",
        f"communication per GPU and step, MiB: {comm_line(p)}",
        f"step time, s: {terms_line(p)}",
        f"throughput: {sp.model_flops_per_step:.3e} model FLOPs/step, step {sp.step_time_s:.3f} s, "
        f"{sp.tokens_per_s:,.0f} tokens/s, predicted MFU {sp.mfu:.1%}; bound by {bound_by(p)}",
    ]
    return "\n".join(lines)


def comm_line(p: Plan) -> str:
    """Bytes per (group, op) of the busiest pipeline rank."""
    worst = max(range(p.layout.pp), key=lambda r: sum(step_bytes(p.job, p.layout, r).values()))
    got = step_bytes(p.job, p.layout, worst)
    parts = [f"{g} {op.replace('_', '-')} {n / 2**20:,.1f}" for (g, op), n in sorted(got.items())]
    return ", ".join(parts) or "none"


def terms_line(p: Plan) -> str:
    t = p.speed.terms
    return ", ".join(f"{TERM_NAMES[k]} {t[k]:.3f}" for k in TERMS if t.get(k))


def search_table(plans: list[Plan], top: int) -> str:
    """The ranked layouts as a table: the step's terms, what bounds it, and ties."""
    head = (
        " #  TP  SP  PP  VPP   DP  mbs    m  recompute  peak GiB  compute     TP     DP     PP"
        "  bubble  step s   tokens/s  bound by\n"
        "--  --  --  --  ---  ---  ---  ---  ---------  --------  -------  -----  -----  -----"
        "  ------  ------  ---------  --------"
    )
    rows, tie = [head], ties(plans)
    for i, p in enumerate(plans[:top]):
        lay, t = p.layout, p.speed.terms
        mark = f"  (ties #{tie[i] + 1})" if tie[i] != i else ""
        rows.append(
            f"{i + 1:>2}  {lay.tp:>2}  {'on' if lay.sequence_parallel else '- ':>2}  {lay.pp:>2}  "
            f"{lay.vpp or 1:>3}  {lay.dp:>3}  {lay.micro_batch_size:>3}  "
            f"{lay.num_microbatches:>3}  {lay.recompute:>9}  {gib(p.peak):>8}  "
            f"{t['compute'] + t['recompute']:>7.3f}  {t['tp']:>5.3f}  {t['dp']:>5.3f}  "
            f"{t['pp']:>5.3f}  {t['bubble']:>6.3f}  {p.speed.step_time_s:>6.3f}  "
            f"{p.speed.tokens_per_s:>9,.0f}  {bound_by(p)}{mark}"
        )
    if len(plans) > top:
        rows.append(f"... {len(plans) - top} more (--top N)")
    groups = sum(1 for i, j in enumerate(tie) if i != j)
    if not groups and plans:
        rows.append(
            f"no ties: each of the {len(plans)} layouts has its own predicted step time (rows "
            "closer than 1% are within the model's error, docs/planner.md)"
        )
    if groups:
        rows.append(
            f"{groups} layout(s) tie with a better-ranked one (the same predicted step time): "
            "they are ordered by headroom, less model parallelism, larger micro-batch. The "
            "model's assumptions (docs/planner.md) are coarser than 1%: rows closer than that "
            "are a toss-up"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    try:
        given, args = plan_from_argv(sys.argv[1:] if argv is None else argv)
    except (ArgumentError, PlanError, KVSharingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe_plan(given))
    if args.context_parallel_size > 1:
        print(describe_context_parallel(given.job, given.layout, args.context_parallel_size))
    print(host_memory.plan_line(given, args))
    if not args.search:
        return 0 if given.fits else 1
    job, layout, machine = given.job, given.layout, given.machine
    eff = efficiency_from_args(args)
    found = search(job, machine, layout.global_batch_size, layout, eff, args.norm_impl)
    print(
        f"\nlayouts that fit {machine.nodes} x {machine.gpus_per_node} x "
        f"{args.gpu_memory:g} GiB at global batch {layout.global_batch_size}, best estimated "
        f"throughput first; step-time terms in seconds:"
    )
    print(search_table(found, args.top) if found else "none")
    if found:
        print("\nwhy the first:\n" + why_first(found))
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
