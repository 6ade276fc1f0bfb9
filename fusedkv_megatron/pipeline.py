"""Pipeline parallelism for KV sharing: the sources cross stage boundaries with the hidden state.

Released Megatron-Core sends one tensor between pipeline stages and back-propagates one. A
boundary after global layer j must carry the sources that are alive there (`live_sources(plans,
j)`: published at or before j, read after j), with their gradients flowing back. We fold them
onto the hidden state the schedule already sends:

    sent = cat([hidden [s', b, h], fold(sources [n, s, b, g, d])], dim=-1)    s' = s/tp under SP

The last layer of a stage packs (its `out_sources`), the first layer of the next stage unpacks
(its `in_sources`); both are layers of the same global plan, so sender and receiver agree
without communication. Megatron's block forward, full activation recompute, the schedules and
`deallocate_pipeline_outputs` see one ordinary tensor, and gradients accumulate through it.

Everything that knows this layout is `SourcePayload`, so the routing can move to upstream's
multi-tensor pipeline payload (Megatron-LM issue 7565) by changing this module only.

For the trainer:
    qwen3_config(..., kv_sharing=kv)          a config with the p2p fields the layout needs
    build_model(...)                          stage models (checks them: check_pipeline_config)
    pipeline_schedule_kwargs(config, kv, ...) extra arguments of get_forward_backward_func()(...)
    boundary_bytes(config, kv, ...)           what each boundary carries, to log at start-up
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import Tensor

from .config import KVSharingConfig
from .fusion import Source, layer_plans, live_sources


class PipelineConfigError(ValueError):
    """A pipeline layout or schedule setting that cannot work, with the fix in the message."""


@dataclass(frozen=True)
class SourcePayload:
    """The live sources of one pipeline boundary, folded onto the hidden state.

    Sources arrive stacked, `[n, s, b, g, d]` (g = this TP rank's KV heads); they are
    full-sequence even under sequence parallelism, while the hidden state is `[s/fold, b, h]`
    (fold = TP size with SP, else 1). Folding views the sequence as `fold` slices and moves
    them into the channels: `[s/fold, b, n*fold*g*d]`. Each TP rank folds its own head shard,
    and the schedule sends it to the same TP rank of the next stage.
    """

    sources: tuple[Source, ...]
    hidden_size: int
    kv_heads: int
    head_dim: int
    fold: int
    dtype: torch.dtype

    @classmethod
    def for_config(cls, config: TransformerConfig, sources: tuple[Source, ...]) -> SourcePayload:
        tp = config.tensor_model_parallel_size
        return cls(
            sources=tuple(sources),
            hidden_size=config.hidden_size,
            kv_heads=(config.num_query_groups or config.num_attention_heads) // tp,
            head_dim=config.kv_channels,
            fold=tp if config.sequence_parallel else 1,
            dtype=config.params_dtype,
        )

    @property
    def extra_width(self) -> int:
        """Channels the sources add to the hidden state's last dimension."""
        return len(self.sources) * self.fold * self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        return self.hidden_size + self.extra_width

    def pack(self, hidden: Tensor, context: Tensor | None) -> Tensor:
        """hidden [s', b, h] and stacked sources [n, s, b, g, d] -> [s', b, width]."""
        if not self.sources:
            return hidden
        expected = (
            len(self.sources),
            hidden.shape[0] * self.fold,
            hidden.shape[1],
            self.kv_heads,
            self.head_dim,
        )
        if context is None or tuple(context.shape) != expected:
            got = None if context is None else tuple(context.shape)
            raise RuntimeError(
                f"pipeline payload {self.sources}: expected stacked sources of shape {expected} "
                f"next to hidden {tuple(hidden.shape)}, got {got}"
            )
        n, s, b, g, d = context.shape
        f = self.fold
        folded = (
            context.reshape(n, f, s // f, b, g, d)
            .permute(2, 3, 0, 1, 4, 5)
            .reshape(s // f, b, n * f * g * d)
        )
        return torch.cat([hidden, folded.to(hidden.dtype)], dim=-1)

    def unpack(self, packed: Tensor) -> tuple[Tensor, Tensor | None]:
        """[s', b, width] -> hidden [s', b, h] and stacked sources [n, s'*fold, b, g, d]."""
        if packed.shape[-1] != self.width:
            raise RuntimeError(
                f"received a pipeline tensor of width {packed.shape[-1]}, expected "
                f"{self.width} = hidden {self.hidden_size} + sources {self.sources} "
                f"({self.extra_width}); pass fusedkv_megatron.pipeline.pipeline_schedule_kwargs"
                "(...) to the forward_backward function and build every stage with build_model"
            )
        if not self.sources:
            return packed, None
        rows, b, _ = packed.shape
        n, f, g, d = len(self.sources), self.fold, self.kv_heads, self.head_dim
        # A contiguous copy: fused kernels (TE's LayerNormLinear) expect dense rows.
        hidden = packed[..., : self.hidden_size].contiguous()
        context = (
            packed[..., self.hidden_size :]
            .reshape(rows, b, n, f, g, d)
            .permute(2, 3, 0, 1, 4, 5)
            .reshape(n, f * rows, b, g, d)
            .to(self.dtype)
        )
        return hidden, context


def mark_stage_edges(layer_specs: list[ModuleSpec]) -> list[ModuleSpec]:
    """Make the first layer of a stage unpack what the previous stage sent and the last layer
    pack what the next stage needs. A no-op where nothing crosses (layer 1, layer L, vanilla)."""
    specs = list(layer_specs)
    if not specs or "in_sources" not in specs[0].params:
        return specs
    if specs[0].params["in_sources"]:
        specs[0] = replace(specs[0], params={**specs[0].params, "unpack_input": True})
    if specs[-1].params["out_sources"]:
        specs[-1] = replace(specs[-1], params={**specs[-1].params, "pack_output": True})
    return specs


# --- layout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One model chunk: pipeline rank, virtual stage (None without VPP), global layers [start, stop)."""

    pp_rank: int
    vp_stage: int | None
    start: int
    stop: int


def _layout_fix(config: TransformerConfig) -> str:
    pp, vp = config.pipeline_model_parallel_size, config.virtual_pipeline_model_parallel_size
    chunks = pp * (vp or 1)
    return (
        f"use num_layers divisible by pipeline_model_parallel_size{' x virtual size' if vp else ''}"
        f" = {chunks}, or set num_layers_in_first_pipeline_stage / "
        f"num_layers_in_last_pipeline_stage so the remaining layers split evenly over the "
        f"middle stages{' and each stage count is divisible by the virtual size' if vp else ''}"
    )


def pipeline_chunks(config: TransformerConfig) -> list[Chunk]:
    """Every model chunk in pipeline order (virtual stage major, then pipeline rank): the order
    activations flow in. Raises PipelineConfigError unless they cover layers 1..L exactly once."""
    if config.pipeline_model_parallel_layout is not None:
        raise PipelineConfigError(
            f"pipeline_model_parallel_layout={config.pipeline_model_parallel_layout!r} is not "
            "supported with KV sharing; use num_layers_in_first/last_pipeline_stage for "
            "uneven stages"
        )
    pp = config.pipeline_model_parallel_size
    vps = (
        range(config.virtual_pipeline_model_parallel_size)
        if (config.virtual_pipeline_model_parallel_size and pp > 1)
        else [None]
    )
    chunks = []
    for vp in vps:
        for rank in range(pp):
            try:
                start = get_transformer_layer_offset(config, vp_stage=vp, pp_rank=rank)
                count = get_num_layers_to_build(config, vp_stage=vp, pp_rank=rank)
            except AssertionError as e:
                raise PipelineConfigError(
                    f"num_layers={config.num_layers} cannot be split over "
                    f"pipeline_model_parallel_size={pp}, virtual_pipeline_model_parallel_size="
                    f"{config.virtual_pipeline_model_parallel_size}, "
                    f"num_layers_in_first_pipeline_stage="
                    f"{config.num_layers_in_first_pipeline_stage}, "
                    f"num_layers_in_last_pipeline_stage="
                    f"{config.num_layers_in_last_pipeline_stage} ({e}); {_layout_fix(config)}"
                ) from e
            chunks.append(Chunk(rank, vp, start, start + count))
    stop = 0
    for c in chunks:
        if c.start != stop or c.stop < c.start:
            break
        stop = c.stop
    if stop != config.num_layers or any(c.stop < c.start for c in chunks):
        listing = ", ".join(
            f"(pp {c.pp_rank}, vp {c.vp_stage}): {c.start + 1}..{c.stop}" for c in chunks
        )
        raise PipelineConfigError(
            f"num_layers={config.num_layers} is not split into consecutive stages by "
            f"pipeline_model_parallel_size={pp}, virtual_pipeline_model_parallel_size="
            f"{config.virtual_pipeline_model_parallel_size}, num_layers_in_first_pipeline_stage"
            f"={config.num_layers_in_first_pipeline_stage}, num_layers_in_last_pipeline_stage="
            f"{config.num_layers_in_last_pipeline_stage} (got {listing}); {_layout_fix(config)}"
        )
    return chunks


# --- schedule -------------------------------------------------------------------------------


def pipeline_p2p_fields(
    pipeline_model_parallel_size: int,
    virtual_pipeline_model_parallel_size: int | None,
    kv: KVSharingConfig | None = None,
) -> dict:
    """The TransformerConfig p2p fields a layout needs (`qwen3_config` sets them; empty unless
    interleaved).

    Interleaved (VPP): stages send tensors of different widths, which that schedule only
    supports through `variable_seq_lengths=True` (needed when `kv` shares K/V; with `kv` unknown
    it is asked for anyway: it only adds a shape exchange); and the default p2p settings
    (batch_p2p_comm=True, overlap_p2p_comm=False) silently swap activations and gradients at
    PP=2 (Megatron-LM issue 1450), so VPP always runs with batch_p2p_comm=False,
    overlap_p2p_comm=True, the setting Megatron-LM's own trainer defaults to.
    """
    if pipeline_model_parallel_size == 1 or virtual_pipeline_model_parallel_size is None:
        return {}
    fields = {"batch_p2p_comm": False, "overlap_p2p_comm": True}
    if kv is None or kv.shares_kv:
        fields["variable_seq_lengths"] = True
    return fields


def check_pipeline_config(config: TransformerConfig, kv: KVSharingConfig) -> None:
    """Check the pipeline layout and the p2p fields the schedules need; never changes `config`.

    Raises PipelineConfigError naming the field and the fix.
    """
    if config.pipeline_model_parallel_size == 1:
        return
    pipeline_chunks(config)
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        if config.overlap_p2p_comm:
            raise PipelineConfigError(
                "overlap_p2p_comm=True needs the interleaved schedule; set "
                "virtual_pipeline_model_parallel_size or overlap_p2p_comm=False"
            )
        return
    needed = pipeline_p2p_fields(config.pipeline_model_parallel_size, vpp, kv)
    wrong = {k: v for k, v in needed.items() if getattr(config, k) != v}
    if wrong:
        got = ", ".join(f"{k}={getattr(config, k)}" for k in wrong)
        want = ", ".join(f"{k}={v}" for k, v in wrong.items())
        raise PipelineConfigError(
            f"the interleaved pipeline schedule (virtual_pipeline_model_parallel_size={vpp}) "
            f"needs {want} in the TransformerConfig (got {got}): the stages exchange tensors "
            "of different widths, and Megatron's default p2p settings swap activations and "
            "gradients at this layout; build the config with qwen3_config(..., kv_sharing=kv), "
            "which sets them, or set them yourself (pipeline_p2p_fields gives the values)"
        )


def _stage_payloads(
    config: TransformerConfig, kv: KVSharingConfig, pp_rank: int
) -> tuple[SourcePayload, SourcePayload]:
    """What this (non-virtual) pipeline rank receives and sends."""
    plans = layer_plans(kv, config.num_layers) if kv.shares_kv else None
    chunk = next(c for c in pipeline_chunks(config) if c.pp_rank == pp_rank)

    def payload(after_layer: int) -> SourcePayload:
        sources = live_sources(plans, after_layer) if plans else ()
        return SourcePayload.for_config(config, sources)

    return payload(chunk.start), payload(chunk.stop)


def check_layout(
    config: TransformerConfig,
    kv: KVSharingConfig,
    *,
    seq_length: int,
    num_microbatches: int | None = None,
) -> None:
    """The rules of the parallel layout that Megatron's schedules would break on less clearly:
    layers over (virtual) stages, the sequence over TP (sequence parallel) and CP ranks, the
    interleaved schedule's microbatch count, the p2p fields the schedules need
    (`check_pipeline_config`). Raises PipelineConfigError; never changes `config`."""
    tp, cp = config.tensor_model_parallel_size, config.context_parallel_size
    split = cp * (tp if config.sequence_parallel else 1)
    if seq_length % split:
        sp = f" x tensor_model_parallel_size={tp} (sequence parallel)" if split != cp else ""
        raise PipelineConfigError(
            f"seq_length={seq_length} is not divisible by context_parallel_size={cp}{sp} = "
            f"{split}: the sequence is split over those ranks; use a multiple of {split} "
            f"(e.g. {seq_length - seq_length % split or split})"
            + (" or turn sequence parallelism off" if sp else "")
        )
    pp = config.pipeline_model_parallel_size
    if pp == 1:
        return
    check_pipeline_config(config, kv)
    vp = config.virtual_pipeline_model_parallel_size
    if vp is not None and num_microbatches is not None:
        group = config.microbatch_group_size_per_vp_stage or pp
        if num_microbatches < group or 0 < num_microbatches % group < pp:
            raise PipelineConfigError(
                f"num_microbatches={num_microbatches} does not fit the interleaved schedule "
                f"(pipeline_model_parallel_size={pp}, microbatch_group_size_per_vp_stage="
                f"{group}): it must be a multiple of {group} (or leave a remainder >= {pp}); "
                f"use {group * -(-num_microbatches // group)} microbatches (global_batch_size = "
                "micro_batch_size x data-parallel size x num_microbatches)"
            )


def pipeline_schedule_kwargs(
    config: TransformerConfig,
    kv: KVSharingConfig,
    *,
    seq_length: int,
    num_microbatches: int | None = None,
    pp_rank: int | None = None,
) -> dict:
    """Keyword arguments to add to `get_forward_backward_func()(...)` for this rank.

    1F1B: an `adjust_tensor_shapes_fn` widening the receive/send shapes by the sources that
    cross this rank's boundaries. Interleaved: nothing (shapes are exchanged, see
    `pipeline_p2p_fields`). Checks the layout first (`check_layout`).
    """
    check_layout(config, kv, seq_length=seq_length, num_microbatches=num_microbatches)
    if config.pipeline_model_parallel_size == 1 or config.virtual_pipeline_model_parallel_size:
        return {}
    if config.variable_seq_lengths or not kv.shares_kv:
        return {}
    if pp_rank is None:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    recv, send = _stage_payloads(config, kv, pp_rank)
    if not (recv.extra_width or send.extra_width):
        return {}

    def adjust_tensor_shapes_fn(recv_shapes, send_shapes):
        def widen(shapes, extra):
            return [(*s[:-1], s[-1] + extra) if len(s) else s for s in shapes]

        return widen(recv_shapes, recv.extra_width), widen(send_shapes, send.extra_width)

    return {"adjust_tensor_shapes_fn": adjust_tensor_shapes_fn}


# --- accounting -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundaryBytes:
    """One boundary's traffic per microbatch, per TP rank and per direction (the gradient
    sent back has the same size)."""

    sender: Chunk
    receiver: Chunk
    after_layer: int
    sources: tuple[Source, ...]
    hidden_bytes: int
    source_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.hidden_bytes + self.source_bytes

    def describe(self) -> str:
        """One log line, e.g. 'after layer 14 (pp 1 -> pp 2): hidden 32.0 MiB + 4 sources
        (K1 V1 K14 V14) 64.0 MiB'."""

        def where(c: Chunk) -> str:
            return f"pp {c.pp_rank}" + ("" if c.vp_stage is None else f" vp {c.vp_stage}")

        names = " ".join(f"{kind.upper()}{layer}" for layer, kind in self.sources)
        mib = 1 << 20
        return (
            f"after layer {self.after_layer} ({where(self.sender)} -> {where(self.receiver)}): "
            f"hidden {self.hidden_bytes / mib:.1f} MiB + {len(self.sources)} sources"
            f"{f' ({names})' if names else ''} {self.source_bytes / mib:.1f} MiB"
        )


def boundary_bytes(
    config: TransformerConfig,
    kv: KVSharingConfig,
    micro_batch_size: int,
    seq_length: int,
    dtype: torch.dtype | None = None,
) -> list[BoundaryBytes]:
    """Bytes each pipeline boundary carries, in pipeline order (PP*VPP - 1 boundaries).

    source_bytes = n_live * (s/cp) * b * (G/tp) * d * bytes(dtype), with n_live the number of
    sources alive after the boundary's layer, G the KV heads, d the head dim; hidden_bytes =
    (s/cp/(tp if SP)) * b * h * bytes(dtype). dtype defaults to the pipeline dtype.
    """
    dtype = dtype or config.pipeline_dtype or config.params_dtype
    esize = torch.empty((), dtype=dtype).element_size()
    tp, cp = config.tensor_model_parallel_size, config.context_parallel_size
    plans = layer_plans(kv, config.num_layers) if kv.shares_kv else None
    rows = seq_length // cp // (tp if config.sequence_parallel else 1)
    chunks = pipeline_chunks(config)
    out = []
    for sender, receiver in zip(chunks, chunks[1:], strict=False):
        sources = live_sources(plans, sender.stop) if plans else ()
        payload = SourcePayload.for_config(config, sources)
        out.append(
            BoundaryBytes(
                sender=sender,
                receiver=receiver,
                after_layer=sender.stop,
                sources=sources,
                hidden_bytes=rows * micro_batch_size * config.hidden_size * esize,
                source_bytes=rows * micro_batch_size * payload.extra_width * esize,
            )
        )
    return out


__all__ = [
    "BoundaryBytes",
    "Chunk",
    "PipelineConfigError",
    "SourcePayload",
    "boundary_bytes",
    "check_layout",
    "check_pipeline_config",
    "mark_stage_edges",
    "pipeline_chunks",
    "pipeline_p2p_fields",
    "pipeline_schedule_kwargs",
]
