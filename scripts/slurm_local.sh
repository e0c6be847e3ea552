#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the test suite and for trying the
# `launcher=slurm` path by hand. Debian's slurm-wlm + munge, run as root, no cgroups.
#
#   eval "$(scripts/slurm_local.sh start)"   # installs when missing, starts, prints exports
#   python -m sae.train -m +sweep=demo launcher=slurm
#   scripts/slurm_local.sh status            # exit 0 = running, 3 = not running
#   scripts/slurm_local.sh stop              # cancels its jobs, stops what it started, cleans up
#
# Environment (all optional):
#   SLURM_LOCAL_DIR          state directory (slurm.conf, logs, spool, pid files); /tmp/sae-slurm
#   SLURM_LOCAL_PARTITION    name of the one partition; debug
#   SLURM_LOCAL_CTLD_PORT    slurmctld port; 6817 (change both ports to run a second cluster)
#   SLURM_LOCAL_SLURMD_PORT  slurmd port; 6818
#   SLURM_LOCAL_TIMEOUT      seconds to wait for the node to become idle; 60
#   SLURM_LOCAL_KEEP=1       `stop` keeps the state directory (logs) instead of deleting it
#
# Exit codes: 0 ok; 1 failed (the daemon logs are printed); 3 (status) not running;
# 5 SLURM is not installed and cannot be installed here (not root, or no apt-get): the test
# fixture skips on 5 and only on 5.
#
# `start` prints only shell on stdout (comments and exports) so that `eval` works (also
# `eval "$(make -s slurm-up)"`); progress and the start time go to stderr. The exports point
# SLURM_CONF at this cluster, put a sacct stand-in first on PATH (see write_sacct), and make
# conf/launcher/slurm.yaml fit the cluster: its partition, no GPU request (the node has none),
# 1 CPU and 1 GB per task.
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/sae-slurm}"
PARTITION="${SLURM_LOCAL_PARTITION:-debug}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
START_TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
CONF="$STATE_DIR/slurm.conf"
PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/log"
NODE=localhost # the hostname is not "localhost", hence `slurmd -N localhost` below

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The daemons and clients this script needs; slurm-wlm pulls slurmctld, slurmd and the clients.
REQUIRED=(munged munge unmunge slurmctld slurmd sbatch sinfo scontrol squeue scancel srun)

missing_binaries() {
    local b
    for b in "${REQUIRED[@]}"; do
        command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 || echo "$b"
    done
}

ensure_installed() {
    # Daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
    export PATH="$PATH:/usr/sbin:/sbin"
    local missing
    missing="$(missing_binaries | tr '\n' ' ')"
    [[ -z "$missing" ]] && return 0
    if [[ "$(id -u)" != 0 ]]; then
        log "SLURM cannot be installed: missing ${missing}and not running as root (apt-get needs root)."
        exit 5
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "SLURM cannot be installed: missing ${missing}and no apt-get (not a Debian/Ubuntu machine)."
        exit 5
    fi
    log "installing slurm-wlm and munge (missing: ${missing})"
    # A failed install as root is an error, not a skip: CI must run the SLURM tests.
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2 \
        || die "apt-get install slurm-wlm munge failed"
    missing="$(missing_binaries | tr '\n' ' ')"
    [[ -z "$missing" ]] || die "still missing after apt-get install: $missing"
}

# --- process bookkeeping: only processes whose pid we recorded are ever signalled ----------

# alive NAME: the recorded pid of NAME runs a program called NAME (guards against pid reuse).
alive() {
    local name="$1" pid comm
    [[ -f "$PID_DIR/$name" ]] || return 1
    pid="$(cat "$PID_DIR/$name")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "$name"* ]]
}

# stop_recorded NAME...: SIGTERM the recorded pids together, SIGKILL what is left after 10 s,
# forget them. (Together: each daemon takes 1-2 s to shut down.)
stop_recorded() {
    local name pid i
    local -A pids=()
    for name in "$@"; do
        if alive "$name"; then
            pid="$(cat "$PID_DIR/$name")"
            pids[$name]="$pid"
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$PID_DIR/$name"
    done
    for name in "${!pids[@]}"; do
        pid="${pids[$name]}"
        for i in $(seq 100); do
            [[ -d "/proc/$pid" ]] || break
            sleep 0.1
        done
        if [[ -d "/proc/$pid" ]]; then
            log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name ($pid)"
    done
}

