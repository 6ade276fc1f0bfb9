"""Which attention path a layer takes, and what it hands the core attention.

- The materialising path hands a non-SDPA core attention (Transformer Engine's) K and V that
  own their storage: TE infers the qkv layout from storage offsets and strides and rejects
  views into the stacked sources.
- The Triton-or-materialise decision reads the query's dtype, not the hidden states'.
- `--transformer-impl` resolves like Megatron-LM's flag and fails loudly, naming the import
  error, when Transformer Engine is asked for and cannot be used.
- The start-up description says the paper-size configs (head dims 96 and 160) train through
  the fused kernel on a GPU in bf16.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedkv_megatron import spec
from fusedkv_megatron.training.arguments import ArgumentError, parse_args, validate_args
from tests.tiny import tiny_batch, tiny_model

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


class RecordingCore(torch.nn.Module):
    """Stands in for TEDotProductAttention: records what it is handed, attends with SDPA."""

    def __init__(self, real):
        super().__init__()
        self.real, self.seen = real, []

    def forward(self, query, key, value, attention_mask, **kwargs):
        self.seen.append((key, value))
        return self.real(query, key, value, attention_mask, **kwargs)


def _owns_storage(x: torch.Tensor) -> bool:
    storage = x.untyped_storage()
    return (
        x.is_contiguous()
        and storage.data_ptr() == x.data_ptr()
        and storage.nbytes() == x.numel() * x.element_size()
    )


@pytest.mark.parametrize("variant", ["fusedkv_lite", "yoco", "cla", "fusedkv"])
def test_materialised_kv_owns_its_storage_for_te(megatron_tp1, monkeypatch, variant):
    """What a TE core attention receives on the materialising path: K and V each contiguous
    and owning their whole storage (TE then sees separate sbhd tensors). For the unweighted
    variants the fused K/V is a view into the stacked sources, which TE would reject."""
    monkeypatch.setenv("FUSEDKV_ATTENTION_BACKEND", "torch")
    model = tiny_model(variant)
    layers = [m for m in model.modules() if type(m).__name__ == "ReconstructionAttention"]
    for layer in layers:
        layer.core_attention = RecordingCore(layer.core_attention)
    views = []
    real_reconstruct = type(layers[0]).reconstruct

    def reconstruct(self, sources):
        key, value = real_reconstruct(self, sources)
        views.append(key._base is not None or value._base is not None)
        return key, value

    monkeypatch.setattr(type(layers[0]), "reconstruct", reconstruct)
    tokens, labels, pos = tiny_batch()
    model(tokens, pos, None, labels=labels).sum().backward()
    assert layers and all(len(layer.core_attention.seen) == 1 for layer in layers)
    for layer in layers:
        key, value = layer.core_attention.seen[0]
        assert _owns_storage(key) and _owns_storage(value), layer.layer_number
        assert key.untyped_storage().data_ptr() != value.untyped_storage().data_ptr()
    # Without the copy the unweighted variants would hand views (what the copy is for).
    assert all(views) == (variant != "fusedkv"), views


def test_dispatch_reads_the_query_dtype(megatron_tp1, monkeypatch):
    """Under autocast the hidden states stay fp32 while the query is bf16: the fused-kernel
    decision is taken on the query (and its sources)."""
    from fusedkv_megatron import attention

    seen = []
    real = attention.fused_attention_applies

    def record(module, q, backend=None, sources=(), attention_mask=None):
        seen.append((q.dtype, [x.dtype for x in sources]))
        return real(module, q, backend, sources, attention_mask)

    monkeypatch.setattr(attention, "fused_attention_applies", record)
    model = tiny_model("fusedkv")
    tokens, labels, pos = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, pos, None, labels=labels)
    assert seen and all(q == torch.bfloat16 for q, _ in seen), seen
    assert all(len(srcs) == 4 for _, srcs in seen)  # fusedkv reads K1, Kn, V1, Vn


def _args(*flags: str, cuda: bool, world: int = 1):
    shape = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "64", "--train-iters", "1"]  # fmt: skip
    return validate_args(parse_args(["--mock-data", *shape, *flags]), world_size=world, cuda=cuda)


def test_transformer_impl_default_and_errors(monkeypatch):
    """Default: transformer_engine with CUDA (Megatron-LM's), local without. Asking for TE
    where it cannot run is an error that names the import failure and the fix."""
    assert _args(cuda=False).transformer_impl == "local"
    assert _args("--transformer-impl", "local", cuda=True).transformer_impl == "local"
    with pytest.raises(ArgumentError, match="needs a CUDA GPU.*--transformer-impl local"):
        _args("--transformer-impl", "transformer_engine", cuda=False)
    monkeypatch.setattr(spec, "transformer_engine_import_error", lambda: None)
    assert _args(cuda=True).transformer_impl == "transformer_engine"
    broken = "OSError: libtransformer_engine.so: cannot open shared object file"
    monkeypatch.setattr(spec, "transformer_engine_import_error", lambda: broken)
    for flags, given in (
        ((), "the default with CUDA"),
        (("--transformer-impl", "transformer_engine"), "asked for"),
    ):
        with pytest.raises(ArgumentError) as err:
            _args(*flags, cuda=True)
        assert broken in str(err.value) and given in str(err.value)
        assert "--transformer-impl local" in str(err.value)
    with pytest.raises(ArgumentError, match="--fp8-format e4m3 needs Transformer Engine"):
        _args("--fp8-format", "e4m3", "--bf16", "--transformer-impl", "local", cuda=True)


def test_spec_backend_does_not_swallow_a_broken_te(monkeypatch):
    """The library's auto choice takes TE only where it works; an installed TE that fails to
    import (or TE asked for without CUDA) raises with the reason instead of falling back."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert spec.resolve_transformer_engine(None) is False
    assert spec.resolve_transformer_engine(False) is False
    with pytest.raises(RuntimeError, match="no CUDA device"):
        spec.resolve_transformer_engine(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(spec, "transformer_engine_installed", lambda: True)
    monkeypatch.setattr(spec, "transformer_engine_import_error", lambda: "ImportError: boom")
    with pytest.raises(RuntimeError, match="ImportError: boom.*--transformer-impl local"):
        spec.resolve_transformer_engine(None)
    monkeypatch.setattr(spec, "transformer_engine_installed", lambda: False)
    assert spec.resolve_transformer_engine(None) is False


def _config(name: str, *flags: str):
    """The TransformerConfig and KVSharingConfig the trainer builds from a YAML config."""
    from fusedkv_megatron.training.initialize import kv_sharing_config, transformer_config

    yaml = str(CONFIGS / f"{name}.yaml")
    args = parse_args(
        ["--config", yaml, "--mock-data", "--tokenizer-type", "NullTokenizer", *flags]
    )
    tp = args.tensor_model_parallel_size
    args = validate_args(args, world_size=tp, cuda=False)
    return transformer_config(args), kv_sharing_config(args)


@pytest.mark.parametrize(("name", "head_dim", "tiles"), [("650m", 96, 128), ("4b", 160, 256)])
@pytest.mark.parametrize("use_te", [True, False], ids=["te", "local"])
def test_paper_configs_train_through_the_fused_kernel(monkeypatch, name, head_dim, tiles, use_te):
    """On a GPU in bf16 (CUDA mocked) the reconstruction layers of 650m (head dim 96) and 4b
    (160) run the Triton kernel, and the storage layers TE's or SDPA's attention."""
    monkeypatch.delenv("FUSEDKV_ATTENTION_BACKEND", raising=False)
    config, kv = _config(name)
    assert config.kv_channels == head_dim and config.bf16
    lines = spec.describe_attention(config, kv, use_te, cuda=True)
    half = config.num_layers // 2
    core = "TE DotProductAttention" if use_te else "SDPA"
    assert lines[0].startswith("> backend: " + ("Transformer Engine" if use_te else "local"))
    assert lines[1] == f"> attention, layers 1-{half} (own K/V): {core}"
    assert lines[2] == (
        f"> attention, layers {half + 1}-{config.num_layers} (K/V from sources K1, V1, "
        f"K{half}, V{half}): Triton fused (head dim {head_dim} ok ({tiles}-wide tiles), "
        "bf16, CUDA)"
    )


def test_description_names_why_the_kernel_is_not_used(monkeypatch):
    """fp32, no CUDA, a forced torch backend and dropout each lead to the materialised path,
    and the line says which."""
    monkeypatch.delenv("FUSEDKV_ATTENTION_BACKEND", raising=False)
    config, kv = _config("650m")
    last = spec.describe_attention(config, kv, False, cuda=False)[-1]
    assert "materialised K/V, then SDPA (no CUDA device" in last
    assert "TE" in spec.describe_attention(config, kv, True, cuda=True, backend="torch")[-1]
    assert (
        "FUSEDKV_ATTENTION_BACKEND=torch"
        in spec.describe_attention(config, kv, True, cuda=True, backend="torch")[-1]
    )
    fp32, _ = _config("650m", "--no-bf16")
    assert "fp32 -> materialised" in spec.describe_attention(fp32, kv, False, cuda=True)[-1]
    dropout, _ = _config("650m")
    dropout.attention_dropout = 0.1
    assert "attention_dropout=0.1" in spec.describe_attention(dropout, kv, False, cuda=True)[-1]
    vanilla, kv_vanilla = _config("650m", "--kv-sharing", "vanilla")
    lines = spec.describe_attention(vanilla, kv_vanilla, False, cuda=True)
    assert lines[1:] == ["> attention, layers 1-16 (own K/V): SDPA"]
