"""Parameter and FLOP accounting of a Qwen3-style KV-sharing model, from its shape alone.

The analytic count lets configs be sized without building the model (a 4B model does not fit
a test machine); tests check it equals the built model's count for every variant. FLOPs are
model FLOPs (what MFU is measured against): 2 per multiply-add of every matmul, attention over
the full (causal, not halved) sequence as in Megatron-LM's accounting, backward = 2x forward.
Imports without torch: the memory planner (fusedkv_megatron.planner) builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import KVSharingConfig
from ..fusion import fusion_parameter_count, layer_plans
from .gpu_peaks import PEAK_BF16_TFLOPS, gpu_peak_tflops, peak_tflops  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # padded
    share_embeddings_and_output_weights: bool = False

    @classmethod
    def from_args(cls, args, padded_vocab_size: int) -> ModelShape:
        return cls(
            args.num_layers,
            args.hidden_size,
            args.ffn_hidden_size,
            args.num_attention_heads,
            args.num_query_groups,
            args.kv_channels,
            padded_vocab_size,
            not args.untie_embeddings_and_output_weights,
        )


def padded_vocab(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of make-vocab-size-divisible-by x TP."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _layer_matmul_params(shape: ModelShape, reconstruction: bool) -> int:
    h, d = shape.hidden_size, shape.kv_channels
    q, kv = shape.num_attention_heads * d, shape.num_query_groups * d
    attention = h * q + q * h + (0 if reconstruction else 2 * h * kv)
    return attention + 3 * h * shape.ffn_hidden_size  # SwiGLU: gate, up, down


def parameter_count(shape: ModelShape, kv: KVSharingConfig, with_embeddings: bool = True) -> int:
    """All parameters of the model (every stage, unsharded)."""
    h, d = shape.hidden_size, shape.kv_channels
    total = h  # final norm
    for plan in layer_plans(kv, shape.num_layers):
        rec = plan.is_reconstruction
        total += 2 * h + (d if rec else 2 * d)  # pre-attention/pre-MLP norms, q(/k) norm
        total += _layer_matmul_params(shape, rec)
    total += fusion_parameter_count(kv, shape.num_layers, shape.num_query_groups, d)
    if with_embeddings:
        total += shape.vocab_size * h * (1 if shape.share_embeddings_and_output_weights else 2)
    return total


@dataclass(frozen=True)
class ForwardFlops:
    """Forward model FLOPs per token, by part."""

    layer_matmuls: float  # projections and MLPs of every layer
    attention: float  # scores and weighted sum of every layer (full sequence)
    output_layer: float

    @property
    def total(self) -> float:
        return self.layer_matmuls + self.attention + self.output_layer


def forward_flops_per_token(
    shape: ModelShape, kv: KVSharingConfig, seq_length: int
) -> ForwardFlops:
    """Forward model FLOPs per token: 2 per multiply-add."""
    matmul = sum(
        _layer_matmul_params(shape, p.is_reconstruction) for p in layer_plans(kv, shape.num_layers)
    )
    attention = 2 * 2 * seq_length * shape.num_attention_heads * shape.kv_channels
    return ForwardFlops(
        2.0 * matmul,
        float(shape.num_layers * attention),
        2.0 * shape.vocab_size * shape.hidden_size,
    )


def flops_per_token(shape: ModelShape, kv: KVSharingConfig, seq_length: int) -> float:
    """Training model FLOPs per token (forward + backward)."""
    return 3.0 * forward_flops_per_token(shape, kv, seq_length).total
