"""Initial weights that do not depend on the parallel layout.

Megatron draws each rank's shard from that rank's random state: the CPU path initialises the
full tensor from a generator seeded per pipeline stage, the GPU path draws each tensor-parallel
shard from a per-TP-rank generator. The same `--seed` therefore gives a different model at PP=2
than at PP=1, and a different one on GPU than on CPU, so runs cannot move between cluster sizes
like for like.

`reset_parameters(model, seed)` redraws every parameter of one model chunk as a full-size tensor
on the CPU from a generator seeded by (seed, the parameter's global name), with the layer index
replaced by the global layer number, and keeps this rank's slice. The init rule of each
parameter is Megatron's own (`config.init_method`, `output_layer_init_method`,
`embedding_init_method`, norms at one, biases at zero, fusion weights by `kv.fusion_init`).
The result is identical at any TP/PP/VPP layout and on CPU and GPU. The one exception is the
vocabulary padding, which Megatron makes a multiple of `make_vocab_size_divisible_by x TP`:
rows past the padded size of another layout cannot match it.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer

from .fusion import init_fusion_weight, parse_fusion_weight_name

# Parameter names (after the layer prefix) and their init rule.
_OUTPUT_LAYER_INIT = ("linear_proj.weight", "linear_fc2.weight")
_INPUT_INIT = ("linear_qkv.weight", "linear_q.weight", "linear_fc1.weight")


class InitializationError(RuntimeError):
    """A parameter this module does not know how to initialise (a new submodule?)."""


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one parameter, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_full_tensor(seed: int, gname: str, shape, fill) -> torch.Tensor:
    """A full-size fp32 CPU tensor filled by `fill(tensor)` under the CPU generator seeded for
    parameter `gname` (its global name); the caller's random state is left as it was."""
    full = torch.empty(shape, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only; restored after
        torch.random.default_generator.manual_seed(parameter_seed(seed, gname))
        fill(full)
    return full


def _layer_prefixes(model: torch.nn.Module) -> dict[str, int]:
    """{"decoder.layers.3.": global layer index (0-based)} for this chunk's layers."""
    return {
        f"{name}.": module.layer_number - 1
        for name, module in model.named_modules()
        if isinstance(module, TransformerLayer)
    }


def global_name(name: str, layer_prefixes: dict[str, int]) -> str:
    """`name` with this chunk's local layer index replaced by the global layer index."""
    for prefix, index in layer_prefixes.items():
        if name.startswith(prefix):
            head = prefix.rsplit(".", 2)[0]  # "decoder.layers"
            return f"{head}.{index}.{name[len(prefix) :]}"
    return name


def _full_shape(param: torch.Tensor, tp: int) -> tuple[list[int], int | None]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        dim = param.partition_dim
        shape[dim] *= tp
        return shape, dim
    return shape, None


def _local_slice(full: torch.Tensor, dim: int | None, tp: int, rank: int, glu: bool):
    if dim is None:
        return full
    if glu:  # SwiGLU fc1: each rank holds [gate shard; up shard], not a slice of [gate; up]
        return torch.cat([part.chunk(tp, dim)[rank] for part in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def _fusion_term(model: torch.nn.Module, name: str, kind: str, index: int):
    module = model.get_submodule(name.rpartition(".")[0])
    return module, (module.plan.key if kind == "key" else module.plan.value)[index]


def _initialise(model, config, name: str, gname: str, full: torch.Tensor, seed: int) -> None:
    """Fill `full` (fp32, CPU) by the rule that Megatron (or the fusion) uses for `name`."""
    leaf = name.rsplit(".", 1)[-1]
    fusion = parse_fusion_weight_name(leaf)
    if fusion is not None:
        module, term = _fusion_term(model, name, *fusion)
        init_fusion_weight(full, model.kv_sharing, term, module.plan, seed=seed)
    elif leaf.endswith("bias"):
        full.zero_()
    elif "norm" in name.rsplit(".", 2)[-2] or leaf == "layer_norm_weight":
        full.fill_(0.0 if config.layernorm_zero_centered_gamma else 1.0)
    elif name.endswith(_OUTPUT_LAYER_INIT):
        config.output_layer_init_method(full)
    elif name.endswith(_INPUT_INIT) or gname == "output_layer.weight":
        config.init_method(full)
    elif gname == "embedding.word_embeddings.weight":
        config.embedding_init_method(full)
    else:
        raise InitializationError(
            f"no layout-independent init rule for parameter {name!r}; add it to "
            "fusedkv_megatron/initialization.py (or build the model without init_seed)"
        )


@torch.no_grad()
def reset_parameters(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter of `model` (one GPTModel chunk, before DDP wrapping) so that the
    same `seed` gives the same weights at any TP/PP/VPP layout (see the module docstring)."""
    config = model.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    prefixes = _layer_prefixes(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    for name, param in model.named_parameters():
        gname = global_name(name, prefixes)
        if tied and gname == "output_layer.weight":
            gname = "embedding.word_embeddings.weight"  # the last stage's copy of the tie
        shape, dim = _full_shape(param, tp)
        fill = partial(_initialise, model, config, name, gname, seed=seed)
        full = seeded_full_tensor(seed, gname, shape, fill)
        glu = config.gated_linear_unit and name.endswith("linear_fc1.weight")
        param.copy_(_local_slice(full, dim, tp, rank, glu))
