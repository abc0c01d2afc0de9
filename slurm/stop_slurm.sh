#!/usr/bin/env bash
# Stop the cluster started by slurm/start_slurm.sh: cancel its jobs, then stop each daemon by the PID in its
# pid file (never by name, so other daemons on the machine are untouched). Safe to run when nothing runs.
ROOT=${SLURM_ROOT:-/tmp/fsdfm-slurm}
export SLURM_CONF="$ROOT/slurm.conf"
if [ -s "$ROOT/slurmctld.pid" ] && kill -0 "$(cat "$ROOT/slurmctld.pid")" 2>/dev/null; then
  # leave no queued job behind: the saved state would start it again on the next start
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
for f in "$ROOT/slurmd.pid" "$ROOT/slurmctld.pid" "$ROOT/slurmdbd.pid" "$ROOT/mysql/mariadbd.pid" /run/munge/munged.pid; do
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done   # slurmctld takes ~2 s
  echo "stopped $(basename "$f" .pid) ($pid)"
done
