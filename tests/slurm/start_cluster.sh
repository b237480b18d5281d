#!/usr/bin/env bash
# Starts a one-node Slurm cluster on this machine (Debian's slurm-wlm + munge) for the Slurm tests.
# Idempotent: installs the packages if missing, writes the config, (re)starts munged, slurmctld and slurmd, and
# waits until the node is idle. Needs root. Prints the partition name on success.
set -euo pipefail
PARTITION=${EDU_FILTER_TEST_PARTITION:-debug}

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c "/usr/sbin/munged --force" 2>/dev/null || /usr/sbin/munged --force
fi

install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
conf=$(cat <<CONF
ClusterName=edu-filter-test
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MaxArraySize=10001
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
MessageTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=$PARTITION-short Nodes=$host MaxTime=01:00:00 State=UP
CONF
)
changed=1
if [ -f /etc/slurm/slurm.conf ] && [ "$(cat /etc/slurm/slurm.conf)" = "$conf" ]; then changed=0; fi
echo "$conf" > /etc/slurm/slurm.conf

stop() {  # $1: daemon name; waits until it is gone, so it cannot be mistaken for a running one
  pkill -x "$1" || true
  for _ in $(seq 50); do pgrep -x "$1" >/dev/null || return 0; sleep 0.2; done
  pkill -9 -x "$1" || true
}
if [ $changed = 1 ]; then stop slurmctld; stop slurmd; fi

state=unknown
for _ in $(seq 60); do
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -c  # -c: no jobs recovered from an earlier life
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  state=$(timeout 5 sinfo -h -n "$host" -o %t 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mix|alloc) echo "$PARTITION"; exit 0 ;;
    down*|drain*) timeout 5 scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 1
done
echo "the Slurm node did not become idle (state: ${state:-unknown}); see /var/log/slurm/" >&2
exit 1
