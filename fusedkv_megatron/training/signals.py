"""SIGTERM / SIGUSR1: finish the current iteration, save a checkpoint, exit 0 (SLURM preemption).

The handler only sets a flag; the loop checks it once per iteration, agreed over all ranks (a
signal may reach the ranks at different iterations), then saves and exits cleanly. SLURM's
`--signal=USR1@120` or `scancel --signal=TERM` both work; the sbatch script requeues the job.
"""

from __future__ import annotations

import signal

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitSignalHandler:
    """Records the first exit signal received; restores the previous handlers on `release`."""

    def __init__(self, signals=EXIT_SIGNALS):
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def name(self) -> str | None:
        return None if self.received is None else signal.Signals(self.received).name

    def release(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
