"""slurm/node_launch.py, the checks each node of a job runs before torchrun: each problem a
multi-node launch meets gives one line naming the value and the fix, and exit code 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "slurm"))
import node_launch  # noqa: E402


def run_check(**env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME",)}
    base.update(
        SLURMD_NODENAME="nodeA",
        SLURM_NODEID="0",
        SLURM_JOB_NUM_NODES="1",
        RDZV_HEAD="nodeA",
        RDZV_HOST="localhost",
        RDZV_PORT="1",  # checked on the head only
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, str(REPO / "slurm" / "node_launch.py")],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_resolvable_host_and_a_free_port_pass():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed
    out = run_check(SLURMD_NODENAME="nodeA", RDZV_PORT=str(port))
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_unresolvable_rendezvous_host():
    out = run_check(SLURMD_NODENAME="nodeB", SLURM_NODEID="1", RDZV_HOST="nodeA.invalid")
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("[node 1 nodeB] error: the rendezvous host 'nodeA.invalid'")
    assert "does not resolve" in err and "--rdzv-host" in err
    assert len(err.splitlines()) == 1


def test_rendezvous_port_taken_on_the_head():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = run_check(RDZV_PORT=str(port))
        other = run_check(SLURMD_NODENAME="nodeB", RDZV_PORT=str(port))  # not the head
    assert out.returncode == 2
    assert f"the rendezvous port {port} is taken on this node" in out.stderr
    assert "--rdzv-port" in out.stderr
    assert other.returncode == 0, other.stderr


def test_loopback_hostname_needs_a_socket_interface(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    with pytest.raises(node_launch.NodeCheckError, match="--socket-ifname IFACE") as e:
        node_launch.check_socket_interface(2, None)
    assert "'localhost' resolves to " in str(e.value) and "loopback" in str(e.value)
    node_launch.check_socket_interface(1, None)  # one node: loopback is fine
    monkeypatch.setattr(node_launch, "interfaces", lambda: ["eth0", "ib0"])
    node_launch.check_socket_interface(2, "ib0")
    with pytest.raises(node_launch.NodeCheckError, match="no interface ib1 on this node") as e:
        node_launch.check_socket_interface(2, "eth0,ib1")
    assert "it has eth0, ib0" in str(e.value)
