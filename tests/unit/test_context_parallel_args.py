"""Context-parallel flags and the chunk layout: the data-parallel size is world / (TP x PP x
CP); a sequence that does not split into 2 x CP chunks, a world that does not divide, and
packed documents on Transformer Engine's causal attention (which would ignore the mask) are
errors that name the fix; each rank's tokens are chunks r and 2N-1-r, as Megatron splits them."""

from __future__ import annotations

import pytest

from fusedkv_megatron import spec
from fusedkv_megatron.context_parallel import chunk_order, local_positions
from fusedkv_megatron.training.arguments import ArgumentError, parse_args, validate_args


def _args(*flags: str, world: int = 1, cuda: bool = False):
    shape = ["--config", "examples/configs/tiny.yaml", "--tokenizer-type", "NullTokenizer"]
    shape += ["--vocab-size", "512"]  # the model shape is required; mock data, no tokenizer
    return validate_args(parse_args([*shape, "--mock-data", *flags]), world_size=world, cuda=cuda)


def test_data_parallel_size_counts_context_parallel_ranks():
    a = _args("--context-parallel-size", "2", "--tensor-model-parallel-size", "2", world=8)
    assert (a.context_parallel_size, a.data_parallel_size) == (2, 2)
    assert (
        _args("--context-parallel-size", "2", "--cp-comm-type", "allgather", world=2).cp_comm_type
        == "all_gather"
    )


@pytest.mark.parametrize(
    "flags, world, message",
    [
        (["--context-parallel-size", "2"], 3, "world size 3 is not divisible .* 1 x 2"),
        (["--context-parallel-size", "0"], 1, "must be >= 1"),
        (
            ["--context-parallel-size", "4", "--seq-length", "36"],
            4,
            "36 is not divisible by 2 x .* = 8",
        ),
    ],
)
def test_bad_context_parallel_layouts_name_the_fix(flags, world, message):
    with pytest.raises(ArgumentError, match=message):
        _args(*flags, world=world)


def test_packed_documents_refused_on_transformer_engine(monkeypatch):
    monkeypatch.setattr(spec, "transformer_engine_import_error", lambda: None)
    with pytest.raises(
        ArgumentError, match="ignores a dense attention mask.*--transformer-impl local"
    ):
        _args("--reset-attention-mask", "--transformer-impl", "transformer_engine", cuda=True)
    assert _args(
        "--reset-attention-mask", "--transformer-impl", "local", cuda=True
    ).reset_attention_mask


def test_each_rank_holds_chunks_r_and_2n_minus_1_minus_r():
    assert chunk_order(2) == [0, 3, 1, 2]
    assert local_positions(4, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_positions(4, 2, 1).tolist() == [2, 3, 4, 5]
    every = sorted(p for r in range(4) for p in local_positions(6, 4, r).tolist())
    assert every == list(range(24))


def test_start_up_report_names_the_cp_path(monkeypatch):
    """One line per kind of layer: the SDPA all-gather on the local backend; on a GPU with
    Transformer Engine its CP exchange, and the reconstruction layers leave the Triton kernel
    (which has no CP) for the materialising path, saying why."""
    from fusedkv_megatron import KVSharingConfig, kernels
    from tests.tiny import tiny_config

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    config = tiny_config("fusedkv", context_parallel_size=2, cp_comm_type="a2a")
    kv = KVSharingConfig("fusedkv")
    local = spec.describe_attention(config, kv, use_transformer_engine=False, cuda=False)
    assert "(own K/V): SDPA with CP 2 (K/V all-gathered over the CP group)" in local[1]
    te = spec.describe_attention(config, kv, use_transformer_engine=True, cuda=True)
    assert te[2].endswith(
        "materialised K/V, then TE DotProductAttention with CP 2 (TE cp_comm_type a2a) "
        "(context_parallel_size=2 (the kernel has no CP: fused K/V, then the core attention's CP))"
    ), te[2]


def test_start_up_report_says_packed_documents_skip_the_fused_kernel(monkeypatch):
    from fusedkv_megatron import KVSharingConfig, kernels
    from tests.tiny import tiny_config

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    config = tiny_config("fusedkv", bf16=True, kv_channels=64)
    kv = KVSharingConfig("fusedkv")
    assert "Triton fused" in spec.describe_attention(config, kv, False, cuda=True)[2]
    line = spec.describe_attention(config, kv, False, cuda=True, packed_documents=True)[2]
    assert "materialised K/V, then SDPA (packed documents" in line, line
