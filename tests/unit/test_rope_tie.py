"""docs/model.md, "The RoPE-pair tie": a key fusion weight must be equal on the two channels one RoPE frequency
rotates, or an absolute-position term leaks into the scores. Checked with Megatron's own RoPE
(RotaryEmbedding + apply_rotary_pos_emb), in both pairing conventions."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from fusedkv_megatron.fusion import expand_key_weight
from tests.tiny import tiny_config

S, HEADS, D = 12, 2, 16


def _scores(q, k1, kn, w1, wn, offset, config):
    """Scores of queries against the fused key, with every position shifted by `offset`."""
    rope = RotaryEmbedding(D, 1.0, rotary_interleaved=config.rotary_interleaved, rotary_base=1e4)
    emb = rope(S, offset=offset)  # [S, 1, 1, D]

    def rot(x):
        return apply_rotary_pos_emb(x, emb, config=config)

    key = w1 * rot(k1) + wn * rot(kn)  # fused after RoPE, never rotated again
    return torch.einsum("sbhd,tbhd->bhst", rot(q), key)


@pytest.mark.parametrize("interleaved", [False, True])
def test_tied_key_weights_keep_scores_relative(megatron_tp1, interleaved):
    config = tiny_config("fusedkv", rotary_interleaved=interleaved, apply_rope_fusion=False)
    g = torch.Generator().manual_seed(0)
    q, k1, kn = (torch.randn(S, 1, HEADS, D, generator=g, dtype=torch.float64) for _ in range(3))
    half1, halfn = (torch.randn(HEADS, D // 2, generator=g, dtype=torch.float64) for _ in range(2))
    tied = (expand_key_weight(half1, interleaved), expand_key_weight(halfn, interleaved))
    base = _scores(q, k1, kn, *tied, 0, config)
    for offset in (1, 7, 100):
        shifted = _scores(q, k1, kn, *tied, offset, config)
        # RotaryEmbedding builds its angles in fp32: agreement is to fp32 rounding.
        torch.testing.assert_close(shifted, base, rtol=1e-5, atol=1e-5)

    # Untied per-channel weights leak absolute position: the same shift changes the scores.
    untied = (
        torch.randn(HEADS, D, generator=g, dtype=torch.float64),
        torch.randn(HEADS, D, generator=g, dtype=torch.float64),
    )
    drift = _scores(q, k1, kn, *untied, 7, config) - _scores(q, k1, kn, *untied, 0, config)
    assert drift.abs().max() > 1e-2

    # Tying with the other convention's pairing is as wrong as not tying at all.
    wrong = (expand_key_weight(half1, not interleaved), expand_key_weight(halfn, not interleaved))
    drift = _scores(q, k1, kn, *wrong, 7, config) - _scores(q, k1, kn, *wrong, 0, config)
    assert drift.abs().max() > 1e-2
