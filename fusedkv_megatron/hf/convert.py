"""Megatron torch_dist checkpoint <-> Hugging Face directory, both ways (console scripts).

    fusedkv-convert-hf --load CKPT_DIR --out HF_DIR
    fusedkv-convert-megatron --hf HF_DIR --save CKPT_DIR \\
        --tensor-model-parallel-size N --pipeline-model-parallel-size M

vanilla/gqa models export as stock `Qwen3ForCausalLM`; KV-sharing variants as
`FusedKVForCausalLM` with configuration_fusedkv.py / modeling_fusedkv.py next to the weights
(`auto_map`, load with `trust_remote_code=True`; they do not import this package).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from .. import checkpoint_format as ckpt_format
from .configuration_fusedkv import FusedKVConfig
from .mapping import (
    ConversionError,
    hf_config_from_run_info,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    run_info_sections_from_hf_config,
)
from .tokenizer import (
    SP_MODEL_FILE,
    export_hf_tokenizer,
    export_sentencepiece,
    hf_tokenizer_run_info,
)

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_fusedkv.py", "modeling_fusedkv.py", "triton_decode_fusedkv.py")
AUTO_MAP = {
    "AutoConfig": "configuration_fusedkv.FusedKVConfig",
    "AutoModel": "modeling_fusedkv.FusedKVModel",
    "AutoModelForCausalLM": "modeling_fusedkv.FusedKVForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- Megatron -> HF
def _prepare_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--out {out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)


def write_hf_weights(
    cfg,
    tensors: dict[str, torch.Tensor],
    out: Path,
    dtype: torch.dtype,
    max_shard_size: str = "5GB",
) -> None:
    """config.json + safetensors (sharded with an index past max_shard_size) + remote code."""
    from huggingface_hub import save_torch_state_dict

    if cfg.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    # Own, contiguous copies: safetensors refuses views that share storage (split QKV, fc1).
    tensors = {k: v.detach().to(dtype=dtype, copy=True).contiguous() for k, v in tensors.items()}
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if isinstance(cfg, FusedKVConfig):
        cfg.auto_map = dict(AUTO_MAP)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(HERE / name, out / name)
    cfg.save_pretrained(out)


def megatron_to_hf(
    load: str | Path,
    out: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_model: str | Path | None = None,
    no_tokenizer: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Convert the latest checkpoint under `load` (any TP/PP) into an HF directory `out`."""
    from transformers import GenerationConfig

    from .megatron_io import load_megatron_checkpoint

    out = Path(out)
    info, ckpt_dir, state = load_megatron_checkpoint(load)
    dtype = dtype or state["embedding.word_embeddings.weight"].dtype
    tok_file = None
    if not no_tokenizer:
        tok_file = tokenizer_model or ckpt_format.tokenizer_path(ckpt_dir, info)
        if tok_file is not None and not Path(tok_file).exists():
            raise ConversionError(
                f"tokenizer {tok_file} not found ({ckpt_dir / ckpt_format.RUN_FILE} names "
                f"a {info['tokenizer']['type']}); pass --tokenizer-model PATH (the .model file "
                "or Hugging Face tokenizer directory), or --no-tokenizer to export the weights alone"
            )
    cfg = hf_config_from_run_info(info, dtype)
    tensors = megatron_to_hf_state_dict(state, cfg)
    _prepare_out_dir(out)
    write_hf_weights(cfg, tensors, out, dtype, max_shard_size)
    eod = info["tokenizer"]["eod_id"]
    if tok_file is not None and Path(tok_file).is_dir():
        export_hf_tokenizer(tok_file, out, eod)
    elif tok_file is not None:
        export_sentencepiece(tok_file, out, eod)
    elif not no_tokenizer:
        log.warning("%s uses %s: no tokenizer files written", ckpt_dir, info["tokenizer"]["type"])
    GenerationConfig(eos_token_id=eod, pad_token_id=eod).save_pretrained(out)
    log.info("exported %s (%s) to %s", ckpt_dir, cfg.architectures[0], out)
    return out


# ----------------------------------------------------------------------------- HF -> Megatron
def load_hf_config(hf_dir: Path):
    """The HF config of an export, read with this package's classes (no remote code)."""
    from transformers import Qwen3Config

    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"--hf {hf_dir}: no config.json; point at a directory written by fusedkv-convert-hf "
            "(or any Qwen3ForCausalLM save_pretrained directory)"
        )
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type == FusedKVConfig.model_type:
        return FusedKVConfig.from_pretrained(hf_dir)
    if model_type == "qwen3":
        return Qwen3Config.from_pretrained(hf_dir)
    raise ConversionError(
        f"{path}: model_type={model_type!r} is not convertible; expected 'qwen3' or "
        f"{FusedKVConfig.model_type!r}"
    )


