"""Checkpoints survive crashes and bad inputs, through the fusedkv-pretrain CLI:

- a save killed (SIGKILL) at any point, chosen at random, synchronous or asynchronous
  (--async-save, including while its writer process is writing), leaves a latest checkpoint
  that loads and resumes, and no writer process behind; so does a kill after a random delay
  while saving every iteration;
- an asynchronous save writes the same tensors as a synchronous one while training goes on;
- `--keep-latest-k` deletes old checkpoints but never the one the tracker names;
- a checkpoint with Transformer Engine `_extra_state` entries loads into a model without them
  and the other way round;
- a --save that is a file or cannot be written, and a damaged checkpoint (truncated or missing
  shards, corrupt metadata) end in exit code 2 and a message naming the path and the fix.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fusedkv_megatron import checkpoint_format as cf
from fusedkv_megatron.training.checkpointing import CRASH_POINTS
from tests.integration.trainer_helpers import (
    REPO,
    TINY,
    cli_command,
    cli_env,
    data_flags,
    default_data,
    run_cli,
    run_subprocess,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


@pytest.fixture(scope="module")
def flags(data):
    return [*TINY, *data_flags(data), "--eval-iters", "0"]


@pytest.fixture(scope="module")
def saved(flags, tmp_path_factory, dist_single):
    """A directory with one good checkpoint of iteration 2 (copied by the damage tests)."""
    from fusedkv_megatron.pretrain import main

    root = tmp_path_factory.mktemp("saved") / "ckpt"
    assert main([str(a) for a in [*flags, "--train-iters", "2", "--save", root]]) == 0
    return root


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.endswith((".tmp", ".old", ".deleting")))


def assert_latest_is_complete(root: Path) -> int:
    latest = cf.read_latest_iteration(root)
    ckpt = cf.latest_checkpoint_dir(root)
    assert ckpt == cf.iteration_dir(root, latest), (ckpt, sorted(os.listdir(root)))
    assert cf.read_run_info(ckpt)["iteration"] == latest
    assert (ckpt / ".metadata").is_file() and list(ckpt.glob("*.distcp"))
    return latest


def assert_no_process_writes(root: Path) -> None:
    """No process of a killed run (a forked checkpoint writer) is left with `root` in its
    command line (a forked process has its parent's)."""
    deadline = time.time() + 10
    while True:
        alive = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(root).encode() in cmdline.read_bytes():
                    alive.append(cmdline.parent.name)
            except OSError:
                pass
        if not alive or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not alive, f"processes still running for {root}: {alive}"


def load_tensors(ckpt: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)


def test_an_async_save_writes_what_a_synchronous_save_writes(flags, tmp_path, capfd):
    import torch

    # The plain optimizer stores its state per parameter; the distributed optimizer's buckets
    # hold uninitialised padding, which differs between any two runs.
    base = [*flags, "--train-iters", "3", "--save-interval", "1"]
    code, out, err = run_cli([*base, "--save", tmp_path / "sync"], capfd)
    assert code == 0, err[-3000:]
    code, out, err = run_cli([*base, "--save", tmp_path / "async", "--async-save"], capfd)
    assert code == 0, err[-3000:]
    blocked = re.findall(r"saved checkpoint of iteration (\d) .*in the background; the loop "
                         r"was blocked ([0-9.]+) s", out)  # fmt: skip
    assert [int(i) for i, _ in blocked] == [1, 2, 3], out[-3000:]
    assert cf.read_latest_iteration(tmp_path / "async") == 3
    for it in (1, 3):  # the first save ran while training went on; the last one at the end
        a = load_tensors(cf.iteration_dir(tmp_path / "sync", it))
        b = load_tensors(cf.iteration_dir(tmp_path / "async", it))
        tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
        assert len(tensors) > 20 and set(a) == set(b)
        for k in tensors:
            assert torch.equal(a[k], b[k]), (it, k)


def test_a_kill_at_random_points_of_a_save_leaves_a_loadable_latest(flags, tmp_path, capfd):
    """Every crash point once, in random order, on a new iteration or on a re-save of the
    iteration the tracker names; then kills after a random delay while every iteration saves.
    Each run starts by loading the latest checkpoint, so each kill is checked by the next run."""
    seed = int(os.environ.get("FUSEDKV_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    root = tmp_path / "ckpt"
    base = [*flags, "--save", root, "--keep-latest-k", "2"]
    code, _, err = run_cli([*base, "--train-iters", "2", "--save-interval", "1"], capfd)
    assert code == 0, err[-3000:]
    points = rng.sample(CRASH_POINTS, len(CRASH_POINTS))
    # (a re-save from scratch has nothing to delete, so it never reaches mid-retention)
    resaves = set(rng.sample([p for p in points if p != "mid-retention"], 2))
    for point in points:
        latest = assert_latest_is_complete(root)
        if point in resaves:  # a run from scratch saves again the iteration the tracker names
            argv = [*base, "--train-iters", latest, "--save-interval", latest]
        else:
            argv = [*base, "--load", root, "--train-iters", latest + 2, "--save-interval", "1"]
        in_background = point == "async-writing" or rng.random() < 0.5
        if in_background:
            argv.append("--async-save")
        proc = run_subprocess([*argv, "--inject-kill-during-save", point])
        context = (
            f"seed {seed}, point {point}, resave {point in resaves}, async {in_background}\n"
            f"{proc.stderr[-3000:]}"
        )
        assert proc.returncode == -signal.SIGKILL, context
        if point not in resaves:
            assert f"training from iteration {latest} to {latest + 2}" in proc.stdout, context
        assert_no_process_writes(root)
        assert_latest_is_complete(root)

    for _ in range(2):  # real kills at a random moment, saving at every iteration
        latest = assert_latest_is_complete(root)
        argv = [*base, "--load", root, "--train-iters", "1000", "--save-interval", "1"]
        with open(tmp_path / "stderr.txt", "w") as errors:
            proc = subprocess.Popen(cli_command(argv), stdout=subprocess.PIPE, stderr=errors,
                                    text=True, env=cli_env(), cwd=REPO)  # fmt: skip
            try:
                for line in proc.stdout:
                    if line.startswith(" iteration"):
                        break
                time.sleep(rng.uniform(0.0, 1.5))
            finally:
                proc.kill()
                proc.communicate(timeout=60)
        assert_latest_is_complete(root)

    latest = assert_latest_is_complete(root)
    code, out, err = run_cli([*base, "--load", root, "--train-iters", latest + 1], capfd)
    assert code == 0, f"seed {seed}\n{err[-3000:]}"
    assert f"training from iteration {latest} to {latest + 1}" in out
    assert assert_latest_is_complete(root) == latest + 1
    assert leftovers(root) == []
    assert cf.complete_iterations(root) == [latest, latest + 1]  # --keep-latest-k 2


def test_keep_latest_k_never_deletes_the_latest(flags, tmp_path, capfd, dist_single):
    root = tmp_path / "ckpt"
    code, _, err = run_cli([*flags, "--save", root, "--train-iters", "4", "--save-interval",
                            "1"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert cf.complete_iterations(root) == [1, 2, 3, 4]
    # Roll back to iteration 2 and keep one checkpoint, given in a YAML config: iteration 3 is
    # saved again and kept; 1 and 2 go; 4, of the abandoned continuation, is left alone.
    cf.write_latest_iteration(root, 2)
    config = tmp_path / "keep.yaml"
    config.write_text("keep_latest_k: 1\n")
    code, out, err = run_cli([*flags, "--config", config, "--save", root, "--load", root,
                              "--train-iters", "3"], capfd)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "training from iteration 2 to 3" in out
    assert "deleted checkpoints of iterations [1, 2] (--keep-latest-k 1)" in out
    assert cf.read_latest_iteration(root) == 3 and cf.complete_iterations(root) == [3, 4]
    assert leftovers(root) == []

    code, _, err = run_cli([*flags, "--save", root, "--keep-latest-k", "-1"], capfd)
    assert code == 2 and "error: --keep-latest-k=-1 must be >= 0 (0 keeps all)" in err


@pytest.fixture
def te_like_extra_state(monkeypatch):
    """Give the local backend's core attention a Transformer Engine-style `_extra_state`."""
    from fusedkv_megatron.core_attention import SDPAAttention

    received = []

    def get_extra_state(self):
        return {"fp8_meta": f"layer {self.layer_number}"}

    def set_extra_state(self, state):
        received.append(state)

    def install():
        monkeypatch.setattr(SDPAAttention, "get_extra_state", get_extra_state, raising=False)
        monkeypatch.setattr(SDPAAttention, "set_extra_state", set_extra_state, raising=False)

    return install, received


def saved_keys(ckpt: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return {
        k.split("/")[0] for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    }


def test_extra_state_entries_load_across_backends(flags, tmp_path, capfd, monkeypatch,
                                                  te_like_extra_state, dist_single):  # fmt: skip
    install, received = te_like_extra_state
    base = [*flags, "--save-interval", "1"]
    extra = "decoder.layers.0.self_attention.core_attention._extra_state"

    # local -> "TE": the checkpoint lacks the entries this model has
    local = tmp_path / "local"
    code, _, err = run_cli([*base, "--save", local, "--train-iters", "1"], capfd)
    assert code == 0, err[-3000:]
    assert extra not in saved_keys(cf.iteration_dir(local, 1))
    install()
    code, out, err = run_cli([*base, "--load", local, "--save", local, "--train-iters", "2"], capfd)
    assert code == 0, err[-3000:]
    assert "training from iteration 1 to 2" in out and received == []

    # "TE" -> "TE" restores the entries; "TE" -> local ignores them
    assert extra in saved_keys(cf.iteration_dir(local, 2))
    code, out, err = run_cli([*base, "--load", local, "--train-iters", "2", "--skip-train"], capfd)
    assert code == 0, err[-3000:]
    assert {"fp8_meta": "layer 1"} in received
    monkeypatch.undo()
    code, out, err = run_cli([*base, "--load", local, "--save", local, "--train-iters", "3"], capfd)
    assert code == 0, err[-3000:]
    assert "training from iteration 2 to 3" in out


def _truncate_shards(ckpt: Path) -> None:
    for shard in ckpt.glob("*.distcp"):
        os.truncate(shard, shard.stat().st_size // 2)


def _remove_shards(ckpt: Path) -> None:
    for shard in ckpt.glob("*.distcp"):
        shard.unlink()


def _corrupt_metadata(ckpt: Path) -> None:
    (ckpt / ".metadata").write_bytes(b"not a pickle")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (_truncate_shards, "a file ends early (truncated)"),
        (_remove_shards, "No such file or directory"),
        (_corrupt_metadata, "metadata"),
    ],
    ids=["truncated-shards", "missing-shards", "corrupt-metadata"],
)
def test_a_damaged_checkpoint_is_a_clear_error(damage, expected, saved, flags, tmp_path, capfd):
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    ckpt = cf.iteration_dir(root, 2)
    damage(ckpt)
    code, _, err = run_cli([*flags, "--load", root, "--train-iters", "3"], capfd)
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot read checkpoint {ckpt}: "), line
    assert expected in line and f"writing its iteration into {root / cf.TRACKER_FILE}" in line


def test_save_to_a_file_is_a_clear_error(flags, tmp_path, capfd, dist_single):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    code, _, err = run_cli([*flags, "--train-iters", "1", "--save", afile], capfd)
    assert code == 2, err[-3000:]
    assert f"error: --save {afile} is a file, not a directory; pass a directory" in err
    code, _, err = run_cli([*flags, "--train-iters", "1", "--save", afile / "sub"], capfd)
    assert code == 2, err[-3000:]
    assert f"error: --save {afile / 'sub'} is inside {afile}, which is a file" in err
    assert afile.read_text() == "not a directory"


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot write into (immutable for root, read-only otherwise)."""
    path = tmp_path / "readonly"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if not shutil.which("chattr") or subprocess.run(["chattr", "+i", path]).returncode:
        pytest.skip("running as root without chattr +i: no way to make a directory unwritable")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", path], check=True)


def test_save_without_permission_is_a_clear_error(
    flags, unwritable_dir, capfd, monkeypatch, dist_single
):
    for save in (unwritable_dir, unwritable_dir / "ckpt"):
        code, out, err = run_cli([*flags, "--train-iters", "1", "--save", save], capfd)
        assert code == 2, err[-3000:]
        assert f"error: --save {save}: cannot write checkpoints there: permission denied" in err
        assert "choose a directory this job can create and write" in err
        assert "training from" not in out  # refused at start-up, before any training
    # Permissions that change during the run: the save itself reports it.
    from fusedkv_megatron.training import checkpointing

    monkeypatch.setattr(checkpointing, "check_save_dir", lambda save: None)
    code, out, err = run_cli([*flags, "--train-iters", "1", "--save", unwritable_dir], capfd)
    assert code == 2, err[-3000:]
    assert "training from iteration 0 to 1" in out
    assert (
        f"error: --save {unwritable_dir}: cannot prepare iter_0000001.tmp: permission denied "
        f"({unwritable_dir / 'iter_0000001.tmp'}); free space or fix the permissions" in err
    )
