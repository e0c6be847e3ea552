#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the test suite and for trying the
# `launcher=slurm` path by hand: Debian's slurm-wlm, slurmdbd, munge and mariadb-server, run as
# root, no cgroups. Everything the cluster runs is its own and lives in the state directory:
#   munged    its own key, socket, pid and log (never the system's munged, never another
#             cluster's): clusters with different SLURM_LOCAL_DIR and ports start and stop
#             independently;
#   mariadbd  a private MariaDB instance (datadir $SLURM_LOCAL_DIR/mysql/data, unix socket only,
#             no TCP port), created fresh at every start, with a database user for slurmdbd;
#   slurmdbd  the accounting daemon on SLURM_LOCAL_DBD_PORT, so the real `sacct` answers;
#   slurmctld, slurmd.
#
#   eval "$(scripts/slurm_local.sh start)"   # installs when missing, starts, prints exports
#   python -m sae.train -m +sweep=demo launcher=slurm
#   scripts/slurm_local.sh status            # exit 0 = running, 3 = not running
#   scripts/slurm_local.sh stop              # cancels its jobs, stops what it started, cleans up
#
# Environment (all optional):
#   SLURM_LOCAL_DIR          state directory (configs, logs, spool, pid files, munge key,
#                            database); /tmp/sae-slurm
#   SLURM_LOCAL_PARTITION    name of the one partition; debug
#   SLURM_LOCAL_CTLD_PORT    slurmctld port; 6817 (change all three ports, and SLURM_LOCAL_DIR,
#   SLURM_LOCAL_SLURMD_PORT  slurmd port; 6818      to run a second cluster beside the first)
#   SLURM_LOCAL_DBD_PORT     slurmdbd port; 6819
#   SLURM_LOCAL_TIMEOUT      seconds to wait for the node to become idle; 60
#   SLURM_LOCAL_KEEP=1       `stop` keeps the state directory (logs) instead of deleting it
#
# Exit codes: 0 ok; 1 failed (the daemon logs are printed); 3 (status) not running;
# 5 SLURM is not installed and cannot be installed here (not root, or no apt-get): the test
# fixture skips on 5 and only on 5.
#
# `start` prints only shell on stdout (comments and exports) so that `eval` works (also
# `eval "$(make -s slurm-up)"`); progress and the start time go to stderr. The exports point
# SLURM_CONF at this cluster (every client, sacct included, finds its munged socket and its
# slurmdbd through it) and make conf/launcher/slurm.yaml fit the cluster: its partition, no GPU
# request (the node has none), 1 CPU and 1 GB per task.
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/sae-slurm}"
PARTITION="${SLURM_LOCAL_PARTITION:-debug}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_LOCAL_SLURMD_PORT:-6818}"
DBD_PORT="${SLURM_LOCAL_DBD_PORT:-6819}"
START_TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
CONF="$STATE_DIR/slurm.conf"
PID_DIR="$STATE_DIR/pids"
LOG_DIR="$STATE_DIR/log"
DBD_CONF="$STATE_DIR/slurmdbd.conf" # slurmdbd reads it from the directory of SLURM_CONF
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
DB_DIR="$STATE_DIR/mysql"
DB_SOCKET="$DB_DIR/mysqld.sock"
DB_NAME=slurm_acct_db
DB_USER=slurm
NODE=localhost # the hostname is not "localhost", hence `slurmd -N localhost` below

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The daemons and clients this script needs; slurm-wlm pulls slurmctld, slurmd and the clients,
# mariadb-server the MariaDB server, its installer and clients (MariaDB >= 10.5 names).
REQUIRED=(munged munge unmunge slurmctld slurmd slurmdbd sbatch sinfo scontrol squeue scancel srun
    sacct sacctmgr mariadbd mariadb-install-db mariadb-admin mariadb)
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

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
    log "installing ${PACKAGES[*]} (missing: ${missing})"
    # A failed install as root is an error, not a skip: CI must run the SLURM tests.
    apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >&2 \
        || die "apt-get install ${PACKAGES[*]} failed"
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

# wait_ready WHAT NAME CMD...: poll CMD until it succeeds; fail (logs printed) when the daemon
# NAME exits or after SLURM_LOCAL_TIMEOUT seconds.
wait_ready() {
    local what="$1" name="$2" deadline=$((SECONDS + START_TIMEOUT))
    shift 2
    until "$@" >/dev/null 2>&1; do
        alive "$name" || { show_logs; die "$name exited at start (logs above)"; }
        ((SECONDS < deadline)) || { show_logs; die "$what not ready after ${START_TIMEOUT}s (logs above)"; }
        sleep 0.1
    done
}

