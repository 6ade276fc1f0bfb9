"""The FusedKV math, in one place: who reads which source, and how sources are fused.

Every layer gets a `LayerPlan`. A storage layer computes its own K/V and may publish them as
sources for later layers; a reconstruction layer computes no K/V and builds them as a sum of
(optionally per-channel weighted) sources. A variant is a rule in `layer_plans`, nothing more.

A source is `(layer_number, "k" | "v")`: the post-k-norm, post-RoPE key (or the value) of that
layer, `[s, b, kv_heads, head_dim]`. Which sources are alive between two layers (published
before, read after) is `live_sources`; it is what a pipeline boundary has to carry.

The plans and the accounting import without torch (the memory planner runs on login nodes
without it); the tensor functions reach torch through their arguments or a local import.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import KVSharingConfig

if TYPE_CHECKING:
    import torch

Source = tuple[int, str]


@dataclass(frozen=True)
class Term:
    """One summand of a reconstructed K or V: a source, times a learnable vector if weighted."""

    source: Source
    weighted: bool


@dataclass(frozen=True)
class LayerPlan:
    layer_number: int
    key: tuple[Term, ...] = ()
    value: tuple[Term, ...] = ()
    publishes: tuple[Source, ...] = ()

    @property
    def is_reconstruction(self) -> bool:
        return bool(self.key)

    @property
    def reads(self) -> tuple[Source, ...]:
        return tuple(t.source for t in self.key + self.value)

    def fusion_terms(self) -> list[tuple[str, int, Term]]:
        """(kind, index, term) of every weighted term: the fusion weights this layer owns,
        named `fusion_weight_name(kind, index)`."""
        return [
            (kind, i, term)
            for kind, terms in (("key", self.key), ("value", self.value))
            for i, term in enumerate(terms)
            if term.weighted
        ]


# The parameter names of the fusion weights: one owner for modules, optimizer groups,
# reporting, initialisation and the HF mapping (the exported HF model keeps its own copy).
FUSION_WEIGHT_GLOBS = ("*.key_weight_*", "*.value_weight_*")
FUSION_WEIGHT_RE = re.compile(r"(key|value)_weight_(\d+)$")


def fusion_weight_name(kind: str, index: int) -> str:
    """The parameter name of term `index` of "key" or "value" (`key_weight_0`, ...)."""
    return f"{kind}_weight_{index}"


def parse_fusion_weight_name(name: str) -> tuple[str, int] | None:
    """(kind, index) of a fusion-weight parameter name (dotted or not), else None."""
    m = FUSION_WEIGHT_RE.fullmatch(name.rsplit(".", 1)[-1])
    return (m[1], int(m[2])) if m else None


def _terms(kind: str, layers: tuple[int, ...], weighted: bool) -> tuple[Term, ...]:
    return tuple(Term((layer, kind), weighted) for layer in layers)


def layer_plans(kv: KVSharingConfig, num_layers: int) -> list[LayerPlan]:
    """The plan of every layer 1..num_layers for a (validated) configuration."""
    v = kv.variant
    n = num_layers // 2
    plans: dict[int, LayerPlan] = {i: LayerPlan(i) for i in range(1, num_layers + 1)}
    if v == "dense_probe":  # every storage layer is a source of every top layer (the probe)
        storage = tuple(range(1, n + 1))
        key, value = _terms("k", storage, True), _terms("v", storage, True)
        for i in range(n + 1, num_layers + 1):
            plans[i] = LayerPlan(i, key, value)
    elif v in ("fusedkv", "fusedkv_lite", "fusedkv_lite_learnable", "yoco"):
        bottom, middle = kv.sources(num_layers)
        if v == "fusedkv":
            key, value = _terms("k", (bottom, middle), True), _terms("v", (bottom, middle), True)
        elif v == "yoco":
            key, value = _terms("k", (middle,), False), _terms("v", (middle,), False)
        else:
            weighted = v == "fusedkv_lite_learnable"
            key, value = _terms("k", (middle,), weighted), _terms("v", (bottom,), weighted)
        for i in range(n + 1, num_layers + 1):
            plans[i] = LayerPlan(i, key, value)
    elif v == "cla":
        for i in range(2, num_layers + 1, 2):
            plans[i] = LayerPlan(i, _terms("k", (i - 1,), False), _terms("v", (i - 1,), False))
    # A storage layer publishes exactly what later layers read of it.
    read = {s for p in plans.values() for s in p.reads}
    for i, p in plans.items():
        if not p.is_reconstruction:
            pub = tuple(s for s in ((i, "k"), (i, "v")) if s in read)
            plans[i] = LayerPlan(i, publishes=pub)
    return [plans[i] for i in range(1, num_layers + 1)]


def live_sources(plans: list[LayerPlan], after_layer: int) -> tuple[Source, ...]:
    """Sources published at layers <= after_layer that a layer > after_layer still reads."""
    published = {s for p in plans[:after_layer] for s in p.publishes}
    needed = {s for p in plans[after_layer:] for s in p.reads}
    return tuple(sorted(published & needed))


def expand_key_weight(weight: torch.Tensor, rotary_interleaved: bool) -> torch.Tensor:
    """[..., head_dim/2] -> [..., head_dim], equal on the two channels one RoPE frequency rotates.

    Rotate-half RoPE (Megatron's default) pairs channel j with j + head_dim/2; interleaved RoPE
    pairs 2j with 2j+1. With the tie, w * RoPE_m(k) == RoPE_m(w * k), so fusing post-RoPE keys
    keeps scores relative (docs/model.md, "The RoPE-pair tie").
    """
    if rotary_interleaved:
        return weight.repeat_interleave(2, dim=-1)
    return weight.repeat(*([1] * (weight.dim() - 1)), 2)  # [w, w] along the last dim


def fuse(sources: list[torch.Tensor], weights: list[torch.Tensor | None]) -> torch.Tensor:
    """sum_i w_i * s_i with s_i [s, b, heads, d] and w_i [heads or 1, d] (None means 1)."""
    out = None
    for src, w in zip(sources, weights, strict=True):
        term = src if w is None else src * w.to(src.dtype)
        out = term if out is None else out + term
    return out


@dataclass(frozen=True)
class KVFusion:
    """What a reconstruction layer attends over: K = sum_i k_weights[i] * k_sources[i] and
    V = sum_i v_weights[i] * v_sources[i] (a weight `[heads or 1, d]`, or None for 1).

    The one argument through which the kernels (`kernels.reconstruction_attention`,
    `kernels.reconstruction_decode`, their references and Triton versions) take the fusion.
    Sources are `[s, b, kv_heads, d]` in training and `[b, S, kv_heads, d]` caches in decode.
    """

    k_sources: tuple
    k_weights: tuple
    v_sources: tuple
    v_weights: tuple

    def __post_init__(self) -> None:
        for name in ("k_sources", "k_weights", "v_sources", "v_weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for kind in ("k", "v"):
            sources, weights = getattr(self, f"{kind}_sources"), getattr(self, f"{kind}_weights")
            if not sources or len(sources) != len(weights):
                raise ValueError(
                    f"KVFusion: {len(sources)} {kind}_sources and {len(weights)} {kind}_weights; "
                    "give at least one source and one weight (or None) per source"
                )

    @property
    def key(self) -> torch.Tensor:
        """K, materialised (the reference path)."""
        return fuse(self.k_sources, self.k_weights)

    @property
    def value(self) -> torch.Tensor:
        """V, materialised (the reference path)."""
        return fuse(self.v_sources, self.v_weights)


def init_fusion_weight(
    weight: torch.Tensor, kv: KVSharingConfig, term: Term, plan: LayerPlan, seed: int = 0
) -> None:
    """Fill one fusion vector in place per `kv.fusion_init`.

    "normal" draws from torch's current generator; "equivalent" is a deterministic function of
    (seed, layer, source) (see `equivalent_fusion_weight`); "lite" and "uniform" are constants.
    """
    import torch

    with torch.no_grad():
        if kv.fusion_init == "normal":
            weight.normal_(0.0, 1.0)
            return
        if kv.fusion_init == "equivalent":
            weight.copy_(equivalent_fusion_weight(tuple(weight.shape), term, plan, seed))
            return
        if kv.fusion_init == "uniform":  # the mean of the sources: none favoured
            weight.fill_(1.0 / len(plan.key if term.source[1] == "k" else plan.value))
            return
        # "lite": reproduce FusedKV-Lite at step 0 (K from the middle layer, V from the bottom).
        kind = term.source[1]
        lite_layer = _anchor(plan.key if kind == "k" else plan.value, kind)
        weight.fill_(1.0 if term.source[0] == lite_layer else 0.0)


def _anchor(terms: tuple[Term, ...], kind: str) -> int:
    """The source a K (V) chain re-anchors on: the middle (bottom) layer, as FusedKV-Lite."""
    layers = [t.source[0] for t in terms]
    return max(layers) if kind == "k" else min(layers)


def equivalent_auxiliary(
    shape: tuple[int, ...], seed: int, layer: int, kind: str, source: str
) -> torch.Tensor:
    """One N(0, 1) auxiliary vector of the iterative scheme: the weight that `layer` puts on
    `source` ("prev" for the layer below it, else a source layer number) for `kind` ("k"/"v").
    Drawn from its own generator keyed by the arguments, so every call agrees on it."""
    import hashlib

    import torch

    key = f"{seed}:fusion-equivalent:{layer}:{kind}:{source}".encode()
    gen = torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
    )
    return torch.randn(shape, generator=gen)


def equivalent_fusion_weight(
    shape: tuple[int, ...], term: Term, plan: LayerPlan, seed: int = 0
) -> torch.Tensor:
    """The weight of `term` in layer `plan.layer_number` under the "equivalent" initialisation.

    The iterative scheme (the paper's appendix) builds the first top layer's K (V) from its
    sources with auxiliary weights and every later layer i from layer i-1's K (V) plus one anchor
    source (K: the middle layer, V: the bottom layer):
        X_first = sum_j c'_{first,j} X_j,   X_i = c'_{i,prev} X_{i-1} + c'_{i,anchor} X_anchor.
    Unrolled, X_i is a weighted sum of the sources alone with
        c_{first,j} = c'_{first,j},   c_{i,j} = c'_{i,prev} c_{i-1,j} + [j == anchor] c'_{i,anchor},
    which is what standard fusion starts from here (docs/uptraining.md). The first top layer is
    the one above the highest source (L/2 + 1; the config requires the middle source at L/2).
    """
    kind = term.source[1]
    terms = plan.key if kind == "k" else plan.value
    anchor = _anchor(terms, kind)
    first = max(t.source[0] for t in plan.key + plan.value) + 1
    if plan.layer_number < first:
        raise ValueError(
            f"layer {plan.layer_number} is below the first top layer {first}: the equivalent "
            "initialisation needs every source below the reconstruction layers"
        )
    coeff = equivalent_auxiliary(shape, seed, first, kind, str(term.source[0]))
    for i in range(first + 1, plan.layer_number + 1):
        coeff = equivalent_auxiliary(shape, seed, i, kind, "prev") * coeff
        if term.source[0] == anchor:
            coeff = coeff + equivalent_auxiliary(shape, seed, i, kind, str(anchor))
    return coeff


def fusion_parameter_count(
    kv: KVSharingConfig, num_layers: int, num_query_groups: int, head_dim: int
) -> int:
    """Parameters the fusion adds to the whole model.

    fusedkv: (L/2) * G * (2 * d/2 + 2 * d) = 1.5 * L * G * d, with G = KV heads (1 when the
    weights are shared across heads); fusedkv_lite_learnable: (L/2) * G * (d/2 + d);
    dense_probe: (L/2) * G * (L/2) * (d/2 + d).
    """
    groups = num_query_groups if kv.weights_per_head else 1
    total = 0
    for plan in layer_plans(kv, num_layers):
        for term in plan.key:
            total += groups * head_dim // 2 if term.weighted else 0
        for term in plan.value:
            total += groups * head_dim if term.weighted else 0
    return total


def kv_cache_bytes_per_token(
    kv: KVSharingConfig,
    num_layers: int,
    num_query_groups: int,
    head_dim: int,
    bytes_per_element: int = 2,
) -> int:
    """Inference KV-cache bytes per token: K and V of every layer that computes its own."""
    storage = sum(not p.is_reconstruction for p in layer_plans(kv, num_layers))
    return storage * 2 * num_query_groups * head_dim * bytes_per_element
