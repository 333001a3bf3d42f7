#!/bin/bash
# A one-node Slurm cluster on this machine, for trying launch/sft.sbatch and for the tests.
#
#   sudo apt-get install -y --no-install-recommends slurm-wlm munge    # Debian / Ubuntu
#   sudo launch/local_slurm.sh up [DIR]      # start munged, slurmctld, slurmd; prints the export
#   export SLURM_CONF=DIR/slurm.conf         # then sbatch, squeue, scontrol, scancel as usual
#   sudo launch/local_slurm.sh down [DIR]    # cancel its jobs, stop the three daemons
#
# Everything lives in DIR (default /tmp/jax_sft_slurm; LOCAL_SLURM_DIR also sets it): the munge
# key and socket, slurm.conf, state, spool, logs and pid files. Nothing under /etc is read or
# changed, and ports are picked free, so a system Slurm or munge is left alone. `down` stops only
# the daemons this script started, by the pids they recorded in DIR.
#
# Needs root (slurmd starts every job as the user who submitted it). The node has this machine's
# CPUs (`slurmd -C`) and no GPUs: submit with --gpus-per-node=0. The config shortens what would
# make a development loop slow: a requeued job is eligible again after AuthInfo's cred_expire
# (here 10 s, Slurm's default 120 s), and the scheduler runs every 2 s. Slurm checks time limits
# (and sends --signal warnings) every 30 s, a constant of slurmctld: a warning may arrive up to
# 30 s late. See launch/README.md ("A Slurm cluster on one machine").

set -euo pipefail

usage() { echo "usage: $0 up|down|status [DIR]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
action=$1
DIR="${2:-${LOCAL_SLURM_DIR:-/tmp/jax_sft_slurm}}"
WAIT_S="${LOCAL_SLURM_WAIT_S:-60}"  # bound on each wait for a daemon or the node
CRED_EXPIRE_S="${LOCAL_SLURM_CRED_EXPIRE_S:-10}"  # >= 5 (Slurm's minimum)
NODE="$(hostname -s)"

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local port
    for port in $(shuf -i 20000-40000 -n 50); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
    done
    die "no free TCP port found in 20000-40000"
}

# pid recorded in DIR/run/NAME.pid if that process is alive and is our daemon (its command line
# names DIR: a recycled pid of another process is not ours); nothing otherwise.
our_pid() {
    local file="$DIR/run/$1.pid" pid
    [[ -s "$file" ]] || return 0
    pid=$(<"$file")
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 0
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/" && echo "$pid"
    return 0
}

