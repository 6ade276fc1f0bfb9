"""`fusedkv-pretrain` / `python -m fusedkv_megatron.pretrain`: pretrain a KV-sharing model.

    torchrun --nproc-per-node 4 -m fusedkv_megatron.pretrain --config examples/configs/tiny.yaml \
        --kv-sharing fusedkv --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --data-path data/corpus_text_document --tokenizer-model data/tokenizer.model \
        --save ckpt --load ckpt --tensorboard-dir tb

Flags follow Megatron-LM's names (see `--help` and docs/training.md). Without torchrun it runs
as one process; without CUDA on the CPU under gloo. Exit codes: 0 done (also after a signal or
time/interval exit, with a checkpoint saved), 2 bad configuration or inputs, 3 diverged.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def run(args) -> int:
    """Train (or evaluate) as `args` say. Exit signals are caught from the very start: one
    received during start-up stops training after its first iteration, with a checkpoint."""
    from . import compat
    from .training.signals import ExitSignalHandler

    compat.apply()  # Megatron's CPU patches and upstream fixes, before seeding and building
    signals = ExitSignalHandler()
    try:
        return _run(args, signals)
    finally:
        signals.release()


def _run(args, signals) -> int:
    import torch

    from . import checkpoint_format as fmt
    from .data.datasets import build_train_valid_test_datasets
    from .training.checkpointing import (
        AsyncSaves,
        TrainState,
        check_save_dir,
        load_checkpoint,
        optimizer_metadata,
        save_checkpoint,
    )
    from .training.flags_checkpoint import checkpoint_to_load
    from .training.host_memory_check import check_host_memory
    from .training.initialize import setup
    from .training.loop import Trainer
    from .training.model_size import ModelShape, flops_per_token, peak_tflops
    from .training.reporting import Reporter, print_first, print_last, startup_report

    rt = setup(args)
    a = args
    if a.host_memory_check:  # before the first step: a run that cannot save stops here
        check_host_memory(rt)
    # a tokenizer file or directory is kept with every checkpoint
    tokenizer_file = a.tokenizer_model if fmt.tokenizer_entry(a.tokenizer_type) else None
    if tokenizer_file and a.save and _inside(tokenizer_file, a.save):
        # --use-checkpoint-args found it in a checkpoint that --keep-latest-k may delete while
        # later saves still copy it: keep a copy for this run.
        kept = tempfile.TemporaryDirectory(prefix="fusedkv-tokenizer-")
        tokenizer_file = str(fmt.copy_tokenizer(tokenizer_file, kept.name))
    run_info = fmt.training_run_info(a, rt.config, rt.kv, rt.padded_vocab_size, rt.tokenizer)
    startup_report(rt)

    if a.save:
        check_save_dir(a.save)
    state = TrainState()
    ckpt, source = checkpoint_to_load(a)
    if ckpt is None and a.load:
        print_first(f"> no checkpoint in {a.load}: starting from scratch")
    elif ckpt is not None:
        if source == "--pretrained-checkpoint":
            print_first(f"> no checkpoint in --load {a.load}: starting from {ckpt} (weights)")
        state = load_checkpoint(
            ckpt,
            rt.model,
            rt.optimizer,
            rt.scheduler,
            run_info,
            tokenizer_file,
            load_optim=not a.no_load_optim,
            load_rng=not a.no_load_rng,
            finetune=a.finetune or source == "--pretrained-checkpoint",
        )
    gbs = a.global_batch_size
    eval_samples = a.eval_iters * gbs
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        a.data_path,
        a.split,
        a.seq_length,
        a.seed,
        (a.train_samples_total, eval_samples, eval_samples),
        rt.tokenizer,
        mock=a.mock_data,
        data_cache_path=a.data_cache_path,
        train_data_path=a.train_data_path,
        valid_data_path=a.valid_data_path,
        test_data_path=a.test_data_path,
        # The attention builds its causal mask itself; packed documents need the mask.
        create_attention_mask=a.reset_attention_mask,
        reset_position_ids=a.reset_position_ids,
        reset_attention_mask=a.reset_attention_mask,
        eod_mask_loss=a.eod_mask_loss,
    )

    shape = ModelShape.from_args(a, rt.padded_vocab_size)
    reporter = Reporter(a, flops_per_token(shape, rt.kv, a.seq_length), peak_tflops())
    if reporter.writer is not None:
        reporter.writer.add_text(
            "arguments", "\n".join(f"    {k}: {v}" for k, v in sorted(vars(a).items()))
        )

    metadata = optimizer_metadata(
        a.dist_ckpt_optim_fully_reshardable, a.distrib_optim_fully_reshardable_mem_efficient
    )
    async_saves = AsyncSaves() if a.async_save else None

    def save(st):
        save_checkpoint(
            a.save,
            rt.model,
            rt.optimizer,
            rt.scheduler,
            st,
            run_info,
            tokenizer_file,
            keep_latest_k=a.keep_latest_k,
            kill_at=a.inject_kill_during_save,
            metadata=metadata,
            async_saves=async_saves,
        )

    trainer = Trainer(rt, train_ds, valid_ds, test_ds, reporter, signals, save, async_saves)
    reason = "skip-train"
    committed = False
    try:
        if not a.skip_train:
            start = state.iteration
            print_first(f"> training from iteration {start} to {a.train_iters}")
            state, reason = trainer.train(state)
            saved = a.save_interval and state.iteration % a.save_interval == 0
            saved = saved or (a.save_first and state.iteration == start + 1)
            if reason == "done" and a.save and state.iteration > start and not saved:
                save(state)
            if async_saves is not None:
                async_saves.close()  # commit what is still being written
            committed = True
        if reason in ("done", "skip-train"):
            trainer.evaluate(valid_ds, "validation", state.iteration)
            trainer.evaluate(test_ds, "test", state.iteration)
        else:
            print_last(
                f"> exiting at iteration {state.iteration}: "
                f"{signals.name or reason}; checkpoint "
                f"{'saved' if a.save else 'NOT saved (no --save)'}"
            )
    finally:
        if async_saves is not None and not committed:
            async_saves.abort()
        reporter.close()
    torch.distributed.barrier()
    return 0


def _inside(path: str, directory: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(directory).resolve())


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are bad input or configuration: exit 2 with their message, no traceback."""
    from .checkpoint_format import CheckpointFormatError
    from .config import KVSharingError
    from .data.datasets import DataError
    from .data.tokenizer import TokenizerError
    from .pipeline import PipelineConfigError
    from .training.arguments import ArgumentError

    return (
        ArgumentError,
        KVSharingError,
        PipelineConfigError,
        CheckpointFormatError,
        TokenizerError,
        DataError,
        FileNotFoundError,
    )