# wait_pidfile FILE NAME: a daemon forks into the background and writes its pid file; copy the
# pid into our bookkeeping once it is there.
wait_pidfile() {
    local file="$1" name="$2" i
    for i in $(seq 100); do
        if [[ -s "$file" ]]; then
            cp "$file" "$PID_DIR/$name"
            alive "$name" && return 0
        fi
        sleep 0.1
    done
    return 1
}

show_logs() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -s "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2
    done
    if grep -qs "Address already in use" "$LOG_DIR"/*.log; then
        log "hint: another SLURM cluster uses ports $CTLD_PORT/$SLURMD_PORT; stop it, reuse it" \
            "(same SLURM_LOCAL_DIR), or pick free ports with SLURM_LOCAL_CTLD_PORT and" \
            "SLURM_LOCAL_SLURMD_PORT"
    fi
}

slurm_env() { SLURM_CONF="$CONF" "$@"; }

node_state() { slurm_env sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n 1; }

cluster_healthy() {
    alive slurmctld && alive slurmd \
        && slurm_env scontrol ping 2>/dev/null | grep -q 'is UP' \
        && [[ -n "$(node_state)" ]]
}

print_exports() {
    # Shell for `eval`: the cluster's config, the sacct stand-in (see write_sacct), and the
    # overrides conf/launcher/slurm.yaml reads from the environment (partition; the node has no
    # GPU and few CPUs).
    cat <<EOF
export SLURM_CONF=$CONF
export PATH="$STATE_DIR/bin:\$PATH"
export SAE_SLURM_PARTITION=$PARTITION
export SAE_SLURM_GPUS_PER_NODE=0
export SAE_SLURM_CPUS_PER_TASK=1
export SAE_SLURM_MEM_GB=1
EOF
}

# --- munge ---------------------------------------------------------------------------------

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        # A munged we did not start (the system's, or one left from a previous run): use it,
        # never stop it.
        log "munged already answers; reusing it"
        return 0
    fi
    # munged refuses to run as root, and wants its directories owned by munge and its key
    # readable by munge only.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munged.pid
    # --force: start even if a stale socket from a killed munged is left behind.
    runuser -u munge -- munged --force >>"$LOG_DIR/munged-start.log" 2>&1 \
        || { cat "$LOG_DIR/munged-start.log" >&2; die "munged did not start"; }
    wait_pidfile /run/munge/munged.pid munged || die "munged wrote no pid file"
    munge_works || die "munged runs but munge -n | unmunge fails (see /var/log/munge/munged.log)"
    log "started munged ($(cat "$PID_DIR/munged"))"
}

# --- slurm.conf ----------------------------------------------------------------------------

write_conf() {
    local cpus mem
    # Configured as the machine reports itself: CPUs from nproc (honours a container's CPU
    # limit), RealMemory (MB) from slurmd -C. A node whose config exceeds what it has is drained.
    cpus="$(nproc)"
    mem="$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
    [[ -n "$mem" ]] || die "could not read RealMemory from 'slurmd -C'"
    cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: a single-node test cluster (see shared/PITFALLS.md).
ClusterName=sae-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Slurm holds a requeued job back until the job credentials of its last run expire
# (cred_expire + 1 s; default 120 s). 10 s keeps the requeue tests short and still gives a job
# step ample time to use its credential on a loaded machine (5 s would save 4 s per requeue).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
# No cgroups in containers: track job processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Cores are the consumable resource: 1-CPU array tasks run side by side on the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No accounting database (slurmdbd + MySQL): sacct cannot answer here. Finished jobs stay in
# slurmctld's memory for MinJobAge seconds instead, visible to squeue and scontrol.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
# A node that was down (e.g. slurmd restarted) returns to service when it registers.
ReturnToService=2
# The node is used as configured, whatever slurmd detects (no drain for a few MB less memory).
SlurmdParameters=config_overrides
# Batch jobs may be requeued (scontrol requeue, preemption): the requeue tests rely on it.
JobRequeue=1
# SIGKILL as soon as possible after SIGTERM when a job is cancelled or requeued (default 30 s).
# submitit ignores SIGTERM (it acts on its own USR2 signal), so a grace period only lets a
# cancelled cell train on. Measured: a plain srun task dies ~1 s after SIGTERM (~3.5 s with
# KillWait=2), a submitit task still ~5 s on a loaded machine, so the tests also kill it.
KillWait=0
InactiveLimit=0
# Look at pending jobs every second (defaults: main scheduler 60 s, backfill 30 s), so a
# requeued job restarts as soon as it is eligible again.
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdTimeout=300
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
# Up to two jobs per core (OverSubscribe=FORCE:2): a test sweep's tiny cells spend most of
# their time starting Python, so running 2 x nproc of them at once cut the SLURM tests from
# ~133 s to ~104 s on a loaded 2-core machine. Requeue is allowed (JobRequeue=1 above); a
# generous MaxTime so that launcher time limits (timeout_min) are the ones that apply.
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=7-00:00:00 State=UP OverSubscribe=FORCE:2
EOF
}

# --- sacct ----------------------------------------------------------------------------------

# submitit learns the state of its jobs from `sacct -o JobID,State,NodeList --parsable2 -j ID`.
# Without an accounting database (slurmdbd + MySQL, too heavy for a test) the real sacct only
# answers "accounting storage is disabled", and a job that dies without writing its result
# (scancel, a crashed node) then leaves submitit waiting forever. This stand-in answers the
# same query from slurmctld's own job table (squeue --states=all keeps finished jobs for
# MinJobAge seconds), so submitit sees CANCELLED / FAILED / TIMEOUT as on a real cluster.
# `start` puts it first on PATH through the exports it prints. One gap: slurmctld forgets an
# array task cancelled while still pending, so its state stays unknown (cancel running tasks).
write_sacct() {
    mkdir -p "$STATE_DIR/bin"
    cat >"$STATE_DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in of the local test cluster (written by scripts/slurm_local.sh): answers the
# queries submitit makes (JobID, State, NodeList of given jobs) from squeue.
set -euo pipefail
# The cluster's slurm.conf sits one directory above this script.
export SLURM_CONF="${SLURM_CONF:-$(cd "$(dirname "$0")/.." && pwd)/slurm.conf}"
jobs=""
fields="JobID,State,NodeList"
header=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        -j | --jobs) jobs="${jobs:+$jobs,}$2"; shift 2 ;;
        --jobs=*) jobs="${jobs:+$jobs,}${1#--jobs=}"; shift ;;
        -o | --format) fields="$2"; shift 2 ;;
        --format=*) fields="${1#--format=}"; shift ;;
        -n | --noheader) header=0; shift ;;
        -P | --parsable2 | -X | --allocations) shift ;;
        *) echo "sacct (local test cluster stand-in): unsupported option $1" >&2; exit 1 ;;
    esac
done
IFS=, read -r -a names <<<"$fields"
format=""
for name in "${names[@]}"; do
    case "${name,,}" in
        jobid) code=%i ;;
        state) code=%T ;;
        nodelist) code=%N ;;
        jobname) code=%j ;;
        partition) code=%P ;;
        *) echo "sacct (local test cluster stand-in): unsupported field $name" >&2; exit 1 ;;
    esac
    format="${format:+$format|}$code"
done
if [[ $header == 1 ]]; then (IFS='|'; echo "${names[*]}"); fi
exec squeue --noheader --states=all --format="$format" ${jobs:+--jobs="$jobs"}
EOF
    chmod +x "$STATE_DIR/bin/sacct"
}

# --- subcommands ---------------------------------------------------------------------------

cmd_start() {
    local t0 i state
    t0="$(date +%s.%N)"
    ensure_installed
    mkdir -p "$STATE_DIR" "$PID_DIR" "$LOG_DIR"
    if cluster_healthy; then
        log "already running (state: $STATE_DIR); reusing it"
        echo "# sae local SLURM cluster: already running (reused), state $STATE_DIR"
        print_exports
        return 0
    fi
    # Half-started leftovers of an earlier run: stop them and start clean.
    stop_recorded slurmd slurmctld
    rm -rf "$STATE_DIR/ctld" "$STATE_DIR/spool"
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
    rm -f "$LOG_DIR"/*.log "$STATE_DIR"/*.pid
    write_conf
    write_sacct
    start_munge

    # -c: start from an empty job table, never resurrect jobs of a previous cluster.
    slurm_env slurmctld -c -f "$CONF" >>"$LOG_DIR/slurmctld-start.log" 2>&1 \
        || { show_logs; die "slurmctld did not start"; }
    wait_pidfile "$STATE_DIR/slurmctld.pid" slurmctld || { show_logs; die "slurmctld exited at start"; }
    # The controller must answer before slurmd registers with it (and a controller that dies at
    # once, e.g. on a busy port, is reported as such).
    for i in $(seq $((START_TIMEOUT * 5))); do
        slurm_env scontrol ping 2>/dev/null | grep -q 'is UP' && break
        alive slurmctld || { show_logs; die "slurmctld exited at start (logs above)"; }
        sleep 0.2
    done
    log "started slurmctld ($(cat "$PID_DIR/slurmctld"))"
    slurm_env slurmd -N "$NODE" -f "$CONF" >>"$LOG_DIR/slurmd-start.log" 2>&1 \
        || { show_logs; die "slurmd did not start"; }
    wait_pidfile "$STATE_DIR/slurmd.pid" slurmd || { show_logs; die "slurmd exited at start"; }
    log "started slurmd ($(cat "$PID_DIR/slurmd"))"

    # Ready = the node is idle in sinfo (registered, configuration accepted, not drained).
    state=""
    for i in $(seq $((START_TIMEOUT * 5))); do
        state="$(node_state)"
        [[ "$state" == idle ]] && break
        alive slurmctld || { show_logs; die "slurmctld died while starting"; }
        alive slurmd || { show_logs; die "slurmd died while starting"; }
        sleep 0.2
    done
    if [[ "$state" != idle ]]; then
        slurm_env scontrol show node "$NODE" >&2 || true
        show_logs
        die "node $NODE is '${state:-unknown}', not idle, after ${START_TIMEOUT}s (logs above)"
    fi
    local elapsed
    elapsed="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    log "cluster up in ${elapsed}s: partition $PARTITION, $(nproc) CPUs, state $STATE_DIR"
    echo "# sae local SLURM cluster: started in ${elapsed}s, state $STATE_DIR"
    print_exports
}

cmd_stop() {
    local i
    export PATH="$PATH:/usr/sbin:/sbin"
    if alive slurmctld; then
        # Jobs of this cluster run under slurmstepd processes that outlive slurmd: cancel them
        # first and give them KillWait (+ margin) to end.
        if slurm_env scancel --quiet --partition="$PARTITION" 2>/dev/null; then
            for i in $(seq 50); do
                [[ -z "$(slurm_env squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null)" ]] && break
                sleep 0.2
            done
        fi
    fi
    # munged only if this script started it (then its pid is recorded).
    stop_recorded slurmd slurmctld munged
    if [[ "${SLURM_LOCAL_KEEP:-0}" == 1 ]]; then
        log "stopped; kept $STATE_DIR"
    else
        rm -rf "$STATE_DIR"
        log "stopped; removed $STATE_DIR"
    fi
}

cmd_status() {
    export PATH="$PATH:/usr/sbin:/sbin"
    if [[ -f "$CONF" ]] && cluster_healthy; then
        slurm_env sinfo >&2
        echo "# sae local SLURM cluster: running, state $STATE_DIR"
        print_exports
        return 0
    fi
    log "not running (state: $STATE_DIR)"
    return 3
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|status   (state directory: \$SLURM_LOCAL_DIR, default /tmp/sae-slurm)" >&2
        exit 2
        ;;
esac
