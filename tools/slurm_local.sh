#!/usr/bin/env bash
# A SLURM test cluster on this machine, for the tests marked `slurm` (tests/slurm/).
#
#   bash tools/slurm_local.sh start              # one node: this machine (install with apt if needed)
#   bash tools/slurm_local.sh start --nodes 2    # two nodes, each in its own network namespace
#   bash tools/slurm_local.sh status             # controller, nodes and queue
#   bash tools/slurm_local.sh stop               # cancel all jobs, stop the daemons, remove what
#                                                # start made (namespaces, bridge, /etc/hosts lines)
# `start` is idempotent; a start with another node count reconfigures the cluster.
#
# Needs root and apt (Debian/Ubuntu; Debian bookworm ships Slurm 22.05). No systemd: the daemons
# are started by hand. Authentication is munge with the key the package generates, so only local
# users can talk to the controller. The configuration goes to /etc/slurm/slurm.conf; the script
# refuses to touch one it did not write (a real cluster's).
#
# With --nodes N >= 2 every node is a slurmd (`slurmd -N fkv-nI`) in its own network namespace
# fkv-nI, with a veth pair into the bridge fkvbr0 on 10.200.0.0/24: the controller listens on the
# bridge's 10.200.0.1, node I has 10.200.0.(10+I) on its eth0, and /etc/hosts gets one line per
# node (marked, removed by stop). Traffic between the nodes (rendezvous, gloo) crosses the veths;
# nothing is routed beyond the bridge. The namespaces share the machine's hostname, which resolves
# to 127.0.0.1: multi-node jobs pass --socket-ifname eth0 to slurm/submit.py (docs/slurm.md).
set -euo pipefail

HOST="$(hostname -s)"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# written by fusedkv_megatron tools/slurm_local.sh"
HOSTS_MARK="# fusedkv tools/slurm_local.sh"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
# The multi-node network: a bridge on the host (the controller's address) and per node a
# namespace with a veth into it. Names and subnet are this script's own; stop removes them.
BRIDGE=fkvbr0
NET=10.200.0
CTLD_ADDR="$NET.1"
NODE_PREFIX=fkv-n

log() { echo "[slurm_local] $*"; }
die() { echo "[slurm_local] error: $*" >&2; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

require_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts daemons); try: sudo bash $0 $1"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install slurmctld, slurmd, slurm-client and munge with your package manager"
    log "installing slurmctld slurmd slurm-client munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# The node names of a cluster of $1 nodes: this machine, or fkv-n1 ... fkv-nN.
node_names() {
    if [ "$1" = 1 ]; then echo "$HOST"; else seq -f "$NODE_PREFIX%g" 1 "$1"; fi
}

# The nodes of the configuration this script wrote last (none if it wrote none).
configured_nodes() {
    [ -f "$CONF" ] && grep -qF "$MARKER" "$CONF" || return 0
    sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF"
}

slurmd_pidfile() {  # node
    if [ "$1" = "$HOST" ]; then echo "$SLURMD_PID"; else echo "/run/slurmd-$1.pid"; fi
}

