"""Pipeline routing without processes: what each boundary carries (bytes equal a hand-computed
minimum), the fold/unfold of the sources, which layers pack and unpack, the schedule arguments,
and clear errors for layouts that cannot work. The multi-process equality with PP=1 is in
tests/distributed/test_pipeline.py."""

from __future__ import annotations

import pytest
import torch

from fusedkv_megatron import KVSharingConfig, get_fusedkv_decoder_block_spec, qwen3_config
from fusedkv_megatron.pipeline import (
    PipelineConfigError,
    SourcePayload,
    boundary_bytes,
    check_pipeline_config,
    pipeline_chunks,
    pipeline_schedule_kwargs,
)

MiB = 1 << 20


def _cfg(**kw):
    """A tiny config: 8 layers, hidden 16, 4 heads, 2 KV heads of dim 8, fp32."""
    return qwen3_config(8, 16, 4, 2, kv_channels=8, pipeline_dtype=torch.float32, **kw)


def big_config(**kw):
    """The stated config: 28 layers, hidden 2048, 16 heads, 8 KV heads of dim 128, bf16."""
    return qwen3_config(28, 2048, 16, 8, kv_channels=128, pipeline_dtype=torch.bfloat16, **kw)


# PP=4 (7 layers per stage) at seq 8192, micro-batch 1, bf16, TP=1. Boundaries after layers
# 7, 14 (= L/2, the middle source, last layer of stage 1) and 21.
#   hidden per boundary: 8192 * 1 * 2048 * 2 B = 32 MiB
#   one K or V source:   8192 * 1 * 8 * 128 * 2 B = 16 MiB
# Live sources after layer j (fusedkv: K1 V1 until the middle, then K1 V1 K14 V14; Lite: V1,
# then K14 V1; YOCO: nothing, then K14 V14; CLA: layer j's K, V when j is odd).
MINIMUM_SOURCES = {
    "vanilla": [0, 0, 0],
    "gqa": [0, 0, 0],
    "cla": [2, 0, 2],
    "yoco": [0, 2, 2],
    "fusedkv": [2, 4, 4],
    "fusedkv_lite": [1, 2, 2],
    "fusedkv_lite_learnable": [1, 2, 2],
}


@pytest.mark.parametrize("variant", list(MINIMUM_SOURCES))
def test_boundary_bytes_equal_hand_computed_minimum(variant):
    config = big_config(pipeline_model_parallel_size=4)
    bounds = boundary_bytes(config, KVSharingConfig(variant), micro_batch_size=1, seq_length=8192)
    assert [b.after_layer for b in bounds] == [7, 14, 21]
    assert [b.hidden_bytes for b in bounds] == [32 * MiB] * 3
    assert [b.source_bytes for b in bounds] == [n * 16 * MiB for n in MINIMUM_SOURCES[variant]]


def test_boundary_bytes_per_tp_rank_with_sequence_parallel():
    """TP=2 + SP: each TP rank sends half the sequence of hidden and half the KV heads."""
    config = big_config(
        pipeline_model_parallel_size=4, tensor_model_parallel_size=2, sequence_parallel=True
    )
    bounds = boundary_bytes(config, KVSharingConfig("fusedkv"), 1, 8192)
    assert [b.hidden_bytes for b in bounds] == [16 * MiB] * 3
    assert [b.source_bytes for b in bounds] == [16 * MiB, 32 * MiB, 32 * MiB]
    assert bounds[1].sources == ((1, "k"), (1, "v"), (14, "k"), (14, "v"))
    assert "K1 V1 K14 V14" in bounds[1].describe()


