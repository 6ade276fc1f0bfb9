#!/usr/bin/env python
"""Tokenize jsonl/text into Megatron indexed datasets (.bin/.idx), with Megatron-LM's flags.

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/my \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tokenizers/my.model \
        --append-eod --workers 4

or, with a local Hugging Face tokenizer directory (Megatron-LM's HuggingFaceTokenizer),

    python tools/preprocess_data.py --input data.jsonl --output-prefix data/my \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/Llama-3.2-1B \
        --append-eod --workers 4

writes data/my_text_document.bin/.idx (pass data/my_text_document to --data-path). The logic
lives in fusedkv_megatron/data/preprocess.py
(its command line in preprocess_cli.py); --help lists every option.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

from fusedkv_megatron.data.preprocess_cli import preprocess_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(preprocess_main())
