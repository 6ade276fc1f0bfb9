"""Packed documents (`--reset-attention-mask`, `--reset-position-ids`, `--eod-mask-loss`):

- a packed batch of several documents gives each document the logits and per-token losses it
  gets run alone, for every kind of layer: a reconstruction layer reads only its own
  document's sources (without the mask it reads the others', the negative control);
- Megatron's GPTDataset with reset_attention_mask builds that mask from the EOD tokens, and the
  trainer's batches carry it to the model (with position ids restarting and no loss on EOD);
- the fused Triton kernel, which has no document boundaries, is not taken for a masked batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusedkv_megatron.attention_policy import PACKED_DOCUMENTS, fused_kernel_blockers
from tests.distributed.cp_worker import document_mask
from tests.tiny import SEQ, VOCAB, tiny_model

LENGTHS = [5, 7, 4]  # SEQ = 16 tokens in three documents


def _packed(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _segments(lengths):
    start = 0
    for n in lengths:
        yield slice(start, start + n)
        start += n


def _run(model, tokens, mask=None, labels=None):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, pos, mask, labels=labels)


@pytest.mark.parametrize("variant", ["vanilla", "cla", "fusedkv", "fusedkv_lite"])
def test_packed_batch_equals_each_document_alone(megatron_tp1, variant):
    model = tiny_model(variant).eval()
    tokens, labels = _packed()
    mask = document_mask(LENGTHS).expand(2, 1, SEQ, SEQ)
    logits = _run(model, tokens, mask)
    losses = _run(model, tokens, mask, labels)
    for seg in _segments(LENGTHS):
        alone = _run(model, tokens[:, seg])
        torch.testing.assert_close(logits[:, seg], alone, rtol=1e-5, atol=1e-5)
        loss_alone = _run(model, tokens[:, seg], labels=labels[:, seg])
        torch.testing.assert_close(losses[:, seg], loss_alone, rtol=1e-5, atol=1e-5)
    # Negative control: without the mask later documents see earlier ones.
    seg = list(_segments(LENGTHS))[1]
    assert not torch.allclose(_run(model, tokens)[:, seg], _run(model, tokens[:, seg]), atol=1e-4)


def test_reset_attention_mask_data_gives_per_document_losses(megatron_tp1, tmp_path):
    """From Megatron's GPTDataset through the trainer's batches to per-document losses."""
    from fusedkv_megatron.data.datasets import build_train_valid_test_datasets
    from fusedkv_megatron.data.preprocess import preprocess_data
    from fusedkv_megatron.data.tokenizer import build_tokenizer
    from fusedkv_megatron.training.batches import MicrobatchIterator

    rng = np.random.default_rng(0)
    docs = [" ".join(map(str, rng.integers(1, VOCAB - 1, rng.integers(2, 9)))) for _ in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    prefix = preprocess_data(
        [str(tmp_path / "c.txt")],
        str(tmp_path / "c"),
        tokenizer_type="NullTokenizer",
        vocab_size=VOCAB,
        append_eod=True,
        progress=False,
    )["text"]
    tok = build_tokenizer("NullTokenizer", vocab_size=VOCAB)
    eod = tok.eod
    train, _, _ = build_train_valid_test_datasets(
        [prefix],
        "100,0,0",
        SEQ,
        1,
        (4, 0, 0),
        tok,
        data_cache_path=str(tmp_path / "cache"),
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
        create_attention_mask=True,
    )
    batch = next(MicrobatchIterator(train, 0, 2, 0, 1))
    assert batch["attention_mask"].shape == (2, 1, SEQ, SEQ)
    model = tiny_model("fusedkv").eval()
    per_token = _run(model, batch["tokens"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        per_token_pos = model(
            batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
        )
    torch.testing.assert_close(per_token_pos, per_token)  # RoPE reads no position ids
    several = 0
    for row in range(2):
        tokens = batch["tokens"][row]
        ends = [int(i) + 1 for i in torch.nonzero(tokens == eod)]
        bounds = [0, *[e for e in ends if e < SEQ], SEQ]
        several += len(bounds) > 3
        # Megatron's mask is block-diagonal causal over these documents, True = masked out.
        lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        assert torch.equal(batch["attention_mask"][row], document_mask(lengths))
        for a, b in zip(bounds, bounds[1:], strict=False):
            assert batch["position_ids"][row, a:b].tolist() == list(range(b - a))
            alone = _run(model, tokens[None, a:b], labels=batch["labels"][row, None, a:b])
            torch.testing.assert_close(per_token[row, a:b], alone[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(batch["loss_mask"][row] == 0, tokens == eod)
    assert several, "the windows should hold several documents"


def test_fused_kernel_is_not_taken_for_packed_documents(megatron_tp1, monkeypatch):
    """The fused kernel has no document boundaries: a masked batch takes the materialising
    path (auto) and a forced triton backend raises, naming the reason."""
    from fusedkv_megatron import attention, attention_policy

    model = tiny_model("fusedkv").eval()
    layer = next(m for m in model.modules() if type(m).__name__ == "ReconstructionAttention")
    assert not fused_kernel_blockers(layer.config, 16, layer.plan)  # head dim 16 alone is fine
    monkeypatch.setattr(attention_policy, "use_triton", lambda q, backend: True)
    q = torch.zeros(SEQ, 1, 4, 16, dtype=torch.bfloat16)
    monkeypatch.setattr(attention_policy, "_unsupported", lambda m: [])
    assert attention.fused_attention_applies(layer, q, None, [], None)
    mask = document_mask(LENGTHS)[None]
    assert not attention.fused_attention_applies(layer, q, None, [], mask)
    monkeypatch.setenv("FUSEDKV_ATTENTION_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="packed documents"):
        attention.fused_attention_applies(layer, q, None, [], mask)
    assert "document boundaries" in PACKED_DOCUMENTS


def test_sdpa_applies_a_document_mask_like_megatrons_dot_product_attention(megatron_tp1):
    """Causal attention with a packed-document mask: the SDPA core attention and Megatron's
    local DotProductAttention (which applies a passed mask under a causal mask type) agree."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from fusedkv_megatron.core_attention import SDPAAttention
    from tests.tiny import tiny_config

    config = tiny_config("vanilla", num_layers=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(SEQ, 2, 4, 16, generator=g).requires_grad_(True) for _ in range(3))
    mask = torch.stack([document_mask(LENGTHS), document_mask([SEQ])])
    outs = []
    for core in (DotProductAttention, SDPAAttention):
        out = core(config, 1, AttnMaskType.causal, "self")(q, k, v, mask)
        outs.append((out, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    (ref, ref_grads), (got, grads) = outs
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
