"""--wandb-project: every TensorBoard scalar also goes to Weights & Biases (offline mode here,
read back from the run's files), and asking for it without wandb installed exits 2 with the fix.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from tests.integration.trainer_helpers import (
    TINY,
    cli_command,
    cli_env,
    data_flags,
    default_data,
    run_cli,
    scalar_tags,
    scalars,
)

pytestmark = pytest.mark.slow


def _records(run_dir) -> list:
    """The protobuf records of an offline run's run-*.wandb file. The file is a W&B header (7
    bytes) and then LevelDB-log blocks of 32 KiB: chunks of (crc32, length u16, kind u8, data),
    kind 1 = a whole record, 2/3/4 = its first/middle/last part; block tails under 7 bytes are
    padding. wandb 0.31 ships no Python reader for it (its core is a Go binary)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    buf = path.read_bytes()
    assert buf[:4] == b":W&B"
    pos, block, records, part = 7, 32768, [], b""
    while pos + 7 <= len(buf):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", buf, pos + 4)
        part += buf[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_wandb_offline_logs_the_tensorboard_scalars(tmp_path_factory, tmp_path):
    from tests.conftest import free_port  # wandb comes with the test extra: no skip

    data = default_data(tmp_path_factory)
    argv = [*TINY, *data_flags(data), "--train-iters", "3", "--eval-interval", "3",
            "--tensorboard-dir", tmp_path / "tb", "--wandb-project", "fusedkv-test",
            "--wandb-exp-name", "tiny", "--wandb-save-dir", tmp_path / "wb"]  # fmt: skip
    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cli_command(argv, 1, free_port()), capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    records = _records(run_dir)
    logged: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
            for key, value in row.items():
                if not key.startswith("_"):
                    logged.setdefault(key, {})[row["_step"]] = value
    tags = scalar_tags(tmp_path / "tb")
    assert {"lm loss", "grad-norm", "validation/lm loss"} < set(tags)
    assert any(t.startswith("fusion/layer_") for t in tags)  # the fusion-weight statistics
    assert set(logged) == set(tags)
    for tag in tags:  # TensorBoard stores float32
        tb = scalars(tmp_path / "tb", tag)
        assert logged[tag] == {step: pytest.approx(v, rel=1e-6) for step, v in tb.items()}, tag
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("fusedkv-test", "tiny")
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["train_iters"] == 3 and config["kv_sharing"] == "fusedkv"


def test_wandb_missing_is_a_clear_error(tmp_path_factory, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec("wandb") is then None
    data = default_data(tmp_path_factory)
    argv = [*TINY, *data_flags(data), "--train-iters", "1", "--wandb-project", "p"]
    code, _, err = run_cli(argv, capfd)
    assert code == 2
    assert "needs the wandb package" in err and "fusedkv_megatron[wandb]" in err