def _parse(argv: list[str] | None):
    """Parse and check what needs no torch (the flags, the model shape): --help and these
    errors come back in well under a second. Returns (args, None) or (None, exit code)."""
    from .training.arguments import ArgumentError, check_model_shape, parse_args

    try:
        args = parse_args(argv)
        if not args.use_checkpoint_args:
            check_model_shape(args)
    except ArgumentError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank meets it; one says it
            print(f"error: {e}", file=sys.stderr, flush=True)
        return None, 2
    return args, None


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (on any rank), 3 diverged. A failure on one rank ends
    every rank within seconds (training/failures.py)."""
    args, code = _parse(argv)
    if args is None:
        return code
    args.start_time = time.time()  # --exit-duration-in-mins counts from here
    import torch

    from .training import failures
    from .training.arguments import validate_args
    from .training.initialize import init_distributed
    from .training.loop import TrainingDiverged

    code = 0
    owns_group = not torch.distributed.is_initialized()  # a caller's group is left alone
    callers_groups = _process_groups()
    watch = failures.PeerFailureWatch()
    try:
        init_distributed(args.distributed_backend, args.distributed_timeout_minutes)
        with watch:
            validate_args(args, torch.distributed.get_world_size(), torch.cuda.is_available())
            code = run(args)
    except _user_errors() as e:
        watch.stop()
        code = failures.report(e, 2)
    except TrainingDiverged as e:
        watch.stop()
        code = failures.report(e, 3)
    except Exception as e:
        watch.stop()
        peer = failures.peer_failure()
        if peer is not None and peer["rank"] != torch.distributed.get_rank():
            code = failures.stopped_by(peer)  # a consequence of another rank's failure
        else:
            failures.report(e, 1, internal=True)  # the peers stop; the traceback follows
            raise
    finally:
        from megatron.core import parallel_state

        if code and owns_group and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                # Peers may be waiting in a collective that will never complete: leave now
                # rather than risk a hang in destroying the group.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        parallel_state.destroy_model_parallel()  # drops Megatron's handles, destroys nothing
        if owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        else:  # a caller's world: destroy the groups this run made (Megatron drops only handles)
            for group in _process_groups() - callers_groups:
                torch.distributed.destroy_process_group(group)
    return code


def _process_groups() -> set:
    """Every live process group (torch has no public list of them)."""
    import torch

    if not torch.distributed.is_initialized():
        return set()
    return set(torch.distributed.distributed_c10d._world.pg_map)


if __name__ == "__main__":  # the checkpoint writer's spawned Manager re-imports __main__
    sys.exit(main())
