"""fusedkv-eval: lm-evaluation-harness, offline, on a checkpoint trained here, with the package's
held-out perplexity task; its numbers agree with the trainer's own validation loss on the same
documents, and land in JSON and TensorBoard at the checkpoint's iteration.

How the two numbers relate. Both score the same documents with the same tokenizer and model:
lm-eval reports word_perplexity = exp(NLL / n_words), where NLL is the total negative
log-likelihood of the documents' tokens, so NLL / n_tokens = log(word_perplexity) * n_words /
n_tokens is a mean loss per token like the trainer's "validation lm loss". They differ only in
what each token is predicted from:
  - lm-eval scores each document alone in windows of seq_length tokens starting at the document,
    its first token predicted from the end-of-document id (fusedkv-eval's prefix token), and the
    last window of a document gets a full seq_length of context;
  - the trainer cuts the concatenated documents (each ending in eod) into samples of seq_length
    tokens, so a sample can start inside a document or carry the previous document as context,
    and it also scores the eod tokens (DOCS of about 3,200 tokens each here);
  - the trainer evaluates whole global batches, leaving out at most GBS-1 of the samples.
Every difference touches the first or last window of a document (about 2 x 64 of its ~3,200
tokens, 4%), the 12 eod tokens (0.03%) or the left-out samples (< 8 of 608, 1.3%, each
a random draw of the same text); a token's loss moves by a fraction of itself when its context
changes (little, for a model trained 20 iterations), so the per-token losses agree to well under 0.5%. Measured: 6.53217 (lm-eval) against
6.53242 (trainer), 0.004% apart.
"""

from __future__ import annotations

import json
import math

import pytest

from fusedkv_megatron.evaluation.tasks.heldout import count_words, read_documents
from tests.integration.trainer_helpers import TINY, default_data, scalars

pytestmark = pytest.mark.slow

DOCS = 12  # the first held-out documents, for both the trainer and lm-eval (--limit)
TOLERANCE = 0.005  # relative; argued in the module docstring
SEQ, GBS = 64, 8  # TINY's --seq-length and --global-batch-size


def _value(args: list, flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-iteration checkpoint, the held-out subset tokenized, and the trainer's validation
    loss on all of that subset (--skip-train from the checkpoint)."""
    from fusedkv_megatron.data.preprocess import preprocess_data
    from fusedkv_megatron.data.tokenizer import build_tokenizer
    from fusedkv_megatron.pretrain import main

    assert (int(_value(TINY, "--seq-length")), int(_value(TINY, "--global-batch-size"))) == (
        SEQ,
        GBS,
    )
    data = default_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("eval")
    docs = read_documents()[:DOCS]
    subset = root / "heldout.jsonl"
    subset.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs))
    preprocess_data(
        [str(subset)],
        str(root / "heldout"),
        tokenizer_model=data["tokenizer_model"],
        append_eod=True,
        progress=False,
    )
    tok = build_tokenizer("SentencePieceTokenizer", data["tokenizer_model"])
    n_tokens = sum(len(tok.tokenize(d["text"])) for d in docs)  # what lm-eval scores
    samples = (n_tokens + DOCS - 1) // SEQ  # GPTDataset: (tokens with eod - 1) // seq_length
    ckpt = root / "ckpt"
    common = [*TINY, "--tokenizer-model", data["tokenizer_model"], "--train-iters", "20"]
    train = [*common, "--data-path", data["train_data_prefix"], "--save", ckpt]
    assert main([str(a) for a in train]) == 0
    valid = [*common, "--valid-data-path", f"{root}/heldout_text_document", "--skip-train",
             "--load", ckpt, "--eval-iters", samples // GBS, "--tensorboard-dir", root / "tb"]  # fmt: skip
    assert main([str(a) for a in valid]) == 0
    loss = scalars(root / "tb", "validation/lm loss")[20]
    return {"root": root, "ckpt": ckpt, "docs": docs, "n_tokens": n_tokens, "valid_loss": loss}


def test_heldout_perplexity_matches_the_trainers_validation_loss(trained):
    from fusedkv_megatron.evaluation import main

    tb = trained["root"] / "tb"
    argv = [str(trained["ckpt"]), "--tasks", "fusedkv_heldout", "--limit", str(DOCS),
            "--tensorboard-dir", str(tb), "--batch-size", "16"]  # fmt: skip
    assert main(argv) == 0
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # no download could have happened
    report = json.loads((trained["ckpt"] / "eval" / "iter_0000020.json").read_text())
    m = report["metrics"]
    assert report["iteration"] == 20 and report["n-samples"]["fusedkv_heldout"]["effective"] == DOCS
    docs = trained["docs"]
    n_words = sum(count_words(d["text"]) for d in docs)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    nll = math.log(m["fusedkv_heldout/word_perplexity"]) * n_words
    # The three metrics come from the same total NLL.
    assert math.log(m["fusedkv_heldout/byte_perplexity"]) * n_bytes == pytest.approx(nll, rel=1e-9)
    assert m["fusedkv_heldout/bits_per_byte"] * n_bytes * math.log(2) == pytest.approx(nll, 1e-9)
    per_token = nll / trained["n_tokens"]
    print(f"lm-eval NLL/token {per_token:.5f}, trainer validation loss {trained['valid_loss']:.5f}")
    assert per_token == pytest.approx(trained["valid_loss"], rel=TOLERANCE)
    written = scalars(tb, "eval/fusedkv_heldout/word_perplexity")
    assert written == {20: pytest.approx(m["fusedkv_heldout/word_perplexity"], rel=1e-6)}


def test_eval_errors_name_the_fix(tmp_path, capsys):
    from fusedkv_megatron.evaluation import main

    assert main([str(tmp_path), "--tasks", "fusedkv_heldout"]) == 2
    assert "neither a training checkpoint" in capsys.readouterr().err


def test_dtype_bfloat16_evaluates_in_bfloat16(trained, tmp_path):
    """--dtype bfloat16: the export and lm-eval's model are bf16; the held-out loss moves by
    bf16 rounding only (well under 2% here), and is not the fp32 number."""
    from fusedkv_megatron.evaluation import main

    reports = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        argv = [str(trained["ckpt"]), "--tasks", "fusedkv_heldout", "--limit", "2",
                "--batch-size", "16", "--dtype", dtype, "--output", str(out)]  # fmt: skip
        assert main(argv) == 0
        reports[dtype] = json.loads(out.read_text())
    assert reports["bfloat16"]["dtype"] == "bfloat16"
    a, b = (reports[d]["metrics"]["fusedkv_heldout/word_perplexity"] for d in reports)
    print(f"word perplexity fp32 {a:.4f}, bf16 {b:.4f}")
    assert a != b and math.log(b) == pytest.approx(math.log(a), rel=0.02)
