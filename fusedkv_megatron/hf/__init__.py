"""Hugging Face export and inference (docs/hf.md).

configuration_fusedkv.py, modeling_fusedkv.py   the exported remote code (torch/transformers
                                                only; copied next to the weights)
convert.py       fusedkv-convert-hf / fusedkv-convert-megatron
mapping.py       configs and parameter names, Megatron <-> HF
megatron_io.py   torch_dist checkpoints <-> whole state dicts, from one CPU process
tokenizer.py     the SentencePiece model as an offline `tokenizers` tokenizer
"""
