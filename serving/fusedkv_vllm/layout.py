"""How each layer of an exported FusedKV model is served: which cache it owns or reads, and
how its query and output are weighted. Pure Python (no torch, no vLLM), so it can be checked
anywhere.

The export's config.json names the variant (`kv_sharing`) and the source layers
(`kv_source_layers`, 1-based, default (1, L/2)); `kv_sharing_plan` below reproduces the exported
configuration's table (the project's test suite keeps the two equal).

Serving roles (0-based layer i):
- OWN: a storage layer with its own cache of head size d (vanilla, gqa, every storage layer that
  feeds no top layer, CLA's even layers, YOCO's middle layer).
- SHARE: reads one other layer's whole K and V unchanged (CLA's odd layers, YOCO's top half):
  vLLM's own `kv_sharing_target_layer_name`, no cache of its own.
- PAIR_BOTTOM / PAIR_MIDDLE / FUSED: the FusedKV family (fusedkv, fusedkv_lite,
  fusedkv_lite_learnable) reads two sources per top layer, possibly K from one and V from the
  other. One cache of head size 2d, owned by the bottom source b, holds [K_b | K_m] and
  [V_b | V_m] per token. Because the fusion weights act per channel,
      q . (a*K_b + c*K_m) = [q*a | q*c] . [K_b | K_m]
      P (e*V_b + f*V_m)   = e*(P V_b) + f*(P V_m)    (the two halves of P [V_b | V_m]),
  so a stock attention kernel over the 2d cache (softmax scale 1/sqrt(d)) serves layer b
  (query [q | 0], output's first half), layer m (query [0 | q], second half; it rewrites the new
  rows with both halves) and every top layer (query [q*a | q*c], output e*first + f*second).
"""

from __future__ import annotations

from dataclasses import dataclass

VARIANTS = (
    "vanilla",
    "gqa",
    "cla",
    "yoco",
    "fusedkv",
    "fusedkv_lite",
    "fusedkv_lite_learnable",
    "dense_probe",
)
SERVED = VARIANTS[:-1]
_TOP_HALF = ("yoco", "fusedkv", "fusedkv_lite", "fusedkv_lite_learnable", "dense_probe")
PAIR_VARIANTS = ("fusedkv", "fusedkv_lite", "fusedkv_lite_learnable")

OWN, SHARE, PAIR_BOTTOM, PAIR_MIDDLE, FUSED = "own", "share", "pair_bottom", "pair_middle", "fused"

# A term of a reconstructed K or V: (0-based source layer, weighted by a learnable vector).
Term = tuple[int, bool]
LayerPlan = tuple[tuple[Term, ...], tuple[Term, ...]] | None


class UnsupportedExport(ValueError):
    """An export or setup the plugin refuses to serve (the message names the reason and fix)."""


def kv_sharing_plan(
    variant: str, num_layers: int, source_layers: tuple[int, int] | list[int] | None = None
) -> list[LayerPlan]:
    """Per layer: None (own K/V) or (key terms, value terms); source_layers 1-based."""
    n = num_layers // 2
    bottom, middle = source_layers if source_layers is not None else (1, n)
    b, m = bottom - 1, middle - 1
    plans: list[LayerPlan] = [None] * num_layers
    if variant in _TOP_HALF:
        if variant == "dense_probe":
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


@dataclass(frozen=True)
class LayerRole:
    """role: OWN, SHARE, PAIR_BOTTOM, PAIR_MIDDLE or FUSED.
    target: the layer whose cache this layer reads (SHARE, PAIR_MIDDLE, FUSED), else None.
    key_terms / value_terms (FUSED): per half of the 2d cache (0: bottom, 1: middle), the index
    of the export's `key_weight_{j}` / `value_weight_{j}` on that half, "one" for an unweighted
    term, or None when the half is not used."""

    role: str
    target: int | None = None
    key_terms: tuple[int | str | None, int | str | None] = (None, None)
    value_terms: tuple[int | str | None, int | str | None] = (None, None)

    @property
    def has_kv_projections(self) -> bool:
        return self.role in (OWN, PAIR_BOTTOM, PAIR_MIDDLE)

    @property
    def wide_cache(self) -> bool:
        """Attends over the 2d cache."""
        return self.role in (PAIR_BOTTOM, PAIR_MIDDLE, FUSED)


@dataclass(frozen=True)
class ServingLayout:
    variant: str
    roles: tuple[LayerRole, ...]
    pair: tuple[int, int] | None  # (bottom, middle) 0-based for the FusedKV family

    def cache_owners(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r.role in (OWN, PAIR_BOTTOM)]

    def cache_units(self) -> int:
        """Cache size per token in units of one head-size-d layer (vanilla: L)."""
        return sum(
            2 if r.role == PAIR_BOTTOM else 1 for r in self.roles if r.role in (OWN, PAIR_BOTTOM)
        )

    def reads(self) -> dict[int, int]:
        """Layer -> the layer whose cache it reads, for every layer without its own cache."""
        return {i: r.target for i, r in enumerate(self.roles) if r.target is not None}


