"""The tiny model of the conversion tests, shared by the torchrun worker and the tests."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

from tests.tiny import FFN, HEADS, HIDDEN, SEQ, VOCAB, L, groups_for

ITERATION = 7
TP_PP = (2, 2)
ROTARY_BASE = 10_000.0  # not the default 1e6: a lost rope_theta shows in the logits
TOKENIZER_VOCAB = 120  # <= VOCAB (the padded vocabulary)
EOD = 2  # SentencePiece's </s>


def build_tiny(variant: str, kv_overrides: dict | None = None, **config_overrides):
    """The Megatron model of this variant (this rank's stage), as the trainer would build it."""
    import torch

    from fusedkv_megatron import KVSharingConfig, build_model, qwen3_config

    config = qwen3_config(
        L,
        HIDDEN,
        HEADS,
        num_query_groups=groups_for(variant),
        ffn_hidden_size=FFN,
        use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        **config_overrides,
    )
    kv = KVSharingConfig(variant, **(kv_overrides or {}))
    return build_model(config, kv, VOCAB, SEQ, rotary_base=ROTARY_BASE)


def run_info(model) -> dict:
    """fusedkv_run.json of a build_tiny model, read off its config (so overrides carry over)."""
    from fusedkv_megatron import checkpoint_format as cf

    c, kv = model.config, model.kv_sharing
    arch = cf.model_section(
        c,
        padded_vocab_size=VOCAB,
        seq_length=SEQ,
        rotary_base=ROTARY_BASE,
        share_embeddings_and_output_weights=False,
    )
    tokenizer = dict(
        type="SentencePieceTokenizer",
        model_file=cf.TOKENIZER_FILE,
        vocab_size=TOKENIZER_VOCAB,
        eod_id=EOD,
    )
    parallel = dict(
        tensor_model_parallel_size=c.tensor_model_parallel_size,
        pipeline_model_parallel_size=c.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1,
    )
    return cf.make_run_info(ITERATION, arch, kv, tokenizer, parallel)


def train_sentencepiece(prefix: str) -> str:
    """A tiny BPE model trained on a few lines of text; returns the .model path."""
    import io

    import sentencepiece as spm

    words = (
        "the fused keys and values of the middle layer feed the top half of the model "
        "Zürich naïve café"
    ).split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=(buf := io.BytesIO()),
        vocab_size=TOKENIZER_VOCAB,
        model_type="bpe",
        byte_fallback=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = f"{prefix}.model"
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def randomize(model, rank: int = 0) -> None:
    """Seeded values by name and rank, norms around 1 (a swapped norm must show in logits)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}".encode()))
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.3 * noise)


def save_checkpoint(model, root, name: str, tokenizer_model):
    """ROOT/<name>/iter_0000007 in the trainer's layout (call on every rank)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from fusedkv_megatron import checkpoint_format as cf

    out = cf.iteration_dir(Path(root) / name, ITERATION)
    rank = dist.get_rank()
    if rank == 0:
        out.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out))
    if rank == 0:
        shutil.copyfile(tokenizer_model, out / cf.TOKENIZER_FILE)
        cf.write_run_info(out, run_info(model))
        cf.write_latest_iteration(Path(root) / name, ITERATION)
    dist.barrier()
    return out
