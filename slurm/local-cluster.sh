#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine (1 slurmctld + N slurmd "nodes" on 127.0.0.1),
# for the tests in tests/slurm and for trying the templates without a cluster. Root only.
#
#   slurm/local-cluster.sh submit [SBATCH_OPTS] JOBFILE   sbatch, wait, print the job's output; rc 0 iff COMPLETED
#   slurm/local-cluster.sh CMD [ARGS...]                 run CMD with SLURM_CONF exported, then tear down
#   slurm/local-cluster.sh serve                         print "ready SLURM_CONF=..." and stay up until
#                                                        SIGTERM or until the parent process exits (test fixture)
# env: SL_NODES (2) SL_CPUS per node (64) SL_MEM_MB per node (256000) SL_GPUS fake GPUs per node (8)
#      SL_PORT controller port (16817; slurmd i listens on SL_PORT+i) SL_DIR scratch dir (kept if given)
# The nodes advertise what a GPU node has (slurmd does not check: config_overrides), so a template
# passes `sbatch --test-only` unmodified; jobs run on this machine's CPUs (submit with --gpus-per-node=0).
# Needs the Debian packages slurmctld slurmd slurm-client munge (installed here if missing). No systemd:
# every daemon is a child of this script and is stopped by PID; the /etc/hosts line naming the nodes
# (MASTER_ADDR comes from `scontrol show hostnames`) is removed on exit.
set -euo pipefail
NODES=${SL_NODES:-2}; CPUS=${SL_CPUS:-64}; MEM=${SL_MEM_MB:-256000}; GPUS=${SL_GPUS:-8}
PORT=${SL_PORT:-16817}
[ "$(id -u)" = 0 ] || { echo "local-cluster: must run as root (slurmd starts jobs as any user)" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null; } \
    || { echo "local-cluster: cannot install slurmctld slurmd slurm-client munge with apt-get" >&2; exit 3; }
fi
D=${SL_DIR:-$(mktemp -d -t local-cluster.XXXXXX)}
mkdir -p "$D"/{etc,state,log,munge,dev}; chmod 755 "$D/munge"
PIDS=(); MARK="# local-cluster $D"

teardown() {
  local rc=$?; set +e
  if [ -n "${SLURM_CONF:-}" ] && [ ${#PIDS[@]} -gt 1 ] && kill -0 "${PIDS[1]}" 2>/dev/null; then
    scancel --full $(timeout 5 squeue -h -o %i 2>/dev/null) 2>/dev/null   # cancel jobs: no slurmstepd outlives us
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill "${PIDS[i]}" 2>/dev/null; done   # slurmd*, slurmctld, munged
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null
  done
  grep -vF "$MARK" /etc/hosts > "$D/hosts.new" && cat "$D/hosts.new" > /etc/hosts   # not sed -i: may be a bind mount
  if [ $rc -ne 0 ]; then echo "local-cluster: exit $rc; logs in $D/log" >&2; tail -n 20 "$D"/log/*.log >&2
  elif [ -z "${SL_DIR:-}" ]; then rm -rf "$D"; fi
  exit $rc
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "127.0.0.1 $(for i in $(seq 1 "$NODES"); do printf 'node%d ' "$i"; done) $MARK" >> /etc/hosts
dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none; chmod 400 "$D/munge/munge.key"
[ "$GPUS" -gt 0 ] && echo "AutoDetect=off" > "$D/etc/gres.conf"
{
  cat <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2
SlurmctldPort=$PORT
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
EOF
  [ "$GPUS" -gt 0 ] && echo "GresTypes=gpu"
  for i in $(seq 1 "$NODES"); do
    echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT+i)) CPUs=$CPUS" \
         "RealMemory=$MEM $([ "$GPUS" -gt 0 ] && echo "Gres=gpu:$GPUS") State=UNKNOWN"
    mkdir -p "$D/spool/node$i"
    if [ "$GPUS" -gt 0 ]; then   # fake GPUs: GRES files must be character devices (these are /dev/null's numbers)
      f=""; for g in $(seq 0 $((GPUS-1))); do mknod "$D/dev/n${i}gpu$g" c 1 3; f="$f,$D/dev/n${i}gpu$g"; done
      echo "NodeName=node$i Name=gpu File=${f#,}" >> "$D/etc/gres.conf"
    fi
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$D/etc/slurm.conf"
export SLURM_CONF=$D/etc/slurm.conf

# setsid: a Ctrl+C in the terminal reaches this script, which stops the daemons in order, not them
setsid munged -F -f --socket="$D/munge/munge.socket.2" --key-file="$D/munge/munge.key" --pid-file="$D/munge/munged.pid" \
  --seed-file="$D/munge/munged.seed" --log-file="$D/log/munged.log" >"$D/log/munged.out" 2>&1 & PIDS+=($!)
for _ in $(seq 50); do [ -S "$D/munge/munge.socket.2" ] && break; sleep 0.1; done
setsid slurmctld -D -i >"$D/log/slurmctld.out" 2>&1 & PIDS+=($!)
for i in $(seq 1 "$NODES"); do setsid slurmd -D -N "node$i" >"$D/log/slurmd-node$i.out" 2>&1 & PIDS+=($!); done
for _ in $(seq 150); do   # up to 30 s until every node is idle
  [ "$(sinfo -h -t idle -o %D 2>/dev/null || true)" = "$NODES" ] && break; sleep 0.2
done
[ "$(sinfo -h -t idle -o %D 2>/dev/null || true)" = "$NODES" ] \
  || { echo "local-cluster: nodes not idle after 30 s" >&2; sinfo -N >&2 || true; exit 1; }
echo "local-cluster: $NODES node(s) idle; SLURM_CONF=$SLURM_CONF" >&2

case "${1:-}" in
  submit)   # like `sbatch --wait`, which polls every ~10 s; this polls every 0.2 s
    shift; jid=$(sbatch --parsable "$@"); jid=${jid%%;*}; st=""; info=""
    for _ in $(seq 4500); do
      info=$(scontrol -o show job "$jid" 2>/dev/null || true); st=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2 || true)
      case "$st" in PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUED|"") sleep 0.2 ;; *) break ;; esac
    done
    out=$(grep -o 'StdOut=[^ ]*' <<<"$info" | cut -d= -f2 || true)
    echo "local-cluster: job $jid $st $(grep -o ' ExitCode=[0-9:]*' <<<"$info") StdOut=$out" >&2
    [ -f "$out" ] && cat "$out"
    [ "$st" = COMPLETED ] ;;
  serve)    # the parent (e.g. pytest) stops us with SIGTERM; if it dies first we go too
    trap 'exit 0' TERM
    echo "ready SLURM_CONF=$SLURM_CONF"
    while kill -0 "$PPID" 2>/dev/null; do sleep 1 & wait $!; done ;;
  "") sinfo -N ;;
  *) "$@" ;;
esac
