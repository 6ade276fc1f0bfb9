"""torchrun worker (4 processes): the trainer's loop with data-parallel overlap on and off.

    torchrun --nproc-per-node 4 overlap_worker.py RESULTS.json

For each layout (DP=2 with TP=2; DP=2 x PP=2 interleaved (VPP=2), where the parameter
gather is aligned over stages by the schedule) it runs the real `Trainer.train` (mock data,
distributed optimizer, 2 microbatches per step, small buckets, an evaluation and a save in the
middle) three times: without overlap ("off"), with --overlap-grad-reduce ("grad") and with
--overlap-grad-reduce --overlap-param-gather ("on"). It records every training loss, every validation loss, the weights
each save saw (this rank's copy of every parameter) and the final weights, and, after one
more step, whether the weights were stale before `gather_params` (they must be with the
parameter gather overlapped: the proof that the flag really defers the gather).
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

from fusedkv_megatron import compat
from fusedkv_megatron.data.datasets import build_train_valid_test_datasets
from fusedkv_megatron.training.arguments import parse_args, validate_args
from fusedkv_megatron.training.checkpointing import TrainState
from fusedkv_megatron.training.initialize import init_distributed, setup
from fusedkv_megatron.training.loop import Trainer, gather_params
from fusedkv_megatron.training.reporting import Reporter
from tests.conftest import release_process_groups

BASE = [
    "--mock-data", "--vocab-size", "256", "--num-layers", "4", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "32",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "3e-3", "--min-lr", "3e-4",
    "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2", "--eval-iters", "1",
    "--save-interval", "3", "--seed", "7", "--use-distributed-optimizer",
    "--ddp-bucket-size", "20000",
]  # fmt: skip
LAYOUTS = {
    "dp2-tp2": ["--tensor-model-parallel-size", "2"],
    "dp2-pp2-vpp2": ["--pipeline-model-parallel-size", "2",
                     "--num-layers-per-virtual-pipeline-stage", "1"],
}  # fmt: skip
MODES = {
    "off": [],
    "grad": ["--overlap-grad-reduce"],
    "on": ["--overlap-grad-reduce", "--overlap-param-gather"],
}


class _NoSignals:
    received = None
    name = None


def _weights(model) -> torch.Tensor:
    """This rank's copy of every parameter, flattened."""
    return torch.cat([p.detach().double().flatten() for m in model for p in m.parameters()])


def run(layout: list[str], mode: list[str], save_dir: str) -> dict:
    args = parse_args([*BASE, *layout, *mode, "--save", save_dir])
    args = validate_args(args, dist.get_world_size(), cuda=False)
    rt = setup(args)
    gbs = args.global_batch_size
    train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
        None, args.split, args.seq_length, args.seed,
        (args.train_iters * gbs + 2 * gbs, gbs, gbs), rt.tokenizer, mock=True,
        create_attention_mask=False,
    )  # fmt: skip
    reporter = Reporter(args, 1.0, None)
    out = {"loss": [], "valid": [], "saved": [], "align": rt.model[0].ddp_config.align_param_gather}
    record, log_eval = reporter.record, reporter.log_eval

    def on_record(loss, grad_norm, samples=None):
        out["loss"].append(loss)
        record(loss, grad_norm, samples)

    def on_eval(name, iteration, loss):
        out["valid"].append(loss)
        log_eval(name, iteration, loss)

    reporter.record, reporter.log_eval = on_record, on_eval
    trainer = Trainer(
        rt, train_ds, valid_ds, test_ds, reporter, _NoSignals(),
        lambda state: out["saved"].append(_weights(rt.model)),
    )  # fmt: skip
    state, reason = trainer.train(TrainState())
    assert reason == "done" and state.iteration == args.train_iters
    out["final"] = _weights(rt.model)
    trainer.evaluate(valid_ds, "validation", state.iteration)
    # One more step: is the update visible before an explicit gather?
    data = trainer._data(train_ds, state.consumed_train_samples)
    trainer.train_step(state, data, False, trainer.batch_sizes.at(state.consumed_train_samples))
    before = _weights(rt.model)
    gather_params(rt.model)
    out["stale_before_gather"] = not torch.equal(before, _weights(rt.model))
    reporter.close()
    return out


def main() -> None:
    compat.apply()
    init_distributed(None, 10)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lname, layout in LAYOUTS.items():
            runs = {}
            for mname, mode in MODES.items():
                try:
                    runs[mname] = run(layout, mode, f"{tmp}/{lname}-{mname}")
                except Exception:
                    runs[mname] = {"error": traceback.format_exc()}
                release_process_groups()
            ok = all("error" not in r for r in runs.values())
            for r in runs.values():
                for ref in ("off", "grad") if ok else ():
                    r[f"final_vs_{ref}"] = (r["final"] - runs[ref]["final"]).abs().max().item()
                    r[f"saved_vs_{ref}"] = max(
                        (a - b).abs().max().item() for a, b in zip(r["saved"], runs[ref]["saved"])
                    )
                r["saves"] = len(r.get("saved", ()))
            for mname, r in runs.items():
                r.pop("final", None)
                r.pop("saved", None)
                results[f"{lname}/{mname}"] = r
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
