# Sourced by setup.sh, start.sh, stop.sh, smoke-test.sh. Not a program.
# Everything an instance owns lives under BASE; nothing is written to /etc.
#
# Settings (give them to setup.sh; it records them in BASE/etc/kit.env, which the other scripts
# read; a variable set in the environment wins over kit.env):
#   CTLD_PORT=6817 SLURMD_PORT=6818   slurmctld / slurmd TCP ports (127.0.0.1)
#   WITH_DBD=1                        also run slurmdbd + a private MariaDB, so `sacct` works
#   DBD_PORT=6819 DB_PORT=6829        slurmdbd / MariaDB TCP ports (127.0.0.1), WITH_DBD=1 only
#   NODE=$(hostname -s)               NodeName (NodeAddr is always 127.0.0.1)
#   MIN_JOB_AGE=3600                  seconds a finished job stays visible to scontrol/squeue
#   KILL_WAIT=5                       seconds between SIGTERM and SIGKILL on cancel/time limit

BASE=${SLURM_BASE:-${BASE:-/var/tmp/dcflow-slurm}}
KIT_VARS="CTLD_PORT SLURMD_PORT WITH_DBD DBD_PORT DB_PORT NODE MIN_JOB_AGE KILL_WAIT"
if [ -f "$BASE/etc/kit.env" ]; then
    for _v in $KIT_VARS; do [ -n "${!_v:-}" ] && eval "_env_$_v=\${$_v}"; done
    . "$BASE/etc/kit.env"
    for _v in $KIT_VARS; do _e=_env_$_v; [ -n "${!_e:-}" ] && eval "$_v=\${$_e}"; done
fi
CTLD_PORT=${CTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
WITH_DBD=${WITH_DBD:-1}
DBD_PORT=${DBD_PORT:-6819}
DB_PORT=${DB_PORT:-6829}
NODE=${NODE:-$(hostname -s)}
MIN_JOB_AGE=${MIN_JOB_AGE:-3600}
KILL_WAIT=${KILL_WAIT:-5}

MUNGE_DIR=$BASE/munge
MUNGE_KEY=$MUNGE_DIR/etc/munge.key
MUNGE_SOCKET=$MUNGE_DIR/run/munge.socket.2
MUNGE_PID=$MUNGE_DIR/run/munged.pid
MUNGE_LOG=$MUNGE_DIR/log/munged.log
MUNGE_SEED=$MUNGE_DIR/lib/munged.seed

SLURM_CONF=$BASE/etc/slurm.conf
export SLURM_CONF
DBD_CONF=$BASE/etc/slurmdbd.conf       # found by slurmdbd beside $SLURM_CONF
CTLD_PID=$BASE/run/slurmctld.pid
SLURMD_PID=$BASE/run/slurmd.pid
DBD_PID=$BASE/run/slurmdbd.pid
CTLD_LOG=$BASE/log/slurmctld.log
SLURMD_LOG=$BASE/log/slurmd.log
DBD_LOG=$BASE/log/slurmdbd.log
JOBCOMP_LOG=$BASE/log/jobcomp.log

DB_DIR=$BASE/mysql
DB_CNF=$DB_DIR/my.cnf
DB_DATA=$DB_DIR/data
DB_SOCKET=$DB_DIR/run/mysqld.sock
DB_PID=$DB_DIR/run/mariadbd.pid
DB_LOG=$DB_DIR/log/mariadbd.err
DB_PASS_FILE=$BASE/etc/db.pass

PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# proc_alive PID COMM: process PID exists, is not a zombie, and its /proc comm is COMM (guards
# against pid reuse). Zombies count as gone: in this VM, PID 1 reaps orphans only every few seconds.
proc_alive() {
    local st
    [ -n "$1" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] || return 1
    st=$(sed -e 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# pid_alive PIDFILE COMM: the pid in PIDFILE is running as COMM. Daemons delete their pid file
# when they begin to exit, so to wait for an exit use proc_alive on the pid read beforehand.
pid_alive() {
    [ -s "$1" ] && proc_alive "$(cat "$1" 2>/dev/null)" "$2"
}

# port_listening PORT: something listens on TCP PORT.
port_listening() {
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}

# now_ms: wall clock in milliseconds, for timings.
now_ms() { date +%s%3N; }
