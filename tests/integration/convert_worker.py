"""torchrun worker (TP=2 x PP=2, 4 ranks): one checkpoint per variant, in the trainer's layout.

Every rank builds its stage of the model, fills its parameters with seeded random values and
saves with dist_checkpointing under ROOT/<variant>/iter_0000007 with fusedkv_run.json, the
tokenizer model and the tracker.

    torchrun --nproc-per-node 4 convert_worker.py ROOT TOKENIZER_MODEL
"""

from __future__ import annotations

import sys

# Imports live in main(): dist_checkpointing's writer spawns a helper process that re-imports
# this file, and it should not pay for torch and Megatron again.


def main(root: str, tokenizer_model: str) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from fusedkv_megatron import VARIANTS, compat
    from tests.integration.hf_tiny import TP_PP, build_tiny, randomize, save_checkpoint

    torch.set_num_threads(1)
    compat.apply()  # Megatron's CPU patches, before seeding
    dist.init_process_group("gloo")
    tp, pp = TP_PP
    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(1234)
    for variant in VARIANTS:
        model = build_tiny(variant, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        randomize(model, dist.get_rank())
        save_checkpoint(model, root, variant, tokenizer_model)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
