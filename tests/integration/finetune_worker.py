"""torchrun worker: `fusedkv-finetune-hf` runs one after another in one launch (each launch
pays for importing DeepSpeed and loading its compiled op once).

    torchrun --nproc-per-node 2 finetune_worker.py 'ARGS OF RUN 1' 'ARGS OF RUN 2' ...

Between runs it drops the state that Hugging Face keeps per process (accelerate's singleton
state, the registered DeepSpeed config), as a fresh launch would.
"""

from __future__ import annotations

import shlex
import sys


def main(runs: list[str]) -> None:
    import torch

    from fusedkv_megatron.hf.finetune import main as finetune

    torch.set_num_threads(1)
    for run in runs:
        from accelerate.state import AcceleratorState, PartialState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
        code = finetune(shlex.split(run))
        if code != 0:
            sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
