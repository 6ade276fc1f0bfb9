"""`fusedkv-finetune-hf`: continue training an HF export under DeepSpeed ZeRO-2 or ZeRO-3.

    torchrun --nproc-per-node 8 -m fusedkv_megatron.hf.finetune --model hf_model \\
        --data-path corpus.jsonl --deepspeed examples/deepspeed/zero3.json \\
        --seq-length 2048 --micro-batch-size 4 --max-steps 1000 --lr 1e-4 --out hf_model_ft

Built on Hugging Face `Trainer` with a DeepSpeed JSON config ("auto" values are filled from the
flags). The model is loaded with `trust_remote_code` (the export's own modeling code), trained
in fp32 (or `--bf16`), and saved as an HF directory of the same kind: weights, config, remote
code, tokenizer and generation config. `fusedkv-convert-megatron` takes it back to a checkpoint
that `fusedkv-pretrain --load DIR --no-load-optim --no-load-rng` continues from.

Data: a jsonl file (one JSON object per line, text under `--json-key`), tokenized with the
export's tokenizer and an end-of-document token appended to each document, or an indexed
dataset prefix (PREFIX.bin/.idx, as `tools/preprocess_data.py` writes it) used as stored. The
documents are concatenated and cut into blocks of `--seq-length` tokens.

On a machine without CUDA, DeepSpeed uses its CPU accelerator and gloo and compiles a small
C++ op (`deepspeed_shm_comm`) when it starts; torch caches the build under
`TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions), so only the first run pays for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
LOSS_FILE = "train_losses.json"


class FinetuneError(Exception):
    """A bad flag, input or environment; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- environment
def check_environment() -> None:
    """DeepSpeed is installed, and on CPU a C++ compiler exists (checked before DeepSpeed
    starts, whose own error is a long build log)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise FinetuneError(
            f"DeepSpeed is not installed ({err}): pip install 'deepspeed==0.19.8' accelerate, "
            "or the package with its extra: pip install -e '.[deepspeed]'"
        ) from err
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise FinetuneError(
            f"no C++ compiler {compiler!r} on PATH: DeepSpeed on CPU compiles its "
            "deepspeed_shm_comm op when it starts. Install one (Debian/Ubuntu: apt install g++) "
            "or point CXX at a compiler"
        )


# ----------------------------------------------------------------------------- data
def read_jsonl_tokens(path: Path, tokenizer, json_key: str) -> np.ndarray:
    """Every document's tokens followed by the end-of-document (eos) token, concatenated."""
    eod = tokenizer.eos_token_id
    if eod is None:
        raise FinetuneError(
            f"the tokenizer of the model has no eos token to end documents of {path}"
        )
    tokens: list[int] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[json_key]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise FinetuneError(
                    f"{path}:{line_no}: expected a JSON object with a {json_key!r} string "
                    f"({type(err).__name__}: {err}); set --json-key to the text field"
                ) from err
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                tokens.extend(ids)
                tokens.append(eod)
    return np.asarray(tokens, dtype=np.int64)


def read_indexed_tokens(prefix: str) -> np.ndarray:
    """Every document of a Megatron indexed dataset (PREFIX.bin/.idx), concatenated."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    if len(ds) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)


def load_tokens(data_path: str, tokenizer, json_key: str = "text") -> np.ndarray:
    """Tokens of a jsonl file or an indexed dataset prefix (see the module docstring)."""
    if _is_indexed(data_path):
        return read_indexed_tokens(data_path)
    path = Path(data_path)
    if path.is_file():
        return read_jsonl_tokens(path, tokenizer, json_key)
    raise FinetuneError(
        f"--data-path {data_path}: neither a file nor an indexed dataset prefix "
        f"({data_path}.bin and .idx); pass a jsonl file or the prefix preprocess_data.py wrote"
    )


class TokenBlocks(torch.utils.data.Dataset):
    """Consecutive blocks of `seq_length` tokens; the model shifts labels by itself."""

    def __init__(self, tokens: np.ndarray, seq_length: int):
        self.blocks = torch.from_numpy(tokens[: len(tokens) // seq_length * seq_length].copy())
        self.blocks = self.blocks.view(-1, seq_length)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


# ----------------------------------------------------------------------------- DeepSpeed
def read_deepspeed_config(path: str) -> dict:
    """The JSON config; ZeRO-3 saves gather the full weights (else no weights file is written)."""
    try:
        config = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise FinetuneError(
            f"--deepspeed {path}: no such file; examples/deepspeed/ has zero2.json and zero3.json"
        ) from err
    except json.JSONDecodeError as err:
        raise FinetuneError(f"--deepspeed {path}: not valid JSON ({err})") from err
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        log.info("ZeRO-3: setting stage3_gather_16bit_weights_on_model_save=true to save weights")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def partition_report(model) -> str:
    """How many parameters ZeRO-3 partitioned (the fusion weights counted apart)."""
    from ..fusion import parse_fusion_weight_name

    params = dict(model.named_parameters())
    split = {
        n for n, p in params.items() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", 0)
    }
    fusion = {n for n in params if parse_fusion_weight_name(n)}
    return (
        f"{len(split)} of {len(params)} parameters partitioned, "
        f"fusion weights {len(split & fusion)} of {len(fusion)}"
    )


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files, generation config and remote code of the source that a save lacks."""
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and path.name not in WEIGHT_FILES
            and not path.name.endswith(".safetensors")
        ):
            if not (dst / path.name).exists():
                shutil.copyfile(path, dst / path.name)


