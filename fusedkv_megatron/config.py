"""The KV-sharing configuration: which variant, which source layers, how fusion weights look.

Validation errors name the bad value, the rule and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS: tuple[str, ...] = (
    "vanilla",
    "gqa",
    "cla",
    "yoco",
    "fusedkv",
    "fusedkv_lite",
    "fusedkv_lite_learnable",
    "dense_probe",
)
# Variants whose top half (layers L/2+1..L) computes no K/V of its own.
TOP_HALF_VARIANTS = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable", "dense_probe")
# Variants with learnable per-channel fusion weights.
LEARNABLE_VARIANTS = ("fusedkv", "fusedkv_lite_learnable", "dense_probe")
# Variants whose sources are the configurable pair (bottom, middle) of `source_layers`.
SOURCE_PAIR_VARIANTS = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")
FUSION_INITS = ("normal", "lite", "uniform", "equivalent")


class KVSharingError(ValueError):
    """A KV-sharing configuration that cannot work, with the fix in the message."""


@dataclass(frozen=True)
class KVSharingConfig:
    """How a decoder shares K/V across layers (docs/model.md).

    variant: one of VARIANTS.
    source_layers: (bottom, middle) 1-based layer numbers whose post-RoPE K/V feed the top
        half; default (1, L/2). Used by fusedkv, fusedkv_lite(_learnable) and yoco (middle).
    weights_per_head: fusion weights of shape [kv_heads, head_dim] (True, the default) or one
        [head_dim] vector shared across KV heads (False).
    fusion_init: "normal" (the paper: every weight ~ N(0, 1)), "lite" (1 on the Lite source,
        0 on the others; our own sanity option, not from the paper) or "uniform" (every weight
        of a K or V with m terms = 1/m: an average that favours no source, the dense_probe's
        intended start) or "equivalent" (the paper's appendix: standard fusion starting as its
        iterative-fusion scheme with N(0, 1) auxiliary weights; docs/uptraining.md).

    dense_probe is the paper's information-flow probe (its Fig. 2): every top-half layer fuses
    the K (and V) of ALL storage layers 1..L/2 with learnable per-channel weights; its learned
    weights show which storage layers the top half reads (docs/research.md).
    """

    variant: str = "fusedkv"
    source_layers: tuple[int, int] | None = None
    weights_per_head: bool = True
    fusion_init: str = "normal"

    def sources(self, num_layers: int) -> tuple[int, int]:
        return self.source_layers if self.source_layers is not None else (1, num_layers // 2)

    @property
    def shares_kv(self) -> bool:
        return self.variant not in ("vanilla", "gqa")

    def validate(
        self,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int | None,
        tensor_parallel_size: int = 1,
        rotary_percent: float = 1.0,
    ) -> None:
        """Raise KVSharingError if this configuration cannot build a model."""
        v = self.variant
        if v not in VARIANTS:
            raise KVSharingError(
                f"kv_sharing={v!r} is not a known variant; choose one of {', '.join(VARIANTS)}"
            )
        if self.fusion_init not in FUSION_INITS:
            raise KVSharingError(
                f"fusion_init={self.fusion_init!r} is not known; choose 'normal' (the paper), "
                "'equivalent' (the paper's appendix), 'lite' or 'uniform'"
            )
        groups = num_query_groups or num_attention_heads
        if num_attention_heads % groups:
            raise KVSharingError(
                f"num_attention_heads={num_attention_heads} is not a multiple of "
                f"num_query_groups={groups}; pick a KV head count that divides the head count"
            )
        if groups % tensor_parallel_size:
            raise KVSharingError(
                f"num_query_groups={groups} is not divisible by tensor_model_parallel_size="
                f"{tensor_parallel_size}: every TP rank must own whole KV heads (fusion weights "
                f"and shared K/V are split by KV head); use a TP size that divides {groups}"
            )
        if v == "gqa" and groups >= num_attention_heads:
            raise KVSharingError(
                f"kv_sharing='gqa' needs fewer KV heads than query heads, got "
                f"num_query_groups={groups} and num_attention_heads={num_attention_heads}; set "
                f"num_query_groups={num_attention_heads // 2} (the paper's half-cache GQA)"
            )
        if not self.shares_kv:
            return
        if num_layers % 2:
            raise KVSharingError(
                f"num_layers={num_layers} must be even for {v}: the cache is shared between "
                f"halves (top half reads layers 1 and L/2); use {num_layers + 1} or "
                f"{num_layers - 1} layers"
            )
        if v in TOP_HALF_VARIANTS and num_layers < 4:
            raise KVSharingError(
                f"num_layers={num_layers} is too small for {v}: it needs L >= 4 so that layer 1 "
                "and layer L/2 are distinct storage layers"
            )
        if v in SOURCE_PAIR_VARIANTS:
            bottom, middle = self.sources(num_layers)
            n = num_layers // 2
            if not (1 <= bottom < middle <= n):
                raise KVSharingError(
                    f"source_layers={(bottom, middle)} out of range for num_layers={num_layers}: "
                    f"need 1 <= bottom < middle <= L/2 = {n} (sources must be storage layers); "
                    f"the default is (1, {n})"
                )
            if self.fusion_init == "equivalent" and v in LEARNABLE_VARIANTS and middle != n:
                raise KVSharingError(
                    f"fusion_init='equivalent' needs the middle source at L/2 = {n} (its "
                    f"iterative chain starts at layer L/2 + 1), got source_layers="
                    f"{(bottom, middle)}; use source_layers=(1, {n}) or another fusion_init"
                )
        elif self.source_layers is not None:
            raise KVSharingError(
                f"source_layers={self.source_layers} has no meaning for {v}; leave it unset"
            )
        if v in LEARNABLE_VARIANTS and rotary_percent != 1.0:
            raise KVSharingError(
                f"rotary_percent={rotary_percent} is not supported with {v}: key fusion weights "
                "are tied per RoPE pair over the whole head; use rotary_percent=1.0"
            )
