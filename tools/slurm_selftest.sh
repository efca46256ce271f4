#!/usr/bin/env bash
# Start a one-node SLURM on this machine from Debian's packages and run a 2-task CPU job through
# tools/submit.py: preempted (the signal SLURM sends before a timeout or preemption), then
# requeued by `scontrol requeue`, each mid-run; it must end bitwise equal to an uninterrupted run
# (tools/slurm_selftest.py). Needs root (apt-get, daemons); everything else lives in a temporary
# folder (munge on its default socket), with its own ports, and is stopped at the end. docs/reliability.md has
# the output of one run.
#
#     tools/slurm_selftest.sh [PYTHON]      # PYTHON: default .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
[ "$(id -u)" = 0 ] || { echo "error: run as root (it installs packages and starts daemons)" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v mariadbd >/dev/null || ! command -v my_print_defaults >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server-core mariadb-client-core >/dev/null
fi
T=$(mktemp -d /tmp/slurm_selftest.XXXXXX)
chmod 755 "$T"
HOST=$(hostname -s)
CPUS=$(nproc)
PIDS=()
cleanup() {
    scancel --quiet --full --user=root 2>/dev/null || true
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 1
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2; shift 2
    until "$@" >"$T/wait.log" 2>&1; do
        if [ $SECONDS -ge $deadline ]; then
            echo "error: $what did not start ($*: $(tail -1 "$T/wait.log")); logs in $T" >&2
            exit 1
        fi
        sleep 0.5
    done
}

echo "== SLURM $(slurmctld -V | cut -d' ' -f2), state and logs in $T"
# munge on its default socket (sacctmgr reaches slurmdbd only through that one); a running
# munged is used as it is
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p "$T/munge" /run/munge
    mungekey --create --keyfile="$T/munge/munge.key" --force
    munged --key-file="$T/munge/munge.key" --pid-file="$T/munge/munged.pid" \
        --log-file="$T/munge/munged.log" --seed-file="$T/munge/seed" --force
    PIDS+=("$(cat "$T/munge/munged.pid")")
fi

# MariaDB for slurmdbd (sacct: submitit reads job states with it), on a socket only
mariadb-install-db --datadir="$T/db" --user=root --auth-root-authentication-method=normal >"$T/db-install.log" 2>&1
mariadbd --datadir="$T/db" --socket="$T/mysql.sock" --skip-networking --user=root \
    --pid-file="$T/mysql.pid" --log-error="$T/mysql.log" &
PIDS+=($!)
wait_for 60 mariadb mariadb --socket="$T/mysql.sock" -uroot -e "select 1"

cat >"$T/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=16819
SlurmUser=root
LogFile=$T/slurmdbd.log
PidFile=$T/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
EOF
chmod 600 "$T/slurmdbd.conf"
cat >"$T/slurm.conf" <<EOF
ClusterName=selftest
SlurmctldHost=$HOST
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$T/ctld
SlurmdSpoolDir=$T/d
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=16819
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName=$HOST CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
export SLURM_CONF="$T/slurm.conf"
# slurmdbd reaches MariaDB through its socket (StorageHost=localhost and the client's default socket)
export MYSQL_UNIX_PORT="$T/mysql.sock"
mkdir -p "$T/ctld" "$T/d"
slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
wait_for 30 slurmdbd test -s "$T/slurmdbd.pid"
PIDS+=("$(cat "$T/slurmdbd.pid")")
wait_for 30 "slurmdbd's database" sacctmgr -i add cluster selftest
slurmctld -f "$T/slurm.conf"
wait_for 30 slurmctld test -s "$T/slurmctld.pid"
PIDS+=("$(cat "$T/slurmctld.pid")")
slurmd -f "$T/slurm.conf"
wait_for 30 slurmd test -s "$T/slurmd.pid"
PIDS+=("$(cat "$T/slurmd.pid")")
wait_for 60 "the node" bash -c "sinfo -h -o %T | grep -q idle"
sinfo

OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" tools/slurm_selftest.py --work-dir "$T/run"
