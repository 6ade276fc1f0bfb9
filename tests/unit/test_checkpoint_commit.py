"""The commit protocol of checkpoint_format on its own (no torch): a crash at any rename or
deletion of a commit, with or without the atomic directory exchange, leaves the tracker naming
a complete checkpoint; leftovers are cleaned or restored; retention keeps the latest."""

from __future__ import annotations

import os
import shutil

import pytest

from fusedkv_megatron import checkpoint_format as cf


class Crash(Exception):
    """Stands for a SIGKILL at one file-system step."""


def fake_checkpoint(path, content: str) -> None:
    path.mkdir(parents=True)
    (path / cf.RUN_FILE).write_text(content)
    (path / "__0_0.distcp").write_text(content)


def content_of_latest(root) -> str:
    return (cf.latest_checkpoint_dir(root) / cf.RUN_FILE).read_text()


def crash_at_step(monkeypatch, n: int) -> None:
    """Raise Crash at the n-th rename or tree deletion from now on."""
    calls = [0]
    for module, name in ((os, "replace"), (shutil, "rmtree")):
        real = getattr(module, name)

        def step(*args, _real=real, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise Crash
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, step)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("older", [True, False], ids=["with-older", "only-one"])
def test_a_crash_at_any_step_of_a_resave_leaves_a_complete_latest(
    tmp_path, monkeypatch, exchange, older
):
    if not exchange:
        monkeypatch.setattr(cf, "exchange_dirs", lambda a, b: False)
    else:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        if not cf.exchange_dirs(tmp_path / "a", tmp_path / "b"):
            pytest.skip("no RENAME_EXCHANGE on this platform/file system")
    survived = set()
    for n in range(1, 20):
        root = tmp_path / f"trial{n}"
        if older:
            fake_checkpoint(cf.iteration_dir(root, 2), "iteration 2")
        fake_checkpoint(cf.iteration_dir(root, 4), "iteration 4, first save")
        cf.write_latest_iteration(root, 4)
        fake_checkpoint(cf.staging_dir(root, 4), "iteration 4, saved again")
        with monkeypatch.context() as m:
            crash_at_step(m, n)
            try:
                cf.commit_iteration(root, 4)
            except Crash:
                survived.add(content_of_latest(root))
                cf.remove_leftovers(root)  # what the next save does first
                assert not [p for p in os.listdir(root) if p.endswith((".tmp", ".old"))]
                assert content_of_latest(root) in survived
                continue
        assert content_of_latest(root) == "iteration 4, saved again"
        assert sorted(os.listdir(root)) == [
            *(["iter_0000002"] if older else []),
            "iter_0000004",
            cf.TRACKER_FILE,
        ]
        break
    else:
        pytest.fail("the commit never completed")
    assert n > 2  # there were steps to crash at
    assert survived <= {"iteration 2", "iteration 4, first save", "iteration 4, saved again"}


def test_a_new_iteration_is_one_rename_then_the_tracker(tmp_path, monkeypatch):
    fake_checkpoint(cf.iteration_dir(tmp_path, 1), "iteration 1")
    cf.write_latest_iteration(tmp_path, 1)
    fake_checkpoint(cf.staging_dir(tmp_path, 2), "iteration 2")
    seen = []
    cf.commit_iteration(
        tmp_path, 2, crash_point=lambda p: seen.append((p, content_of_latest(tmp_path)))
    )
    assert seen == [("after-commit", "iteration 1"), ("after-tracker", "iteration 2")]
    assert cf.complete_iterations(tmp_path) == [1, 2]


def test_remove_leftovers(tmp_path):
    fake_checkpoint(cf.iteration_dir(tmp_path, 3), "3")
    fake_checkpoint(cf.iteration_dir(tmp_path, 3).with_name("iter_0000003.old"), "3 before")
    fake_checkpoint(cf.iteration_dir(tmp_path, 5).with_name("iter_0000005.old"), "5")
    fake_checkpoint(cf.staging_dir(tmp_path, 6), "6, half written")
    fake_checkpoint(cf.iteration_dir(tmp_path, 1).with_name("iter_0000001.deleting"), "1")
    (tmp_path / f".{cf.TRACKER_FILE}.abc.tmp").write_text("7\n")
    (tmp_path / "notes.txt").write_text("the user's own file")
    cf.remove_leftovers(tmp_path)
    # iter_5.old lost its iter_5 in a crash between two renames: it is moved back
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000005", "notes.txt"]
    assert (cf.iteration_dir(tmp_path, 5) / cf.RUN_FILE).read_text() == "5"


def test_prune_keeps_the_latest_and_leaves_newer_directories(tmp_path):
    for i in (1, 2, 3, 4, 6):
        fake_checkpoint(cf.iteration_dir(tmp_path, i), str(i))
    cf.write_latest_iteration(tmp_path, 4)
    assert cf.prune_iterations(tmp_path, 0) == []
    assert cf.prune_iterations(tmp_path, 2) == [1, 2]
    assert cf.complete_iterations(tmp_path) == [3, 4, 6]
    assert cf.prune_iterations(tmp_path, 1) == [3]
    assert cf.complete_iterations(tmp_path) == [4, 6]
    cf.write_latest_iteration(tmp_path, 5)  # names a missing directory: delete nothing
    assert cf.prune_iterations(tmp_path, 1) == []
