"""Validation loss of a converted (or original) model, before any training: what the conversion
did to quality.

One CPU process builds the model at TP=1 in fp32 from its run info and TP=1 tensors, reads the
data through the trainer's pipeline (`build_train_valid_test_datasets` with the prefix as the
validation split, so the samples are the ones `fusedkv-pretrain --valid-data-path PREFIX
--seed SEED` validates on) and sums the per-token loss the trainer sums: with `samples` =
eval-iters x global-batch-size and the same micro batch size, the number equals the trainer's
validation loss of that model.
"""

from __future__ import annotations

import tempfile

import torch

from .hf.mapping import ConversionError


def _tokenizer(info: dict, tokenizer_file):
    from .data.tokenizer import build_tokenizer

    tok = info["tokenizer"]
    if tok["type"] == "SentencePieceTokenizer" and tokenizer_file is None:
        raise ConversionError(
            "the checkpoint names a SentencePiece tokenizer but carries no tokenizer.model; "
            "--eval-data needs it to check the data's token ids"
        )
    model_file = str(tokenizer_file) if tokenizer_file else None
    return build_tokenizer(tok["type"], model_file, tok["vocab_size"])


def validation_loss(
    model, prefix: str, *, samples: int = 16, micro_batch_size: int = 4, seed: int = 1234
) -> float:
    """Mean token loss of `model` (an uptrain.Model) on the first `samples` sequences of the
    indexed dataset at `prefix`, in the trainer's validation order."""
    from .data.datasets import build_train_valid_test_datasets
    from .hf.megatron_io import build_megatron_model, single_process_megatron
    from .training.batches import MicrobatchIterator

    if samples < 1 or micro_batch_size < 1 or samples % micro_batch_size:
        raise ConversionError(
            f"--eval-samples {samples} must be a positive multiple of --eval-micro-batch-size "
            f"{micro_batch_size}"
        )
    info = model.info
    tokenizer = _tokenizer(info, model.tokenizer_file)
    with tempfile.TemporaryDirectory(prefix="fusedkv-eval-") as cache:
        _, valid, _ = build_train_valid_test_datasets(
            None,
            "",
            info["model"]["seq_length"],
            seed,
            (0, samples, 0),
            tokenizer,
            data_cache_path=cache,
            valid_data_path=[prefix],
            create_attention_mask=False,
        )
        batches = MicrobatchIterator(valid, 0, micro_batch_size, 0, 1)
        with single_process_megatron():
            net = build_megatron_model(info, torch.float32)
            state = {k: v.float() for k, v in model.state.items()}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise ConversionError(
                    f"{model.where}: tensors do not fit the model: missing {missing[:6]}, "
                    f"unexpected {unexpected[:6]}"
                )
            net.eval()
            total = torch.zeros(2, dtype=torch.float64)
            with torch.no_grad():
                for _ in range(samples // micro_batch_size):
                    b = next(batches)
                    losses = net(b["tokens"], b["position_ids"], None, labels=b["labels"])
                    mask = b["loss_mask"].view(-1)
                    loss = torch.sum(losses.float().view(-1) * mask)  # as the trainer's loss
                    total += torch.stack([loss, mask.sum()]).to(torch.float64)
    return float(total[0] / total[1].clamp(min=1.0))
