"""Shared fixtures: a one-process gloo group with Megatron's parallel state, and a torchrun
launcher for multi-process tests.

Every test ends with only the world group left (`release_process_groups`), and the run fails if
the pytest process ends with more than FUSEDKV_TEST_MAX_THREADS threads (default 48): each gloo
group keeps three threads, so groups that outlive their test add up to thousands.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def megatron_patches():
    """Megatron's CPU patches and upstream fixes, applied once before any test runs (importing
    fusedkv_megatron applies nothing). Torchrun workers and subprocesses apply them themselves."""
    from fusedkv_megatron import compat

    compat.apply()


@pytest.fixture(scope="session")
def dist_single():
    """torch.distributed initialised once per pytest process (gloo, world size 1)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
    yield


@pytest.fixture
def megatron_tp1(dist_single):
    """Megatron's parallel state at TP=PP=1 with the model-parallel RNG seeded."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
    release_process_groups()


def release_process_groups() -> None:
    """Destroy Megatron's parallel state and every process group except the world group.

    Megatron's `destroy_model_parallel()` only drops its handles (0.19 even keeps two of them),
    and a gloo group stops its threads only when torch.distributed destroys it and nothing
    references it any more: the lru_cache on `RotaryEmbedding.forward` keeps its last 32
    instances, with their context-parallel group, alive even after the world is destroyed.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None:  # a test that never imported torch.distributed made no group
        return
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core.models.common.embeddings.") and module is not None:
            for cls in vars(module).values():
                forward = getattr(cls, "forward", None) if isinstance(cls, type) else None
                if hasattr(forward, "cache_clear"):
                    forward.cache_clear()
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None:
        ps.destroy_model_parallel()
        for name, value in list(vars(ps).items()):
            if isinstance(value, dist.ProcessGroup):
                setattr(ps, name, None)
    if not dist.is_available() or not dist.is_initialized():
        return
    from torch.distributed.distributed_c10d import GroupMember, _world

    for group in list(_world.pg_map):
        if group is not GroupMember.WORLD:
            dist.destroy_process_group(group)


@pytest.fixture(autouse=True)
def _only_the_world_group_outlives_a_test():
    """Groups a test created (fixtures, in-process `pretrain.main`, converters) end with it."""
    yield
    release_process_groups()


def thread_count() -> int:
    """Threads of this process (Linux: one entry per thread in /proc/self/task)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: no check
        return 0


_DDP_HOOK = "DistributedDataParallel._make_backward_post_hook.<locals>.hook"


def free_dead_ddp_models() -> None:
    """Let the garbage collector have Megatron DDP models whose process groups are destroyed.

    With the distributed optimizer, DDP's gradient accumulators (C++ autograd nodes, which the
    garbage collector cannot see into) and the hooks it put on them keep the DDP object, its
    model, its optimizer and its process groups (three threads each) alive after the model is
    gone. The hooks of a DDP whose data-parallel group is destroyed can never run again:
    dropping them and the accumulators breaks the cycle.
    """
    import torch.distributed as dist

    live = {id(g) for g in dist.distributed_c10d._world.pg_map}
    dead_hooks = set()
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType) and obj.__qualname__ == _DDP_HOOK:
            for cell in obj.__closure__ or ():
                owner = getattr(cell, "cell_contents", None)
                group = getattr(owner, "dp_group", None)
                if group is not None and id(group) not in live:
                    dead_hooks.add(id(obj))
                    owner.grad_accs.clear()  # the accumulators hold the parameters
    if dead_hooks:
        for obj in gc.get_objects():
            if type(obj) is collections.OrderedDict and any(
                id(v) in dead_hooks for v in obj.values()
            ):
                obj.clear()
    obj = None  # the loop's last object
    gc.collect()


# SLURM tests whose jobs are submitted when the session starts; they run last.
SLURM_CLOCK_TESTS = ("tests/slurm/test_slurm_cluster.py", "tests/slurm/test_slurm_two_nodes.py")


def pytest_collection_modifyitems(config, items):
    """The SLURM time-limit tests go last: their job (submitted by `_submit_slurm_job_early`
    when the session starts) spends minutes waiting for SLURM's signal, which the rest of the
    suite overlaps."""
    late = [item for item in items if item.nodeid.startswith(SLURM_CLOCK_TESTS)]
    if late:
        items[:] = [item for item in items if item not in late] + late


@pytest.fixture(scope="session", autouse=True)
def _submit_slurm_job_early(request, tmp_path_factory):
    """The one-node time-limit job (and, with two nodes up, the two-node jobs that compare
    with it) go to SLURM now; otherwise the tests skip or fail with the reason."""
    selected = {f for item in request.session.items for f in SLURM_CLOCK_TESTS
                if item.nodeid.startswith(f)}  # fmt: skip
    if not selected:
        return
    from tests.slurm import test_slurm_cluster as clock

    if clock._slurm_problem() is None:
        clock.EARLY_JOB = clock.submit_time_limited_job(tmp_path_factory.getbasetemp())
    if SLURM_CLOCK_TESTS[1] in selected and clock._slurm_problem(nodes=2) is None:
        from tests.slurm import test_slurm_two_nodes as two

        two.EARLY_JOBS = two.submit_two_node_jobs(tmp_path_factory.getbasetemp())


def pytest_runtest_logfinish(nodeid, location):
    """After a test (pytest drops its fixture values only after teardown), free what still
    holds destroyed process groups when threads pile up."""
    if thread_count() > 24:
        gc.collect()
    if thread_count() > 24 and "torch.distributed" in sys.modules:
        free_dead_ddp_models()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when the pytest process ends holding more than a few dozen threads."""
    limit = int(os.environ.get("FUSEDKV_TEST_MAX_THREADS", "48"))
    gc.collect()  # garbage is not a leak
    count = thread_count()
    line = f"pytest process threads at the end of the run: {count} (limit {limit})"
    if count > limit:
        line += (
            ": tests leak threads (a gloo process group keeps 3); destroy the groups a test "
            "creates, see release_process_groups in tests/conftest.py"
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    session.config._fusedkv_thread_line = (line, count > limit)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line, failed = getattr(config, "_fusedkv_thread_line", (None, False))
    if line:
        terminalreporter.write_line(line, red=failed, bold=failed)


def run_torchrun(script: Path, nproc: int, *args: str, timeout: int = 600) -> str:
    """Run `script` under torchrun with `nproc` gloo processes; return its stdout."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} failed (rc={proc.returncode})\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


def read_json(path: Path):
    return json.loads(Path(path).read_text())
