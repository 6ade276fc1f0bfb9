#!/usr/bin/env python
"""Train a sentencepiece tokenizer (BPE with byte fallback) from text/jsonl files.

    python tools/train_tokenizer.py --input data.jsonl --json-keys text --vocab-size 32000 \
        --output-prefix tokenizers/my

writes tokenizers/my.model (for --tokenizer-model) and tokenizers/my.vocab. The logic lives in
fusedkv_megatron/data/preprocess.py
(its command line in preprocess_cli.py); --help lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from fusedkv_megatron.data.preprocess_cli import train_tokenizer_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_tokenizer_main())
