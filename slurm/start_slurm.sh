#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine, for `make test-slurm` and for trying the slurm executor.
#
#   bash slurm/start_slurm.sh              # ROOT=/tmp/fsdfm-slurm (override with SLURM_ROOT=...)
#   export SLURM_CONF=/tmp/fsdfm-slurm/slurm.conf
#
# Needs root and Debian's packages (installed on first use): slurmctld slurmd slurm-client munge, plus
# slurmdbd + mariadb-server for accounting (ACCOUNTING=1, the default). Without accounting, sacct knows no
# job and a job that dies without a result is invisible to pollers.
# Idempotent: a daemon whose pid file names a live process is left alone. Stop with slurm/stop_slurm.sh.
# Test-friendly settings: AuthInfo=cred_expire=10 (a requeued job restarts after ~10 s instead of 120 s),
# scheduling passes every 2 s, two fake GPUs as GRES (File= entries must exist or the node is drained; CUDA_VISIBLE_DEVICES stays empty).
set -euo pipefail
ROOT=${SLURM_ROOT:-/tmp/fsdfm-slurm}
ACCOUNTING=${ACCOUNTING:-1}
HOST=$(hostname -s)
NCPU=$(nproc)
MEM=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) * 8 / 10 ))   # MiB, leave room for the OS

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
if ! command -v slurmctld >/dev/null || { [ "$ACCOUNTING" = 1 ] && ! command -v mariadbd >/dev/null; }; then
  echo "installing $pkgs ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi

mkdir -p "$ROOT"/{state,spool,log,gpu} /run/munge
chown munge:munge /run/munge

# --- munge (authentication between the daemons and the clients)
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 2>/dev/null
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged          # daemonizes; pid in /run/munge/munged.pid
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done

# --- accounting: MariaDB + slurmdbd
ACCT="AccountingStorageType=accounting_storage/none"
if [ "$ACCOUNTING" = 1 ]; then
  mkdir -p "$ROOT/mysql" /run/mysqld
  chown mysql:mysql "$ROOT/mysql" /run/mysqld
  if [ ! -d "$ROOT/mysql/data/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$ROOT/mysql/data" >"$ROOT/log/mysql-install.log" 2>&1
  fi
  if ! alive "$ROOT/mysql/mariadbd.pid"; then
    /usr/sbin/mariadbd --user=mysql --datadir="$ROOT/mysql/data" --socket=/run/mysqld/mysqld.sock \
      --bind-address=127.0.0.1 --port=3306 --pid-file="$ROOT/mysql/mariadbd.pid" \
      --log-error="$ROOT/mysql/error.log" >/dev/null 2>&1 &
  fi
  for _ in $(seq 150); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
  cat > "$ROOT/slurmdbd.conf" <<EOC
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$ROOT/log/slurmdbd.log
PidFile=$ROOT/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOC
  chmod 600 "$ROOT/slurmdbd.conf"
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819"
fi

# --- slurm.conf: one node with all CPUs, 80% of the memory and two fake GPUs
touch "$ROOT/gpu/fake0" "$ROOT/gpu/fake1"
echo "NodeName=$HOST Name=gpu File=$ROOT/gpu/fake[0-1]" > "$ROOT/gres.conf"
cat > "$ROOT/slurm.conf" <<EOC
ClusterName=fsdfm
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/slurmctld.pid
SlurmdPidFile=$ROOT/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
# scan pending jobs every 2 s (default 60/30 s): a requeued job otherwise idles until the next pass
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=300
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOC
export SLURM_CONF="$ROOT/slurm.conf"

if [ "$ACCOUNTING" = 1 ]; then
  if ! alive "$ROOT/slurmdbd.pid"; then
    /usr/sbin/slurmdbd   # finds slurmdbd.conf beside $SLURM_CONF; daemonizes; pid in $ROOT/slurmdbd.pid
  fi
  for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
  sacctmgr -i add cluster fsdfm >/dev/null 2>&1 || true
fi
alive "$ROOT/slurmctld.pid" || /usr/sbin/slurmctld    # daemonizes; pid in $ROOT/slurmctld.pid
alive "$ROOT/slurmd.pid" || /usr/sbin/slurmd
for _ in $(seq 150); do sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break; sleep 0.2; done
sinfo
echo "export SLURM_CONF=$SLURM_CONF"