show_logs() {
    local f
    for f in "$LOG_DIR"/*.log; do
        [[ -s "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 40 "$f" >&2
    done
    if grep -qs "Address already in use" "$LOG_DIR"/*.log; then
        log "hint: another SLURM cluster uses ports $CTLD_PORT/$SLURMD_PORT/$DBD_PORT; stop it," \
            "reuse it (same SLURM_LOCAL_DIR), or pick free ports with SLURM_LOCAL_CTLD_PORT," \
            "SLURM_LOCAL_SLURMD_PORT and SLURM_LOCAL_DBD_PORT"
    fi
}

slurm_env() { SLURM_CONF="$CONF" "$@"; }

node_state() { slurm_env sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n 1; }

cluster_healthy() {
    alive munged && alive mariadbd && alive slurmdbd && alive slurmctld && alive slurmd \
        && slurm_env scontrol ping 2>/dev/null | grep -q 'is UP' \
        && [[ -n "$(node_state)" ]]
}

print_exports() {
    # Shell for `eval`: the cluster's config, and the overrides conf/launcher/slurm.yaml reads
    # from the environment (partition; the node has no GPU and few CPUs).
    cat <<EOF
export SLURM_CONF=$CONF
export SAE_SLURM_PARTITION=$PARTITION
export SAE_SLURM_GPUS_PER_NODE=0
export SAE_SLURM_CPUS_PER_TASK=1
export SAE_SLURM_MEM_GB=1
export SAE_SLURM_EXTRACT_CPUS=1
export SAE_SLURM_EXTRACT_MEM_GB=1
EOF
}

# --- munge ---------------------------------------------------------------------------------

# This cluster's own munged: its key, socket, pid, seed and log files are under the state
# directory, and slurm.conf / slurmdbd.conf name its socket (AuthInfo=socket=...), so the cluster
# neither uses nor disturbs any other munged on the machine (the system's, another cluster's).
munge_works() {
    munge -n --socket="$MUNGE_SOCKET" 2>/dev/null \
        | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1
}

start_munge() {
    # munged refuses to run as root; it wants its key readable by munge only and its files in
    # directories nobody else can write to (0755 lets root's clients reach the socket).
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key"
    else
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    install -o munge -g munge -m 0640 /dev/null "$LOG_DIR/munged.log"
    runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
        --log-file="$LOG_DIR/munged.log" >>"$LOG_DIR/munged-start.log" 2>&1 \
        || { show_logs; die "munged did not start"; }
    wait_pidfile "$MUNGE_DIR/munged.pid" munged || { show_logs; die "munged wrote no pid file"; }
    munge_works || { show_logs; die "munged runs but munge -n | unmunge fails on $MUNGE_SOCKET"; }
    log "started munged ($(cat "$PID_DIR/munged")) on $MUNGE_SOCKET"
}

# --- MariaDB (the accounting database) ------------------------------------------------------

db_client() { mariadb --no-defaults --socket="$DB_SOCKET" --user=root "$@"; }

# A private MariaDB instance, created fresh at every start: slurmctld -c starts job ids from 1
# again, so an old database would answer sacct with the jobs of a previous cluster. Unix socket
# only (skip-networking): no port to clash with a system MariaDB or another cluster. Small
# InnoDB sizes: the database holds a few hundred jobs (slurmdbd logs that they are below its
# recommended values; harmless here). Runs as the mysql user, like a packaged server.
start_db() {
    local password
    install -d -o mysql -g mysql -m 0755 "$DB_DIR"
    install -d -o mysql -g mysql -m 0700 "$DB_DIR/data"
    install -o mysql -g mysql -m 0640 /dev/null "$LOG_DIR/mariadbd.log"
    cat >"$DB_DIR/my.cnf" <<EOF
# Written by scripts/slurm_local.sh: the private accounting database of the local test cluster.
[mysqld]
user=mysql
datadir=$DB_DIR/data
socket=$DB_SOCKET
pid-file=$DB_DIR/mysqld.pid
log-error=$LOG_DIR/mariadbd.log
skip-networking
skip-name-resolve
performance_schema=OFF
innodb_buffer_pool_size=32M
innodb_log_file_size=8M
innodb_flush_log_at_trx_commit=0
innodb_lock_wait_timeout=900
EOF
    # --defaults-file (first) also keeps /etc/mysql out of it.
    mariadb-install-db --defaults-file="$DB_DIR/my.cnf" --auth-root-authentication-method=socket \
        --skip-test-db --skip-name-resolve >>"$LOG_DIR/mariadb-install-db.log" 2>&1 \
        || { show_logs; die "mariadb-install-db failed"; }
    # mariadbd stays in the foreground: detach it (own session, no inherited stdout).
    setsid mariadbd --defaults-file="$DB_DIR/my.cnf" </dev/null >>"$LOG_DIR/mariadbd-start.log" 2>&1 &
    wait_pidfile "$DB_DIR/mysqld.pid" mariadbd || { show_logs; die "mariadbd exited at start"; }
    wait_ready "MariaDB" mariadbd mariadb-admin --no-defaults --socket="$DB_SOCKET" --user=root ping
    # The database user of slurmdbd, with a random password (slurmdbd.conf is mode 600).
    password="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
    db_client <<<"CREATE USER '$DB_USER'@'localhost' IDENTIFIED BY '$password';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';" \
        || { show_logs; die "could not create the database user $DB_USER"; }
    log "started mariadbd ($(cat "$PID_DIR/mariadbd")) on $DB_SOCKET"
    write_dbd_conf "$password"
}

# --- slurmdbd.conf --------------------------------------------------------------------------

write_dbd_conf() {
    local password="$1"
    (umask 077 && cat >"$DBD_CONF" <<EOF
# Written by scripts/slurm_local.sh: the accounting daemon of the local test cluster.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$STATE_DIR/slurmdbd.pid
# The private MariaDB above. Slurm connects with a host and a port only; "localhost" means the
# client library's default unix socket, which MYSQL_UNIX_PORT (set when slurmdbd starts) points
# at this instance's socket.
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$password
EOF
    )
    chown root:root "$DBD_CONF"
    chmod 0600 "$DBD_CONF"
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
# This cluster's own munged (see start_munge). Slurm holds a requeued job back until the job
# credentials of its last run expire (cred_expire + 1 s; default 120 s). 10 s keeps the requeue
# tests short and still gives a job step ample time to use its credential on a loaded machine
# (5 s would save 4 s per requeue).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
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
# Accounting through this cluster's slurmdbd and private MariaDB, as on a real cluster: sacct
# answers the state of every job (submitit asks it), array tasks cancelled while pending
# included. Finished jobs also stay in slurmctld's memory for MinJobAge seconds (squeue,
# scontrol show job).
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# For connections to slurmdbd, Slurm takes the munged socket from here, not from AuthInfo.
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
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

# --- slurmdbd -------------------------------------------------------------------------------

start_dbd() {
    # MYSQL_UNIX_PORT: the MariaDB client library's default socket (see write_dbd_conf).
    SLURM_CONF="$CONF" MYSQL_UNIX_PORT="$DB_SOCKET" slurmdbd >>"$LOG_DIR/slurmdbd-start.log" 2>&1 \
        || { show_logs; die "slurmdbd did not start"; }
    wait_pidfile "$STATE_DIR/slurmdbd.pid" slurmdbd || { show_logs; die "slurmdbd exited at start"; }
    # Ready = it answers sacctmgr (which reaches it through slurm.conf's AccountingStorage*).
    # No `sacctmgr add cluster`: slurmctld registers its cluster (ClusterName) when it starts.
    wait_ready "slurmdbd" slurmdbd slurm_env sacctmgr -n -P list cluster format=cluster
    log "started slurmdbd ($(cat "$PID_DIR/slurmdbd")) on port $DBD_PORT"
}

# stop_all: every daemon at once. (Stopping the Slurm daemons first, then MariaDB and munged,
# took 2 s longer and saves nothing: the state directory is deleted, or kept for its logs.)
stop_all() {
    stop_recorded slurmd slurmctld slurmdbd mariadbd munged
}

# --- subcommands ---------------------------------------------------------------------------

cmd_start() {
    local t0 i state user
    t0="$(date +%s.%N)"
    ensure_installed
    mkdir -p "$STATE_DIR" "$PID_DIR" "$LOG_DIR"
    if cluster_healthy; then
        log "already running (state: $STATE_DIR); reusing it"
        echo "# sae local SLURM cluster: already running (reused), state $STATE_DIR"
        print_exports
        return 0
    fi
    # Sockets live under the state directory; a unix socket path has at most 107 bytes.
    ((${#DB_SOCKET} <= 100)) || die "SLURM_LOCAL_DIR is too long for a socket path: $STATE_DIR"
    # munged and mariadbd run as the users munge and mysql: they must reach the state directory.
    chmod 0755 "$STATE_DIR"
    for user in munge mysql; do
        runuser -u "$user" -- test -x "$STATE_DIR" || die "user $user cannot reach $STATE_DIR" \
            "(a parent directory is not searchable by others); pick another SLURM_LOCAL_DIR"
    done
    # Half-started leftovers of an earlier run: stop them and start clean.
    stop_all
    rm -rf "$STATE_DIR/ctld" "$STATE_DIR/spool" "$MUNGE_DIR" "$DB_DIR" "$STATE_DIR/bin"
    mkdir -p "$STATE_DIR/ctld" "$STATE_DIR/spool"
    rm -f "$LOG_DIR"/*.log "$STATE_DIR"/*.pid "$DBD_CONF"
    write_conf
    start_munge
    start_db
    start_dbd

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
    stop_all
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
