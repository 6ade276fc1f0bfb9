"""Which attention path a reconstruction layer takes: the fused Triton kernel or the
materialising path (fused K/V, then the spec's core attention). The kernels themselves are
functions of tensors (`fusedkv_megatron.kernels`); this is the policy that reads a Megatron
layer's configuration, device and dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import (
    BACKEND_ENV,
    head_dim_supported,
    launch_limit_blockers,
    log_fallback_once,
    requested_backend,
    use_triton,
)

PACKED_DOCUMENTS = "packed documents (an attention mask; the kernel has no document boundaries)"


def fused_kernel_blockers(
    config, head_dim: int, plan, training: bool = True, attn_mask_type="causal"
) -> list[str]:
    """Why the fused kernel cannot run a reconstruction layer of `plan` under the Megatron
    `config` (empty if it can). Independent of the device and dtype (see fused_attention_applies)."""
    why = []
    if training and config.attention_dropout > 0:
        why.append(f"attention_dropout={config.attention_dropout} (the kernel has no dropout)")
    if config.context_parallel_size != 1:
        # The kernel attends to the keys it is given; under CP the core attention gathers them.
        why.append(
            f"context_parallel_size={config.context_parallel_size} (the kernel has no CP: "
            "fused K/V, then the core attention's CP)"
        )
    if getattr(attn_mask_type, "name", attn_mask_type) != "causal":
        why.append(f"attn_mask_type={attn_mask_type} (causal only)")
    if config.softmax_type != "vanilla" or config.window_size is not None:
        why.append(f"softmax_type={config.softmax_type!r}, window_size={config.window_size}")
    if not head_dim_supported(head_dim):
        why.append(f"head_dim={head_dim} (a multiple of 16 up to 256)")
    if len(plan.key) > 2 or len(plan.value) > 2:
        why.append("more than two sources for K or V")
    return why


def _unsupported(module) -> list[str]:
    return fused_kernel_blockers(
        module.config,
        module.hidden_size_per_attention_head,
        module.plan,
        module.training,
        module.attn_mask_type,
    )


def fused_attention_applies(
    module,
    q: Tensor,
    backend: str | None = None,
    sources: list[Tensor] = (),
    attention_mask: Tensor | None = None,
) -> bool:
    """Whether a ReconstructionAttention `module` runs the Triton kernel for the query `q`
    (and the source tensors it would read): auto picks it on CUDA when q is fp16/bf16, the
    sources have q's dtype and the layer is supported (else the materializing path; fp32 would
    make the kernel's dots TF32) and the tensors fit the kernels' launch limits (grid size,
    int32 offsets: else the materializing path with one log line); a forced `triton` raises
    on an unsupported layer. An `attention_mask` (packed documents) takes the materializing
    path: the kernel is causal over one sequence and has no document boundaries."""
    if not use_triton(q, backend):
        return False
    why = _unsupported(module)
    if attention_mask is not None:
        why.append(PACKED_DOCUMENTS)
    mixed = sorted({str(x.dtype) for x in sources if x.dtype != q.dtype})
    if mixed:
        why.append(f"sources in {', '.join(mixed)} but the query in {q.dtype}")
    forced = requested_backend(backend) == "triton"
    limits = launch_limit_blockers(q, sources[0]) if sources and not why else []
    if limits and not forced and not why and q.dtype in (torch.float16, torch.bfloat16):
        log_fallback_once(f"layer {module.layer_number}", limits)
    why += limits
    if why and forced:
        raise RuntimeError(
            f"{BACKEND_ENV}=triton, but layer {module.layer_number} cannot use the fused "
            f"kernel: {'; '.join(why)}. Use auto or torch for this configuration"
        )
    return not why and (forced or q.dtype in (torch.float16, torch.bfloat16))
