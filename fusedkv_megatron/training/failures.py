"""Failures on any rank end the whole run within seconds, with the message where it is seen.

A rank that meets an error posts it to the job's rendezvous store (the key carries torchrun's
restart count, so a restarted job starts clean) and exits. Every other rank runs a
`PeerFailureWatch` thread that polls the store: when a peer has failed, it exits the process
with code 2 instead of waiting in a collective until the distributed timeout (NCCL would wait
the full timeout; gloo fails sooner with "connection closed", which `peer_failure` turns into
the same clean exit). Messages are printed once: rank 0 prints its own; any other rank prints
its message with its rank and host unless rank 0 reported the same one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import torch

_ROUND = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
_FIRST = f"fusedkv/failure/{_ROUND}/first"
_COUNT = f"fusedkv/failure/{_ROUND}/count"
_RANK0_WAIT = 1.0  # seconds a rank waits to see whether rank 0 met the same error
_REPORT_GRACE = _RANK0_WAIT + 0.5


def _rank_key(rank: int) -> str:
    return f"fusedkv/failure/{_ROUND}/rank{rank}"


def _store():
    """The default process group's store, or None (no group, or a store we cannot reach)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return None
    try:  # torch has no public accessor for the default group's store
        return torch.distributed.distributed_c10d._get_default_store()
    except Exception:
        return None


def _rank() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _print(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def report(err: BaseException, code: int, *, internal: bool = False) -> int:
    """Tell the user (once) and the peers (through the store) that this rank failed with
    `err`; returns `code`. `internal`: an unexpected exception, whose traceback the caller
    re-raises; the peers still stop at once."""
    rank, host = _rank(), socket.gethostname()
    message = f"{type(err).__name__}: {err}" if internal else str(err)
    store = _store()
    if store is None:
        if rank == 0 and not internal:
            _print(f"error: {message}")
        return code
    try:
        store.set(_rank_key(rank), message)
        if store.add(_COUNT, 1) == 1:
            store.set(_FIRST, json.dumps({"rank": rank, "host": host, "message": message}))
    except Exception:  # the store is gone (torchrun tearing down): print locally
        pass
    if internal:
        return code
    if rank == 0 or not _rank0_said(store, message):
        prefix = "error" if rank == 0 else f"error (rank {rank}, host {host})"
        _print(f"{prefix}: {message}")
    return code


def _rank0_said(store, message: str, wait: float = _RANK0_WAIT) -> bool:
    """Whether rank 0 reported the same message within `wait` seconds (a config error that
    every rank meets is printed once)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            if store.check([_rank_key(0)]):
                return store.get(_rank_key(0)).decode() == message
        except Exception:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def peer_failure() -> dict | None:
    """{"rank", "host", "message"} of the first rank that failed, or None."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_FIRST]):
            return json.loads(store.get(_FIRST).decode())
    except Exception:
        return None
    return None


def stopped_by(peer: dict) -> int:
    """This rank stops because `peer` failed: rank 0 says so; exit code 2."""
    if _rank() == 0 and peer["rank"] != 0:
        _print(
            f"error: stopping: rank {peer['rank']} (host {peer['host']}) failed: {peer['message']}"
        )
    # Without torchrun, rank 0's process hosts the store: give the failing rank the moment
    # it needs to finish its report before the store goes away with this process.
    time.sleep(_REPORT_GRACE)
    return 2


class PeerFailureWatch:
    """A daemon thread that ends this process with code 2 once another rank has failed.
    A no-op in a one-process run. Use as a context manager around the run."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self._rank = _rank()

    def __enter__(self) -> PeerFailureWatch:
        self._store = _store()
        if self._store is not None:
            self._thread = threading.Thread(
                target=self._run, name="fusedkv-peer-watch", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                failed = self._store.check([_FIRST])
            except Exception:
                return  # the store is gone: the launcher is tearing the job down
            if failed and not self._stop.is_set():
                peer = peer_failure()
                if peer is None or peer["rank"] == self._rank:
                    return  # our own failure: the main thread reports it
                stopped_by(peer)
                sys.stdout.flush()
                os._exit(2)