def load_hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors export (single file or sharded with an index)."""
    from safetensors.torch import load_file

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ConversionError(
            f"--hf {hf_dir}: no model.safetensors or model.safetensors.index.json (PyTorch .bin "
            "weights are not read; re-save with save_pretrained(safe_serialization=True))"
        )
    missing = [s for s in shards if not (hf_dir / s).is_file()]
    if missing:
        raise ConversionError(
            f"--hf {hf_dir}: shard(s) {missing} listed in model.safetensors.index.json are "
            f"missing; copy the complete export directory"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(hf_dir / shard))
    return tensors


def _first_id(value) -> int | None:
    return value[0] if isinstance(value, list) and value else value


def hf_to_megatron(
    hf_dir: str | Path,
    save: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    iteration: int = 0,
) -> Path:
    """Convert an HF directory into a torch_dist checkpoint DIR/iter_XXXXXXX at TP=tp/PP=pp."""
    from .megatron_io import save_megatron_checkpoint

    hf_dir = Path(hf_dir)
    cfg = load_hf_config(hf_dir)
    model, kv = run_info_sections_from_hf_config(cfg)
    state = hf_to_megatron_state_dict(load_hf_tensors(hf_dir), cfg)
    tokenizer, sp_file = hf_tokenizer_section(hf_dir, cfg)
    parallel = {
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "virtual_pipeline_model_parallel_size": None,
        "data_parallel_size": 1,
    }
    info = ckpt_format.make_run_info(iteration, model, kv, tokenizer, parallel)
    return save_megatron_checkpoint(state, info, save, tp=tp, pp=pp, tokenizer_file=sp_file)


def hf_tokenizer_section(hf_dir: Path, cfg) -> tuple[dict, Path | None]:
    """The run info's "tokenizer" section for an HF directory, and what the checkpoint stores of
    it: the SentencePiece model file, the directory of a Hugging Face tokenizer, or None without
    a tokenizer (the checkpoint then records a NullTokenizer of the vocabulary size)."""
    hf_tokenizer = hf_tokenizer_run_info(hf_dir, cfg.vocab_size)
    if hf_tokenizer is not None:  # a Hugging Face tokenizer: its files go with the checkpoint
        return hf_tokenizer, hf_dir
    sp_file = hf_dir / SP_MODEL_FILE
    eod = _first_id(cfg.eos_token_id)
    if sp_file.is_file():
        from .tokenizer import _load_proto

        proto = _load_proto(sp_file)
        eod = proto.trainer_spec.eos_id if eod is None else eod
        tokenizer = {
            "type": "SentencePieceTokenizer",
            "model_file": ckpt_format.TOKENIZER_FILE,
            "vocab_size": len(proto.pieces),
            "eod_id": eod,
        }
    else:
        log.warning("%s has no %s: the checkpoint records a NullTokenizer", hf_dir, SP_MODEL_FILE)
        eod = cfg.vocab_size - 1 if eod is None else eod
        tokenizer = {
            "type": "NullTokenizer",
            "model_file": None,
            "vocab_size": cfg.vocab_size,
            "eod_id": eod,
        }
    return tokenizer, sp_file if sp_file.is_file() else None


# ----------------------------------------------------------------------------- CLIs
def _run(fn, argv_args) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        fn(**argv_args)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main_to_hf(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusedkv-convert-hf", description=megatron_to_hf.__doc__)
    p.add_argument(
        "--load",
        required=True,
        help="the --save directory of training (or one "
        "iter_XXXXXXX directory); its latest checkpoint is converted",
    )
    p.add_argument("--out", required=True, help="new Hugging Face directory")
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="weight dtype of the export (auto: as stored in the checkpoint)",
    )
    p.add_argument(
        "--tokenizer-model",
        help="SentencePiece .model or Hugging Face tokenizer directory to export instead of "
        "the tokenizer stored with the checkpoint",
    )
    p.add_argument("--no-tokenizer", action="store_true", help="write weights and configs only")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (e.g. 2GB)")
    a = p.parse_args(argv)
    return _run(
        megatron_to_hf,
        dict(
            load=a.load,
            out=a.out,
            dtype=None if a.dtype == "auto" else DTYPES[a.dtype],
            tokenizer_model=a.tokenizer_model,
            no_tokenizer=a.no_tokenizer,
            max_shard_size=a.max_shard_size,
        ),
    )


def main_to_megatron(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusedkv-convert-megatron", description=hf_to_megatron.__doc__)
    p.add_argument("--hf", required=True, help="Hugging Face directory (fusedkv-convert-hf output)")
    p.add_argument("--save", required=True, help="checkpoint root for fusedkv-pretrain --load")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--iteration", type=int, default=0, help="iteration number to record")
    a = p.parse_args(argv)
    return _run(
        hf_to_megatron,
        dict(
            hf_dir=a.hf,
            save=a.save,
            tp=a.tensor_model_parallel_size,
            pp=a.pipeline_model_parallel_size,
            iteration=a.iteration,
        ),
    )


if __name__ == "__main__":
    sys.exit(main_to_hf())