write_config() {  # nodes
    local nodes=$1
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script (a real cluster's?); not touching it. Use that cluster, or move the file away to run the local test cluster."
    fi
    local cpus mem_mb ctld node_lines spool i
    cpus="$(getconf _NPROCESSORS_ONLN)"  # not nproc: it follows OMP_NUM_THREADS
    # Leave a tenth of the memory out: a node that reports less than RealMemory is marked invalid.
    mem_mb="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
    if [ "$nodes" = 1 ]; then
        ctld="$HOST"
        node_lines="NodeName=$HOST CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        spool="SlurmdSpoolDir=$SPOOL
SlurmdPidFile=$SLURMD_PID
SlurmdLogFile=$LOGS/slurmd.log"
    else
        ctld="$HOST($CTLD_ADDR)"
        # The nodes share this machine's cores and memory. Each advertises at least 8 CPUs so
        # that the tests' jobs run side by side; config_overrides makes slurmd accept that.
        (( cpus < 8 )) && cpus=8
        node_lines=""
        for i in $(seq 1 "$nodes"); do
            node_lines+="NodeName=$NODE_PREFIX$i NodeAddr=$NET.$((10 + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
        done
        node_lines+="SlurmdParameters=config_overrides"
        spool="SlurmdSpoolDir=$SPOOL/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=$LOGS/slurmd-%n.log"
    fi
    cat >"$CONF.tmp" <<EOF
$MARKER
# A $nodes-node test cluster; regenerated by 'bash tools/slurm_local.sh start --nodes $nodes'.
ClusterName=fusedkv-local
SlurmctldHost=$ctld
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120); keep test restarts quick.
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE
$spool
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
# No cgroups here (containers, no systemd): track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Keep finished jobs visible to 'scontrol show job' for an hour (no accounting database): the
# test suite submits its time-limit job when it starts and reads the job's record at its end.
MinJobAge=3600
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$CONF.tmp" "$CONF" 2>/dev/null; then
        mv "$CONF.tmp" "$CONF"
        return 0  # changed
    fi
    rm -f "$CONF.tmp"
    return 1
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    [ -s /etc/munge/munge.key ] || { log "creating /etc/munge/munge.key"; mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

# slurmctld, slurmd and the rendezvous of the jobs all look this machine up by its short name.
ensure_hostname_resolves() {
    if ! getent hosts "$HOST" >/dev/null; then
        log "'$HOST' (hostname -s) does not resolve: adding '127.0.0.1 $HOST' to /etc/hosts (marked)"
        echo "127.0.0.1 $HOST $HOSTS_MARK" >>/etc/hosts
    fi
}

# --- the multi-node network: node fkv-nI lives in the network namespace of the same name ---

make_network() {  # nodes
    local nodes=$1 i node addr
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        if ip -4 route show | grep -q "^$NET\.0/24"; then
            die "$NET.0/24 is already routed on this machine (not by this script): not creating $BRIDGE"
        fi
        log "creating bridge $BRIDGE ($CTLD_ADDR/24)"
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    fi
    for i in $(seq 1 "$nodes"); do
        node="$NODE_PREFIX$i"
        addr="$NET.$((10 + i))"
        if [ ! -e "/run/netns/$node" ]; then
            log "creating network namespace $node ($addr on its eth0)"
            ip netns add "$node"
            ip link add "v-$node" type veth peer name "p-$node"
            ip link set "p-$node" netns "$node"
            ip -n "$node" link set "p-$node" name eth0
            ip -n "$node" addr add "$addr/24" dev eth0
            ip -n "$node" link set lo up
            ip -n "$node" link set eth0 up
            ip link set "v-$node" master "$BRIDGE"
            ip link set "v-$node" up
        fi
        if ! grep -qE "^$addr $node( |$)" /etc/hosts; then
            log "adding '$addr $node' to /etc/hosts (marked)"
            echo "$addr $node $HOSTS_MARK" >>/etc/hosts
        fi
    done
}

# The namespaces, veths, bridge and /etc/hosts lines of this script, whatever the node count.
remove_network() {
    local ns pids kept
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$NODE_PREFIX[0-9]+$" || true); do
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ' || true)"
        if [ -n "${pids// /}" ]; then
            log "ending the processes left in namespace $ns: $pids"
            # shellcheck disable=SC2086
            kill -9 $pids 2>/dev/null || true
        fi
        log "removing network namespace $ns"
        ip link del "v-$ns" 2>/dev/null || true
        ip netns del "$ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        log "removing bridge $BRIDGE"
        ip link del "$BRIDGE"
    fi
    if grep -qF "$HOSTS_MARK" /etc/hosts; then
        log "removing this script's lines from /etc/hosts"
        # Rewritten in place, not renamed over: /etc/hosts may be a bind mount.
        kept="$(grep -vF "$HOSTS_MARK" /etc/hosts || true)"
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

# --- daemons ----------------------------------------------------------------------------------

start_slurmd() {  # node
    local node=$1
    pid_alive "$(slurmd_pidfile "$node")" && return
    log "starting slurmd for node $node"
    if [ "$node" = "$HOST" ]; then
        slurmd
    else
        mkdir -p "$SPOOL/$node"
        # nsenter, not `ip netns exec`: that one remounts /sys, and slurmd then fails to start.
        nsenter --net="/run/netns/$node" slurmd -N "$node"
    fi
}

node_state() { sinfo -h -n "$1" -o %t 2>/dev/null | head -n1; }

wait_idle() {  # node
    local st=""
    for _ in $(seq 60); do
        st="$(node_state "$1")"
        case "$st" in
            idle|mix|alloc|comp) log "node $1 is $st"; return 0 ;;
            down*|drain*|drng*|fail*|inval*) scontrol update nodename="$1" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    die "node $1 did not become idle (state '${st:-unknown}'); see $LOGS/slurmctld.log and $LOGS/slurmd*.log"
}

stop_pid() {  # pidfile name
    if pid_alive "$1"; then
        local pid
        pid="$(cat "$1")"
        log "stopping $2 (pid $pid)"
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
}

stop_slurmds() {
    local pidfile
    for pidfile in "$SLURMD_PID" /run/slurmd-"$NODE_PREFIX"*.pid; do
        [ -e "$pidfile" ] || continue
        stop_pid "$pidfile" "slurmd ($(basename "$pidfile" .pid))"
    done
}

cmd_start() {
    require_root start
    local nodes=1
    while [ $# -gt 0 ]; do
        case "$1" in
            --nodes) [ $# -ge 2 ] || die "--nodes needs a value"; nodes=$2; shift 2 ;;
            --nodes=*) nodes="${1#--nodes=}"; shift ;;
            *) die "unknown option '$1'; usage: bash tools/slurm_local.sh start [--nodes N]" ;;
        esac
    done
    [[ $nodes =~ ^[1-9]$ ]] || die "--nodes '$nodes': use a number from 1 to 9"
    install_packages
    ensure_hostname_resolves
    local before changed=0 node
    before="$(configured_nodes | tr '\n' ' ')"
    write_config "$nodes" && changed=1
    start_munge
    if [ "$changed" = 1 ]; then
        if pid_alive "$CTLD_PID" || [ -n "$(ls /run/slurmd*.pid 2>/dev/null)" ]; then
            log "configuration changed (nodes ${before:-none} -> $(node_names "$nodes" | tr '\n' ' ')): restarting the daemons"
        fi
        stop_slurmds
        stop_pid "$CTLD_PID" slurmctld
    fi
    if [ "$nodes" = 1 ]; then
        remove_network  # what a multi-node start left
    else
        make_network "$nodes"
    fi
    if ! pid_alive "$CTLD_PID"; then
        log "starting slurmctld on $HOST"
        slurmctld -i
    fi
    for node in $(node_names "$nodes"); do start_slurmd "$node"; done
    for node in $(node_names "$nodes"); do wait_idle "$node"; done
    log "$nodes node(s) up; 'sinfo' and 'squeue' work"
}

cmd_stop() {
    require_root stop
    if pid_alive "$CTLD_PID"; then
        scancel --full --quiet --state=RUNNING 2>/dev/null || true
        scancel --quiet --state=PENDING 2>/dev/null || true
        local jobs
        for _ in $(seq 100); do
            jobs="$(squeue -h -o %i 2>/dev/null || true)"
            [ -z "$jobs" ] && break
            sleep 0.2
        done
    fi
    stop_slurmds
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGE_PID" munged
    remove_network
}

cmd_status() {
    if pid_alive "$CTLD_PID"; then
        scontrol ping || true
        sinfo
        squeue
    else
        log "slurmctld is not running (start it: bash tools/slurm_local.sh start [--nodes 2])"
        return 1
    fi
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: bash tools/slurm_local.sh start [--nodes N] | stop | status" >&2; exit 2 ;;
esac
