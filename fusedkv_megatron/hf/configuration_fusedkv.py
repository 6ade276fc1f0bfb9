"""Hugging Face configuration of a FusedKV (arXiv 2512.03870) Qwen3-style decoder.

Exported next to the weights as remote code: imports only torch/transformers, never
fusedkv_megatron. It carries its own copy of the KV-sharing table (which layer reads which
source); the fusedkv_megatron test suite keeps it equal to the trainer's table.

Layers are 0-based here (HF), 1-based in Megatron. A top ("reconstruction") layer has
no K/V projections; its K and V are sums of other layers' post-k-norm, post-RoPE K/V.
"""

from __future__ import annotations

from transformers.models.qwen3.configuration_qwen3 import Qwen3Config

KV_SHARING_VARIANTS = (
    "vanilla",
    "gqa",
    "cla",
    "yoco",
    "fusedkv",
    "fusedkv_lite",
    "fusedkv_lite_learnable",
    "dense_probe",
)
_TOP_HALF = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable", "dense_probe")
_SOURCE_PAIR = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")
FUSION_INITS = ("normal", "lite", "uniform", "equivalent")

# A term of a reconstructed K or V: (0-based source layer, weighted by a learnable vector).
Term = tuple[int, bool]
# Per layer: None for a storage layer (own K/V), else (key terms, value terms).
LayerPlan = tuple[tuple[Term, ...], tuple[Term, ...]] | None


def kv_sharing_plan(
    variant: str, num_layers: int, source_layers: tuple[int, int] | list[int] | None = None
) -> list[LayerPlan]:
    """The plan of every layer for a KV-sharing variant (source_layers are 1-based, as in
    Megatron; default (1, L/2))."""
    n = num_layers // 2
    bottom, middle = source_layers if source_layers is not None else (1, n)
    b, m = bottom - 1, middle - 1
    plans: list[LayerPlan] = [None] * num_layers
    if variant in _TOP_HALF:
        if variant == "dense_probe":  # every storage layer feeds every top layer
            plan = (tuple((j, True) for j in range(n)), tuple((j, True) for j in range(n)))
        elif variant == "fusedkv":
            plan = (((b, True), (m, True)), ((b, True), (m, True)))
        elif variant == "yoco":
            plan = (((m, False),), ((m, False),))
        else:
            weighted = variant == "fusedkv_lite_learnable"
            plan = (((m, weighted),), ((b, weighted),))
        plans[n:] = [plan] * (num_layers - n)
    elif variant == "cla":
        for i in range(1, num_layers, 2):
            plans[i] = (((i - 1, False),), ((i - 1, False),))
    return plans


class FusedKVConfig(Qwen3Config):
    """Qwen3Config plus the KV-sharing layout.

    kv_sharing: one of KV_SHARING_VARIANTS; `kv_sharing_plan` gives every layer's sources.
    kv_source_layers: 1-based (bottom, middle) source layers; None means (1, L/2).
    fusion_weights_per_head: fusion weights [kv_heads, d] (True) or one shared [1, d] (False).
    fusion_init: "normal" (the paper), "lite", "uniform" or "equivalent", used only to
        initialise a fresh model.
    rotary_interleaved: RoPE pairs channels (2j, 2j+1) instead of (j, j + d/2) (rotate-half).
    """

    model_type = "fusedkv_qwen3"

    kv_sharing: str = "fusedkv"
    kv_source_layers: list[int] | None = None
    fusion_weights_per_head: bool = True
    fusion_init: str = "normal"
    rotary_interleaved: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_kv_sharing()

    def _check_kv_sharing(self) -> None:
        v, num_layers = self.kv_sharing, self.num_hidden_layers
        if v not in KV_SHARING_VARIANTS:
            raise ValueError(
                f"kv_sharing={v!r} is not a known variant; choose one of "
                f"{', '.join(KV_SHARING_VARIANTS)}"
            )
        if self.fusion_init not in FUSION_INITS:
            raise ValueError(
                f"fusion_init={self.fusion_init!r}: choose one of {', '.join(FUSION_INITS)}"
            )
        if any(t != "full_attention" for t in self.layer_types):
            raise ValueError(
                f"layer_types={self.layer_types} is not supported: FusedKV models use full "
                "attention on every layer (use_sliding_window=False)"
            )
        if v in ("vanilla", "gqa"):
            return
        if num_layers % 2 or (v in _TOP_HALF and num_layers < 4):
            raise ValueError(
                f"num_hidden_layers={num_layers} does not work with kv_sharing={v!r}: it needs an "
                "even layer count (and >= 4 for the top-half variants)"
            )
        if v == "dense_probe" and self.kv_source_layers is not None:
            raise ValueError(
                f"kv_source_layers={list(self.kv_source_layers)} has no meaning for dense_probe "
                "(it reads every storage layer); leave it unset"
            )
        if v in _SOURCE_PAIR and self.kv_source_layers is not None:
            bottom, middle = self.kv_source_layers
            if not 1 <= bottom < middle <= num_layers // 2:
                raise ValueError(
                    f"kv_source_layers={list(self.kv_source_layers)} out of range: need "
                    f"1 <= bottom < middle <= {num_layers // 2} (1-based storage layers)"
                )

    def layer_plans(self) -> list[LayerPlan]:
        return kv_sharing_plan(self.kv_sharing, self.num_hidden_layers, self.kv_source_layers)

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """Per layer "reuse" (no cache of its own), "store" (a source) or None. transformers'
        caches allocate nothing for "reuse" layers, so a cache holds storage layers only."""
        plans = self.layer_plans()
        sources = {t[0] for p in plans if p is not None for t in p[0] + p[1]}
        return [
            "reuse" if p is not None else ("store" if i in sources else None)
            for i, p in enumerate(plans)
        ]


__all__ = ["FusedKVConfig", "kv_sharing_plan"]
