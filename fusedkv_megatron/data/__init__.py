"""Data tooling: tokenizers (`tokenizer.py`), preprocessing text into Megatron indexed datasets
(`preprocess.py`, the `tools/preprocess_data.py` CLI in `preprocess_cli.py`), and building the
train/valid/test datasets and the embedded corpus (`datasets.py`). The embedded public-domain
corpus lives here too (`*.jsonl.gz`, README.md). Importing this package loads nothing else.
"""
