"""Megatron torch_dist checkpoint -> Hugging Face directory (same as `fusedkv-convert-hf`).

    python tools/convert_to_hf.py --load CKPT_DIR --out HF_DIR [--dtype bfloat16]

The way back is `fusedkv-convert-megatron` (fusedkv_megatron.hf.convert:main_to_megatron).
"""

import sys

if __name__ == "__main__":  # dist_checkpointing's helper process re-imports __main__
    from fusedkv_megatron.hf.convert import main_to_hf

    sys.exit(main_to_hf())
