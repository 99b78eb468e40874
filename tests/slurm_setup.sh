#!/usr/bin/env bash
# Start a real one-node Slurm cluster on this machine (root, Debian packages slurmctld slurmd munge),
# for tests/test_slurm.py. Idempotent: when the node already answers `sinfo` as usable it only reports.
# Exits non-zero with one clear line on stderr when Slurm cannot be started here.
#
#   sudo bash tests/slurm_setup.sh            # start (or confirm) the cluster
#   SLURM_SETUP_INSTALL=1 bash tests/slurm_setup.sh   # apt-get install the packages first
#
# Layout: config /etc/slurm/slurm.conf (written only when absent or written by this script before),
# state under /var/spool/slurm{ctld,d}, logs under /var/log/slurm/.
set -euo pipefail

die() { echo "slurm_setup: $*" >&2; exit 1; }

CONF=/etc/slurm/slurm.conf
MARK="# written by cpt-megatron tests/slurm_setup.sh"
PARTITION="${SLURM_SETUP_PARTITION:-debug}"
WAIT_S="${SLURM_SETUP_WAIT_S:-60}"

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }
usable() { case "$(node_state)" in idle|allocated|mixed|completing) return 0 ;; *) return 1 ;; esac; }

[ "$(id -u)" = 0 ] || die "must run as root (it starts munged, slurmctld and slurmd)"

if [ "${SLURM_SETUP_INSTALL:-0}" = 1 ] && ! command -v slurmctld >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }; then
    die "apt-get install slurmctld slurmd munge failed"
  fi
fi
for bin in munged slurmctld slurmd sinfo scontrol; do
  command -v "$bin" >/dev/null 2>&1 || die "$bin not found; install with: apt-get install -y slurmctld slurmd munge"
done

if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && usable; then
  echo "slurm_setup: already up ($(sinfo -h -N -o '%N %T' | head -n1))"
  exit 0
fi

HOST="$(hostname -s)"
CPUS="$(nproc)"
# slurmd -C prints this node's real topology; keep its socket/core split so slurmd does not drain the node
HW="$(slurmd -C 2>/dev/null | head -n1 || true)"
TOPO="$(echo "$HW" | grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' || true)"
MEM_MB="$(echo "$HW" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')"
MEM_MB="${MEM_MB:-1024}"

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
if [ ! -f "$CONF" ] || grep -qF "$MARK" "$CONF"; then
  cat >"$CONF" <<EOF
$MARK
ClusterName=cpt-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=30
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName=$HOST CPUs=$CPUS $TOPO RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
else
  echo "slurm_setup: keeping the existing $CONF (not written by this script)"
fi

# munge: key, ownership, daemon
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
if id munge >/dev/null 2>&1; then
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- munged || die "munged failed to start (see /var/log/munge/munged.log)"
else
  chmod 0400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || munged --force || die "munged failed to start (see /var/log/munge/munged.log)"
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge round trip failed: munged is not answering"

pgrep -x slurmctld >/dev/null || slurmctld || die "slurmctld failed to start (see /var/log/slurm/slurmctld.log)"
pgrep -x slurmd >/dev/null || slurmd || die "slurmd failed to start (see /var/log/slurm/slurmd.log)"

for _ in $(seq "$WAIT_S"); do
  if usable; then
    echo "slurm_setup: up ($(sinfo -h -N -o '%N %T %c CPUs' | head -n1))"
    exit 0
  fi
  state="$(node_state)"
  case "$state" in
    down|drained|draining|fail) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
die "node $HOST did not become idle within ${WAIT_S}s (state: '$(node_state)'); see /var/log/slurm/slurmd.log and slurmctld.log"
