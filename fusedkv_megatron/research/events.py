"""The TensorBoard scalars of one training run, merged over its event files.

A run that was stopped and resumed (fusedkv-pretrain --load) writes one event file per process
into the same --tensorboard-dir. Merging, in the order the files were started: when a later
file logs training scalars ("lm loss"), every point at or after its first training step is
dropped from the earlier files (those iterations were redone from the checkpoint); a point of
the same tag and step in a later file replaces the earlier one (e.g. the final validation of a
rerun that only evaluates). Scalars are keyed by iteration, as the trainer logs them.

Reads event files with tensorboard's own protobuf reader; no TensorFlow, torch or Megatron.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

EVENT_GLOB = "events.out.tfevents.*"
TRAIN_TAG = "lm loss"  # logged at every log interval: marks where a process started training


class NoEventFilesError(FileNotFoundError):
    """A directory without TensorBoard event files."""


@dataclass
class Series:
    """One scalar tag: iterations (sorted) and values."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    @property
    def last(self) -> float | None:
        return self.values[-1] if self.values else None


@dataclass
class RunEvents:
    """Every scalar tag of a run, the text summaries (the trainer's "arguments"), the files."""

    scalars: dict[str, Series]
    texts: dict[str, str]
    files: list[Path]

    def arguments(self) -> dict[str, str]:
        """The trainer's arguments as logged to TensorBoard text ("    name: value" lines)."""
        out = {}
        for line in self.texts.get("arguments", "").splitlines():
            name, sep, value = line.strip().partition(": ")
            if sep:
                out[name] = value
        return out


def event_files(directory: str | os.PathLike) -> list[Path]:
    """Every event file under `directory` (recursively)."""
    return sorted(p for p in Path(directory).rglob(EVENT_GLOB) if p.is_file())


def _read_file(path: Path) -> tuple[float, dict[str, dict[int, float]], dict[str, str]]:
    """(first wall time, {tag: {step: value}}, {tag: text}) of one event file."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    first = None
    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    for record in RawEventFileLoader(str(path)).Load():
        event = event_pb2.Event.FromString(record)
        first = event.wall_time if first is None else first
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind == "simple_value":
                scalars.setdefault(value.tag, {})[int(event.step)] = float(value.simple_value)
                continue
            if kind != "tensor":
                continue
            array = tensor_util.make_ndarray(value.tensor)
            plugin = value.metadata.plugin_data.plugin_name
            if plugin == "text" or array.dtype.kind in "SO":
                text = array.reshape(-1)[0] if array.size else b""
                texts[value.tag.split("/")[0]] = (
                    text.decode() if isinstance(text, bytes) else str(text)
                )
            elif array.size == 1:
                scalars.setdefault(value.tag, {})[int(event.step)] = float(array.reshape(-1)[0])
    return (first or 0.0), scalars, texts


def read_run_events(directory: str | os.PathLike) -> RunEvents:
    """Merged scalars of every event file under `directory` (see the module docstring)."""
    files = event_files(directory)
    if not files:
        raise NoEventFilesError(
            f"no TensorBoard event files ({EVENT_GLOB}) under {directory}: pass a run directory "
            "whose tensorboard/ holds them, or the --tensorboard-dir of fusedkv-pretrain"
        )
    parts = sorted((_read_file(f) + (f,) for f in files), key=lambda p: (p[0], str(p[3])))
    merged: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    for _, scalars, file_texts, _ in parts:
        if scalars.get(TRAIN_TAG):
            restart = min(scalars[TRAIN_TAG])
            for points in merged.values():
                for step in [s for s in points if s >= restart]:
                    del points[step]
        for tag, points in scalars.items():
            merged.setdefault(tag, {}).update(points)
        texts.update(file_texts)
    series = {
        tag: Series(sorted(points), [points[s] for s in sorted(points)])
        for tag, points in merged.items()
        if points
    }
    return RunEvents(series, texts, [p[3] for p in parts])
