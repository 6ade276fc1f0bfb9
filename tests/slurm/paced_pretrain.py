"""fusedkv-pretrain for the SLURM time-limit test: in the first start of a job each iteration
takes at least PACE_S seconds; later starts (after a requeue) run at full speed.

The test needs the first start to be still training when SLURM's own time-limit signal comes,
and the second start to finish before the next one, on a fast machine or a loaded one alike.
Submitted with `slurm/submit.py --trainer-module tests.slurm.paced_pretrain`.

Each worker also prints a line when it receives its first exit signal (USR1/TERM), with its SLURM
node and rank, so that a test can tell which nodes' workers the signal reached.
"""

from __future__ import annotations

import os
import signal
import sys
import time

PACE_S = 6.0


def _paced(train_step, seconds: float):
    def step(self, *args, **kwargs):
        t0 = time.monotonic()
        result = train_step(self, *args, **kwargs)
        time.sleep(max(0.0, seconds - (time.monotonic() - t0)))
        return result

    return step


def _reporting(handle):
    def report(self, signum, frame):
        if self.received is None:
            node, rank = os.environ.get("SLURMD_NODENAME", "?"), os.environ.get("RANK", "?")
            name = signal.Signals(signum).name
            print(
                f"[paced_pretrain] node {node} rank {rank} got {name}", file=sys.stderr, flush=True
            )
        handle(self, signum, frame)

    return report


def main() -> int:
    from fusedkv_megatron.pretrain import main as pretrain
    from fusedkv_megatron.training.loop import Trainer
    from fusedkv_megatron.training.signals import ExitSignalHandler

    ExitSignalHandler._handle = _reporting(ExitSignalHandler._handle)

    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        Trainer.train_step = _paced(Trainer.train_step, PACE_S)
    return pretrain()


if __name__ == "__main__":  # the checkpoint writer's spawned helper re-imports __main__
    sys.exit(main())