def test_boundary_bytes_follow_the_interleaved_order():
    """VPP=2 at PP=2: activations flow pp0/vp0 -> pp1/vp0 -> pp0/vp1 -> pp1/vp1."""
    config = _cfg(
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
    )
    bounds = boundary_bytes(config, KVSharingConfig("fusedkv"), 2, 8)
    assert [(b.sender.pp_rank, b.sender.vp_stage) for b in bounds] == [(0, 0), (1, 0), (0, 1)]
    assert [b.after_layer for b in bounds] == [2, 4, 6]
    # 8 tokens x 2 sequences x (2 heads x 8) channels x 4 bytes = 1024 B per source
    assert [b.source_bytes for b in bounds] == [2 * 1024, 4 * 1024, 4 * 1024]


@pytest.mark.parametrize("fold", [1, 2])
def test_payload_round_trip(fold):
    """Fold then unfold returns the hidden state and every source exactly; the hidden state
    keeps its channels first."""
    s, b, h, g, d, n = 8, 2, 16, 3, 4, 3
    payload = SourcePayload(
        sources=((1, "k"), (1, "v"), (4, "k")),
        hidden_size=h,
        kv_heads=g,
        head_dim=d,
        fold=fold,
        dtype=torch.float32,
    )
    hidden = torch.randn(s // fold, b, h)
    sources = torch.randn(n, s, b, g, d)
    packed = payload.pack(hidden, sources)
    assert packed.shape == (s // fold, b, h + n * s * g * d // (s // fold))
    assert payload.width == packed.shape[-1]
    got_hidden, got_sources = payload.unpack(packed)
    assert torch.equal(got_hidden, hidden)
    assert torch.equal(got_sources, sources)
    assert torch.equal(packed[..., :h], hidden)


def test_payload_rejects_a_tensor_of_the_wrong_width():
    payload = SourcePayload(((1, "v"),), 16, 2, 8, 1, torch.float32)
    with pytest.raises(RuntimeError, match=r"width 16, expected 32.*pipeline_schedule_kwargs"):
        payload.unpack(torch.zeros(4, 1, 16))


def _flags(config, kv, pp_rank):
    specs = get_fusedkv_decoder_block_spec(config, kv, pp_rank=pp_rank).layer_specs
    return [
        (s.params.get("unpack_input", False), s.params.get("pack_output", False)) for s in specs
    ]


def test_only_stage_edges_pack_and_unpack():
    config = _cfg(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=3)
    kv = KVSharingConfig("fusedkv")
    assert _flags(config, kv, 0) == [(False, False)] * 2 + [(False, True)]
    assert _flags(config, kv, 1) == [(True, False)] + [(False, False)] * 4
    # One stage: nothing crosses, the layers are exactly the single-stage layers.
    single = _cfg()
    assert _flags(single, kv, 0) == [(False, False)] * 8
    # CLA with a boundary after an even layer: nothing is alive there, nothing is packed.
    even = _cfg(pipeline_model_parallel_size=2)
    assert _flags(even, KVSharingConfig("cla"), 0)[-1] == (False, False)


def test_1f1b_shapes_widen_by_the_sources_of_each_boundary():
    config = _cfg(pipeline_model_parallel_size=2)
    kv = KVSharingConfig("fusedkv_lite")
    shapes = [(8, 2, 16)]
    fn0 = pipeline_schedule_kwargs(config, kv, seq_length=8, pp_rank=0)["adjust_tensor_shapes_fn"]
    fn1 = pipeline_schedule_kwargs(config, kv, seq_length=8, pp_rank=1)["adjust_tensor_shapes_fn"]
    # after layer 4 (= L/2): K4 and V1, 2 heads x 8 channels each
    assert fn0(shapes, shapes) == ([(8, 2, 16)], [(8, 2, 48)])
    assert fn1(shapes, shapes) == ([(8, 2, 48)], [(8, 2, 16)])
    assert pipeline_schedule_kwargs(config, KVSharingConfig("vanilla"), seq_length=8) == {}


def test_interleaved_schedule_gets_exact_p2p_settings():
    fusedkv, vanilla = KVSharingConfig("fusedkv"), KVSharingConfig("vanilla")
    vpp = dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    config = _cfg(kv_sharing=fusedkv, **vpp)
    # qwen3_config sets what the interleaved schedule needs (Megatron's defaults are the
    # opposite: batch_p2p_comm=True, overlap_p2p_comm=False, variable_seq_lengths=False) ...
    assert not config.batch_p2p_comm and config.overlap_p2p_comm and config.variable_seq_lengths
    assert config.hetereogenous_dist_checkpoint
    # ... only the fields the variant needs: vanilla sends one width, no shape exchange.
    plain = _cfg(kv_sharing=vanilla, **vpp)
    assert not plain.batch_p2p_comm and plain.overlap_p2p_comm and not plain.variable_seq_lengths
    check_pipeline_config(plain, vanilla)
    with pytest.raises(PipelineConfigError, match="variable_seq_lengths=True"):
        check_pipeline_config(plain, fusedkv)
    # Checking never changes the config; Megatron's defaults are refused with the fix.
    upstream = _cfg(batch_p2p_comm=True, overlap_p2p_comm=False, **vpp)
    with pytest.raises(PipelineConfigError) as err:
        check_pipeline_config(upstream, fusedkv)
    msg = str(err.value)
    assert "batch_p2p_comm=False, overlap_p2p_comm=True" in msg and "qwen3_config" in msg, msg
    assert upstream.batch_p2p_comm and not upstream.overlap_p2p_comm
    # Without PP nothing is asked for.
    assert not _cfg().variable_seq_lengths and _cfg().batch_p2p_comm
    assert (
        pipeline_schedule_kwargs(
            config, KVSharingConfig("fusedkv"), seq_length=8, num_microbatches=4
        )
        == {}
    )


@pytest.mark.parametrize(
    ("config_kw", "words"),
    [
        (
            dict(pipeline_model_parallel_size=3),
            [
                "num_layers=8",
                "pipeline_model_parallel_size=3",
                "num_layers_in_first_pipeline_stage",
            ],
        ),
        (
            dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3),
            ["virtual_pipeline_model_parallel_size=3", "divisible"],
        ),
        (
            dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Et*4|t*4L"),
            ["pipeline_model_parallel_layout=Et*4|t*4L", "num_layers_in_first/last"],
        ),
    ],
)
def test_impossible_layouts_have_clear_errors(config_kw, words):
    config = _cfg(**config_kw)
    with pytest.raises(PipelineConfigError) as err:
        check_pipeline_config(config, KVSharingConfig("fusedkv"))
    for word in words:
        assert word in str(err.value), str(err.value)


def test_schedule_errors_name_value_and_fix():
    kv = KVSharingConfig("fusedkv")
    vpp = _cfg(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    with pytest.raises(PipelineConfigError, match=r"num_microbatches=3 .* use 4 microbatches"):
        pipeline_schedule_kwargs(vpp, kv, seq_length=8, num_microbatches=3)
    sp = _cfg(pipeline_model_parallel_size=2, tensor_model_parallel_size=2, sequence_parallel=True)
    with pytest.raises(PipelineConfigError, match=r"seq_length=9 .* multiple of 2"):
        pipeline_schedule_kwargs(sp, kv, seq_length=9, pp_rank=0)
    overlap = _cfg(pipeline_model_parallel_size=2, overlap_p2p_comm=True, batch_p2p_comm=False)
    with pytest.raises(PipelineConfigError, match="overlap_p2p_comm=True needs the interleaved"):
        check_pipeline_config(overlap, kv)


def test_chunks_cover_every_layer_once_with_uneven_stages():
    config = _cfg(
        pipeline_model_parallel_size=4,
        num_layers_in_first_pipeline_stage=1,
        num_layers_in_last_pipeline_stage=1,
    )
    assert [(c.start, c.stop) for c in pipeline_chunks(config)] == [(0, 1), (1, 4), (4, 7), (7, 8)]