def _term_index(terms: tuple[Term, ...], layer: int) -> int | str | None:
    for j, (src, weighted) in enumerate(terms):
        if src == layer:
            return j if weighted else "one"
    return None


def serving_layout(
    variant: str, num_layers: int, source_layers: tuple[int, int] | list[int] | None = None
) -> ServingLayout:
    """The serving roles of every layer; raises UnsupportedExport for what cannot be served."""
    if variant == "dense_probe":
        raise UnsupportedExport(
            "kv_sharing='dense_probe' is a research probe (every top layer reads every storage "
            "layer, so it saves no cache): it is not served. Serve a fusedkv, fusedkv_lite, yoco "
            "or cla export instead"
        )
    if variant not in SERVED:
        raise UnsupportedExport(
            f"kv_sharing={variant!r} is not a known variant; the plugin serves {', '.join(SERVED)}"
        )
    plans = kv_sharing_plan(variant, num_layers, source_layers)
    if variant not in PAIR_VARIANTS:
        roles = [
            LayerRole(OWN) if p is None else LayerRole(SHARE, target=p[0][0][0]) for p in plans
        ]
        for i, p in enumerate(plans):  # one source for K and V, unweighted
            if p is not None and (p[0] != p[1] or len(p[0]) != 1 or p[0][0][1]):
                raise UnsupportedExport(f"layer {i}: plan {p} is not a plain share")
        return ServingLayout(variant, tuple(roles), None)
    n = num_layers // 2
    bottom, middle = source_layers if source_layers is not None else (1, n)
    b, m = bottom - 1, middle - 1
    roles = []
    for i, p in enumerate(plans):
        if p is None:
            roles.append(LayerRole(PAIR_BOTTOM if i == b else PAIR_MIDDLE if i == m else OWN,
                                   target=b if i == m else None))  # fmt: skip
            continue
        keys, values = p
        if {t[0] for t in keys + values} - {b, m}:
            raise UnsupportedExport(f"layer {i}: plan {p} reads a layer other than {b} and {m}")
        roles.append(
            LayerRole(
                FUSED,
                target=b,
                key_terms=(_term_index(keys, b), _term_index(keys, m)),
                value_terms=(_term_index(values, b), _term_index(values, m)),
            )
        )
    return ServingLayout(variant, tuple(roles), (b, m))


def layout_from_config(config) -> ServingLayout:
    """The layout of an export's configuration (an HF config object or config.json's dict)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    variant = get("kv_sharing", "vanilla") or "vanilla"
    layers = get("num_hidden_layers")
    layer_types = get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) or get("use_sliding_window", False):
        raise UnsupportedExport(
            f"layer_types={layer_types}: the plugin serves full attention on every layer only"
        )
    return serving_layout(variant, layers, get("kv_source_layers"))


def pipeline_stage_check(layout: ServingLayout, stages: list[tuple[int, int]]) -> None:
    """Refuse a pipeline split that puts a reader and the cache it reads on different stages
    (caches live on one worker). stages: [start, end) per pipeline rank."""

    def stage(layer: int) -> int:
        return next(s for s, (lo, hi) in enumerate(stages) if lo <= layer < hi)

    for reader, target in layout.reads().items():
        if stage(reader) != stage(target):
            raise UnsupportedExport(
                f"pipeline parallelism splits layer {reader} (stage {stage(reader)}) from the "
                f"layer whose KV cache it reads, {target} (stage {stage(target)}): a cache is "
                "local to one stage. Use --pipeline-parallel-size 1 (tensor parallelism works)"
            )


def kv_head_rows(total_kv_heads: int, rows: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """The rows [start, end) of a fusion weight [rows, w] that a tensor-parallel rank keeps.
    Per-KV-head weights (rows == total_kv_heads) follow the rank's KV heads, as vLLM shards
    them (when there are fewer KV heads than ranks, each rank holds one replicated head); a
    shared weight (rows == 1) is whole on every rank."""
    if rows == 1:
        return 0, 1
    if rows != total_kv_heads:
        raise UnsupportedExport(f"fusion weight with {rows} rows for {total_kv_heads} KV heads")
    if total_kv_heads >= tp_size:
        if total_kv_heads % tp_size:
            raise UnsupportedExport(
                f"{total_kv_heads} KV heads do not split over tensor parallel size {tp_size}"
            )
        per = total_kv_heads // tp_size
        return tp_rank * per, (tp_rank + 1) * per
    head = tp_rank // (tp_size // total_kv_heads)
    return head, head + 1