wait_until() {  # wait_until SECONDS COMMAND...: polls COMMAND every 0.2 s; fails after SECONDS
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

write_config() {
    local ctld_port slurmd_port hw
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    [[ "$ctld_port" != "$slurmd_port" ]] || slurmd_port=$(free_port)
    # This machine's topology as slurmd sees it: CPUs, sockets, cores, threads, memory.
    hw=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')
    [[ "$hw" == CPUs=* ]] || die "slurmd -C did not describe this machine (got '$hw')"
    : >"$DIR/plugstack.conf"  # no SPANK plugins (the system's plugstack.conf is not read)
    cat >"$DIR/slurm.conf" <<EOF
# Written by launch/local_slurm.sh: a one-node cluster for development and tests.
ClusterName=jaxsft
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=$CRED_EXPIRE_S
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
JobRequeue=1
KillWait=30
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

node_idle() {
    local state
    state=$(SLURM_CONF="$DIR/slurm.conf" sinfo -h -n "$NODE" -o %T 2>/dev/null) || return 1
    [[ "$state" == idle ]]
}

up() {
    [[ $EUID -eq 0 ]] || die "run as root (sudo): slurmd starts jobs as the submitting user"
    local cmd
    for cmd in munged slurmctld slurmd sbatch; do
        command -v "$cmd" >/dev/null || die "$cmd not found: apt-get install -y --no-install-recommends slurm-wlm munge"
    done
    getent hosts "$NODE" >/dev/null || die "this machine's name $NODE does not resolve (add it to /etc/hosts): jobs and JAX's coordinator use it"
    if [[ -n "$(our_pid munged)$(our_pid slurmctld)$(our_pid slurmd)" ]]; then
        die "a cluster from $DIR is running; '$0 down $DIR' first"
    fi
    # A start that fails midway stops what it started.
    trap 'if (( $? )); then echo "local_slurm.sh: stopping what was started" >&2; down >&2; fi' EXIT
    # Readable by all (users' sbatch reads slurm.conf and talks to the munge socket); writable
    # by root only, as munged requires of the folders of its socket and key.
    mkdir -p "$DIR"/{munge,state,spool,run,log}
    chmod 755 "$DIR" "$DIR"/{munge,state,spool,run,log}
    rm -f "$DIR"/run/*.pid

    # MUNGE: a fresh key, and a daemon of our own on our own socket.
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
    chmod 600 "$DIR/munge/munge.key"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_until "$WAIT_S" test -S "$DIR/munge/munge.socket" || die "munged did not start; see $DIR/log/munged.log"

    write_config
    export SLURM_CONF="$DIR/slurm.conf"
    # -c: no state from an earlier cluster in DIR; -i: ignore what cannot be read.
    slurmctld -c -i -f "$SLURM_CONF"
    wait_until "$WAIT_S" bash -c 'scontrol ping 2>/dev/null | grep -q UP' \
        || die "slurmctld did not answer within $WAIT_S s; see $DIR/log/slurmctld.log"
    slurmd -f "$SLURM_CONF"
    if ! wait_until "$WAIT_S" node_idle; then
        sinfo -N -l >&2 || true
        die "node $NODE did not become idle within $WAIT_S s; see $DIR/log/slurmd.log and slurmctld.log"
    fi
    echo "Slurm is up: node $NODE ($(sinfo -h -o '%c CPUs')), partition local. Use it with:"
    echo "export SLURM_CONF=$SLURM_CONF"
}

no_jobs() { [[ -z "$(SLURM_CONF="$DIR/slurm.conf" squeue -h -o %i 2>/dev/null)" ]]; }

# slurmstepd processes of this cluster (slurmd passes them its SLURM_CONF).
stepd_pids() {
    local pid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == slurmstepd ]] || continue
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$DIR/slurm.conf"; then
            echo "$pid"
        fi
    done
}

stop_pid() {  # stop_pid NAME PID: SIGTERM, then SIGKILL after WAIT_S seconds
    local name=$1 pid=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_until "$WAIT_S" bash -c "! kill -0 $pid 2>/dev/null"; then
        echo "local_slurm.sh: $name (pid $pid) ignored SIGTERM for $WAIT_S s; SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
}

down() {
    [[ -d "$DIR" ]] || { echo "no cluster in $DIR"; return 0; }
    local pid name
    # Jobs first: slurmstepd and the jobs' processes outlive slurmd otherwise.
    if [[ -n "$(our_pid slurmctld)" ]]; then
        local jobs
        jobs=$(SLURM_CONF="$DIR/slurm.conf" squeue -h -o %i 2>/dev/null || true)
        [[ -z "$jobs" ]] || SLURM_CONF="$DIR/slurm.conf" scancel $jobs || true
        wait_until "$WAIT_S" no_jobs || echo "local_slurm.sh: jobs still listed after $WAIT_S s" >&2
    fi
    for name in slurmd slurmctld munged; do
        pid=$(our_pid "$name")
        [[ -n "$pid" ]] && stop_pid "$name" "$pid"
        rm -f "$DIR/run/$name.pid"
    done
    for pid in $(stepd_pids); do
        stop_pid slurmstepd "$pid"
    done
    echo "Slurm in $DIR is down"
}

status() {
    local name pid
    for name in munged slurmctld slurmd; do
        pid=$(our_pid "$name")
        if [[ -n "$pid" ]]; then echo "$name: running, pid $pid"; else echo "$name: not running"; fi
    done
}

case "$action" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) usage ;;
esac
