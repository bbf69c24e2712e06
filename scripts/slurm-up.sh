#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests of `python -m bilateral sweep
# --executor slurm` and for trying the executor before using a real cluster.
#
#   sudo scripts/slurm-up.sh      # installs slurm-wlm + munge when missing, starts the daemons
#
# Idempotent: when the node already answers with this configuration, it only says so. Exits
# non-zero with the reason when it cannot (not root, apt fails, a daemon does not start).
# Settings that work in containers and sandboxes with SLURM 22.05 (Debian 12): no cgroups
# (proctrack/linuxproc, task/none, no cgroup.conf), cons_tres scheduling of cores and memory,
# everything as root.
set -uo pipefail

die() { echo "slurm-up: $*" >&2; exit 1; }
say() { echo "slurm-up: $*"; }
node_state() { sinfo -h -N -o %t 2>/dev/null | head -n1; }
up() { [[ "$(node_state)" =~ ^(idle|mix|alloc) ]]; }

host=$(hostname -s)
cpus=$(nproc --all)
mem=$(free -m | awk '/^Mem:/ {print $2}')
mem=$((mem * 9 / 10))                     # leave some memory to the system
conf="# written by scripts/slurm-up.sh: one node, everything as root, no cgroups
ClusterName=bilateral
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again cred_expire + 1 s later (default 120 s)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# schedule every 2 s (defaults 30-60 s): dependants start soon after their upstream runs
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((mem / cpus))
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"

if [[ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" == "$conf" ]] && command -v sinfo >/dev/null && up; then
    say "already up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "needs root (to install packages and start munged/slurmctld/slurmd)"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    # the package scripts would try to start the services through an init system we may lack
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -q slurm-wlm munge >/tmp/slurm-up-apt.log 2>&1 || {
        apt-get update -q >>/tmp/slurm-up-apt.log 2>&1 &&
        apt-get install -y -q slurm-wlm munge >>/tmp/slurm-up-apt.log 2>&1; } || {
        rm -f /usr/sbin/policy-rc.d
        die "apt-get install slurm-wlm munge failed: $(tail -n 3 /tmp/slurm-up-apt.log | tr '\n' ' ')"; }
    rm -f /usr/sbin/policy-rc.d
fi

# munge: a key, its run folder, the daemon as the munge user
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || die "cannot write munge.key"
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [[ -f /etc/slurm/slurm.conf && "$(cat /etc/slurm/slurm.conf)" != "$conf" ]]; then
    # another configuration: restart the daemons (started by this script) so they read this one
    for d in slurmd slurmctld; do
        [[ -f /run/$d.pid ]] && kill "$(cat "/run/$d.pid")" 2>/dev/null
    done
    for _ in $(seq 40); do
        pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break
        sleep 0.5
    done
fi
printf '%s\n' "$conf" > /etc/slurm/slurm.conf
rm -f /etc/slurm/cgroup.conf

if ! pgrep -x slurmctld >/dev/null; then
    slurmctld || die "slurmctld did not start: $(tail -n 3 /var/log/slurm/slurmctld.log 2>/dev/null)"
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd || die "slurmd did not start: $(tail -n 3 /var/log/slurm/slurmd.log 2>/dev/null)"
fi

state=""
for _ in $(seq 60); do
    state=$(node_state)
    if up; then
        say "up: $(sinfo -h -N -o '%N %t %c CPUs %m MB')"
        exit 0
    fi
    if [[ "$state" =~ ^(down|drain|drng) ]]; then
        scontrol update nodename="$host" state=resume >/dev/null 2>&1
    fi
    sleep 1
done
die "node $host not idle after 60 s (state: ${state:-none}); see /var/log/slurm/slurmctld.log and slurmd.log"