# ----------------------------------------------------------------------------- training
def finetune(a: argparse.Namespace) -> Path:
    """Train `a.model` on `a.data_path` under DeepSpeed; returns the saved HF directory."""
    check_environment()
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    model_dir, out = Path(a.model), Path(a.out)
    if not (model_dir / "config.json").is_file():
        raise FinetuneError(
            f"--model {model_dir}: no config.json; pass a directory written by fusedkv-convert-hf"
        )
    ds_config = read_deepspeed_config(a.deepspeed)
    # ZeRO-3 partitions parameters while the model is built (zero.Init): the process group and
    # the TrainingArguments (which register the DeepSpeed config) must exist before loading.
    deepspeed.init_distributed()
    cpu = not torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out),
        deepspeed=ds_config,
        use_cpu=cpu,
        per_device_train_batch_size=a.micro_batch_size,
        gradient_accumulation_steps=a.gradient_accumulation_steps,
        max_steps=a.max_steps,
        learning_rate=a.lr,
        lr_scheduler_type=a.lr_scheduler,
        warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay,
        max_grad_norm=a.clip_grad,
        bf16=a.bf16,
        seed=a.seed,
        data_seed=a.seed,
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        save_only_model=False,
        report_to="none",
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    tokenizer = (
        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        if not _is_indexed(a.data_path)
        else None
    )
    tokens = load_tokens(a.data_path, tokenizer, a.json_key)
    dataset = TokenBlocks(tokens, a.seq_length)
    per_step = args.world_size * a.micro_batch_size
    if len(dataset) < per_step:
        raise FinetuneError(
            f"--data-path {a.data_path}: {len(tokens)} tokens make {len(dataset)} blocks of "
            f"--seq-length {a.seq_length}, fewer than one micro batch per process "
            f"({args.world_size} x {a.micro_batch_size}); add data or lower the two flags"
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=torch.float32
    )
    model.config.use_cache = False  # training: no K/V cache to fill
    log.info(
        "ZeRO stage %s: %s", ds_config["zero_optimization"].get("stage"), partition_report(model)
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        copy_side_files(model_dir, out)
        losses = [
            {k: e[k] for k in ("step", "loss", "learning_rate", "grad_norm") if k in e}
            for e in trainer.state.log_history
            if "loss" in e
        ]
        (out / LOSS_FILE).write_text(json.dumps(losses, indent=1) + "\n")
        log.info("saved %s (loss %s -> %s)", out, losses[0]["loss"], losses[-1]["loss"])
    trainer.accelerator.wait_for_everyone()
    return out


def _is_indexed(data_path: str) -> bool:
    return Path(data_path + ".bin").is_file() and Path(data_path + ".idx").is_file()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedkv-finetune-hf",
        description="Continue training an HF export (fusedkv-convert-hf) under DeepSpeed ZeRO "
        "with Hugging Face Trainer; launch with torchrun or deepspeed.",
    )
    p.add_argument("--model", required=True, help="HF directory (fusedkv-convert-hf output)")
    p.add_argument("--out", required=True, help="HF directory to save the trained model in")
    p.add_argument("--deepspeed", required=True, help="DeepSpeed JSON (examples/deepspeed/)")
    p.add_argument("--data-path", required=True, help="jsonl file or indexed dataset prefix")
    p.add_argument("--json-key", default="text", help="text field of the jsonl objects")
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per training sequence")
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per process")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-scheduler", default="cosine", help="HF scheduler name (cosine, linear)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clip (0: off)")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (fp32 master weights)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save-steps", type=int, default=0,
                   help="DeepSpeed checkpoints under OUT/checkpoint-N every N steps (0: none)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="resume from OUT's latest checkpoint-N")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stdout)
    a = build_parser().parse_args(argv)
    try:
        finetune(a)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
