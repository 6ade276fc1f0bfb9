#!/usr/bin/env python3
"""One node's launcher in a SLURM job (the srun task, see slurm/job.sbatch.in): check what a
multi-node launch needs, then run torchrun in this process.

    python slurm/node_launch.py TORCHRUN_ARGS...

A multi-node launch that cannot work usually fails late and unclearly: a rendezvous host that
does not resolve, a rendezvous port that another job holds (the workers wait until the
rendezvous times out), or a hostname that resolves to a loopback address, which gloo then
advertises to the other nodes ("Gloo connectFullMesh failed ... 127.0.0.1"). Each is found
here in a second, before torch is imported, and reported in one line that names the node, the
value and the fix; the node's task then exits 2, and srun's --kill-on-bad-exit ends the
others. A node that does not join the rendezvous in time ends torchrun with one line too,
instead of its traceback.

Reads the job's environment: RDZV_HEAD, RDZV_HOST, RDZV_PORT, RDZV_TIMEOUT_S,
SLURM_JOB_NUM_NODES, SLURMD_NODENAME, SLURM_NODEID, PET_LOCAL_ADDR, GLOO_SOCKET_IFNAME.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys


class NodeCheckError(RuntimeError):
    """One problem of this node; the message names the value and the fix."""


def interfaces() -> list[str]:
    """The network interfaces of this node's network namespace, loopback excluded (not
    /sys/class/net: a process that entered a namespace may still see the host's /sys)."""
    try:
        return sorted(name for _, name in socket.if_nameindex() if name != "lo")
    except OSError:
        return []


def addresses(host: str) -> list[str]:
    """The addresses `host` resolves to here; NodeCheckError if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NodeCheckError(f"does not resolve ({e.strerror})") from None
    return sorted({info[4][0] for info in infos})


def check_rendezvous_host(host: str, head: str) -> None:
    try:
        addresses(host)
    except NodeCheckError as e:
        origin = (
            "the first node of the allocation"
            if host == head
            else f"--rdzv-host, for the first node {head!r}"
        )
        raise NodeCheckError(
            f"the rendezvous host {host!r} ({origin}) {e} on this node: every node must resolve "
            "it (DNS or /etc/hosts); fix the name service, or pass slurm/submit.py --rdzv-host "
            "with a name the nodes resolve, e.g. '{node}.your.domain'"
        ) from None


def check_local_addr(addr: str | None) -> None:
    """The name torchrun gives the other nodes for this one (its workers' store, if it gets
    rank 0) resolves here too; a node name unknown to the name service is caught early."""
    if not addr:
        return
    try:
        addresses(addr)
    except NodeCheckError as e:
        raise NodeCheckError(
            f"this node's name for the others, {addr!r}, {e} here: every node must resolve "
            "every node's name (DNS or /etc/hosts); or pass slurm/submit.py --rdzv-host with "
            "a form of {node} that resolves"
        ) from None


def check_socket_interface(nnodes: int, ifname: str | None) -> None:
    """Gloo (and NCCL's bootstrap) must advertise an address the other nodes can reach."""
    if nnodes < 2:
        return
    present = interfaces()
    if ifname:
        # GLOO_SOCKET_IFNAME may list several interfaces (one device each), comma-separated.
        missing = [n for n in ifname.split(",") if n and n not in present]
        if missing and present:
            raise NodeCheckError(
                f"--socket-ifname {ifname!r}: no interface {', '.join(missing)} on this node "
                f"(it has {', '.join(present) or 'none but lo'}); pass the interface of the "
                "network between the nodes"
            )
        return
    hostname = socket.gethostname()
    try:
        found = addresses(hostname)
    except NodeCheckError as e:
        found, why = [], str(e)
    else:
        why = f"resolves to {', '.join(found)}"
    if all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found):
        raise NodeCheckError(
            f"the hostname {hostname!r} {why} here: gloo would advertise "
            f"{'that loopback address' if found else 'a loopback address'} to the other nodes, "
            "which cannot connect to it. Pass slurm/submit.py --socket-ifname IFACE (the "
            f"network between the nodes; this node has {', '.join(present) or 'none but lo'}), "
            "or make the hostname resolve to that network's address"
        )


def check_port_free(port: int) -> None:
    """On the rendezvous host: nothing listens on the port (torchrun's store binds it)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        with sock:
            # As the store does: a port left in TIME_WAIT by a previous start is free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((addr, port))
                sock.listen(1)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise NodeCheckError(
                        f"the rendezvous port {port} is taken on this node (the rendezvous "
                        "host): another job's rendezvous or a service listens on it; pass "
                        "slurm/submit.py --rdzv-port with a free port (the default is 20000 + "
                        "job id mod 20000)"
                    ) from None
                if e.errno != errno.EADDRNOTAVAIL:  # no such address family configured
                    raise


def check_node(env) -> None:
    """All checks of this node; NodeCheckError names the first problem."""
    node, head = env.get("SLURMD_NODENAME") or socket.gethostname(), env["RDZV_HEAD"]
    check_rendezvous_host(env["RDZV_HOST"], head)
    check_local_addr(env.get("PET_LOCAL_ADDR"))
    check_socket_interface(int(env.get("SLURM_JOB_NUM_NODES", "1")), env.get("GLOO_SOCKET_IFNAME"))
    if node == head:
        check_port_free(int(env["RDZV_PORT"]))


def run_torchrun(argv: list[str], env, where: str) -> int:
    """torchrun's main in this process; a rendezvous timeout becomes one line."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    try:
        run.main(argv)
    except SignalException as e:  # torchrun stopped its workers first
        print(
            f"{where} torchrun got {e.sigval.name}: SLURM is ending this node's task (another "
            "node failed, scancel, or the time limit)",
            file=sys.stderr,
            flush=True,
        )
        return 128 + int(e.sigval)
    except RendezvousTimeoutError:
        nnodes = env.get("SLURM_JOB_NUM_NODES", "?")
        print(
            f"{where} error: the rendezvous at {env['RDZV_HOST']}:{env['RDZV_PORT']} timed out "
            f"after {env.get('RDZV_TIMEOUT_S', '?')} s: not all {nnodes} nodes joined. A node "
            "started late (raise slurm/submit.py --rdzv-timeout, e.g. for container pulls) or "
            f"cannot reach {env['RDZV_HOST']}:{env['RDZV_PORT']} (firewall, routing)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


def main(argv: list[str]) -> int:
    env = os.environ
    where = f"[node {env.get('SLURM_NODEID', '?')} {env.get('SLURMD_NODENAME', '?')}]"
    try:
        check_node(env)
    except NodeCheckError as e:
        print(f"{where} error: {e}", file=sys.stderr, flush=True)
        return 2
    return run_torchrun(argv, env, where) if argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
