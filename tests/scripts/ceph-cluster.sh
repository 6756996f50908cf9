#!/usr/bin/env bash
# A throwaway one-node Ceph cluster for the RBD tests: one ceph-mon and one ceph-osd
# (memstore: data in the OSD's RAM, capped) on 127.0.0.1 only, no cephx, no mgr (RBD I/O
# does not need one), pool `rbd` ready for images. Packages: ceph-mon and ceph-osd from
# Debian, installed by tests/scripts/install-deps.sh. About 10 s to ready on 2 cores.
#
#   ceph-cluster.sh DIR PORT [WATCH_PID]
#
# DIR (created, must not exist or be empty) gets ceph.conf, the daemons' data and logs, and
# mon.pid / osd.pid. The mon listens on 127.0.0.1:PORT (msgr v1). When the cluster serves
# I/O the script creates DIR/ready and stays in the foreground as the daemons' parent (they
# run with -f, so they are reaped here and never left as zombies of PID 1); a client sets
# CEPH_CONF=DIR/ceph.conf. It stops the daemons, waits for them and exits on SIGTERM or
# SIGINT, when WATCH_PID (default: its parent) goes away (a test that died), or when a daemon was killed
# by a test (SIGKILL of both: "the cluster is gone"). A daemon stopped with SIGSTOP and
# resumed with SIGCONT (the tests' "OSD stalls briefly") is not an exit.
set -euo pipefail

D=${1:?usage: ceph-cluster.sh DIR PORT}
PORT=${2:?usage: ceph-cluster.sh DIR PORT}
PARENT=${3:-$PPID}
mkdir -p "$D"/{mon,osd,log,run}
D=$(cd "$D" && pwd)
export CEPH_CONF=$D/ceph.conf
# osd client watch timeout: a dead client's watch (and with it its claim on an image's
# exclusive lock) expires after 5 s instead of 30, so the failover test takes seconds.
cat > "$CEPH_CONF" <<EOF
[global]
fsid = $(cat /proc/sys/kernel/random/uuid)
mon host = [v1:127.0.0.1:$PORT]
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon warn on pool no redundancy = false
mon data avail warn = 1
run dir = $D/run
log file = $D/log/\$name.log
admin socket = $D/run/\$name.asok
pid file = $D/run/\$name.pid
osd client watch timeout = 5
[mon.a]
mon data = $D/mon
public addr = v1:127.0.0.1:$PORT
[osd]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd data = $D/osd
osd objectstore = memstore
memstore device bytes = 1073741824
# The OSD sends no mon commands at start (CRUSH location, device class): this script puts
# it in the CRUSH map itself, and a command sent that early can meet the race below.
osd crush update on start = false
osd class update on start = false
EOF

# A mon command from a client whose MonClient has not yet received the monmap carries the
# zero fsid, and the mon refuses it: "wrong fsid", EPERM (the mon logs "handle_command on
# fsid 00000000-0000-0000-0000-000000000000 != ..."). Ceph 16 clients meet this race on a
# fresh mon when the machine is busy: 8 of 30 starts failed so while a compiler ran. Every
# command below is idempotent, so it is retried; the last failure's output is shown.
mon_cmd() {
    local try out
    for try in 1 2 3 4 5 6 7 8 9 10; do
        if out=$(timeout 60 "$@" 2>&1); then
            printf '%s\n' "$out"
            return 0
        fi
        sleep 0.5
    done
    echo "ceph-cluster: '$*' failed $try times; the last output: $out" >&2
    return 1
}

pids=()
# SIGKILL: the data is thrown away, and an OSD told SIGTERM takes ~10 s to shut down.
stop() {
    local p
    for p in "${pids[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        wait "$p" 2>/dev/null || true
    done
}
trap 'stop; exit 0' TERM INT
trap stop EXIT

ceph-mon --id a --mkfs --keyring /dev/null
touch "$D/mon/keyring"
ceph-mon --id a -f &
pids+=($!)
echo $! > "$D/mon.pid"

# The same uuid for `osd create` and `ceph-osd --mkfs`: it is the OSD's identity, and
# `osd create` with a uuid is idempotent (a retried command returns the same id).
uuid=$(cat /proc/sys/kernel/random/uuid)
id=$(mon_cmd ceph osd create "$uuid")
mon_cmd ceph osd crush add "osd.$id" 1 root=default >/dev/null
ceph-osd --id "$id" --mkfs --osd-uuid "$uuid" >"$D/log/osd-mkfs.out" 2>&1 ||
    { cat "$D/log/osd-mkfs.out" >&2; exit 1; }
ceph-osd --id "$id" -f &
pids+=($!)
echo $! > "$D/osd.pid"

deadline=$((SECONDS + 60))
# An OSD that fails its first boot exits; fail fast, the caller retries on a new directory
# and port.
until timeout 10 ceph osd stat 2>/dev/null | grep -q "1 up"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo "ceph-cluster: the OSD did not come up" >&2; exit 1; }
    kill -0 "${pids[1]}" 2>/dev/null || { echo "ceph-cluster: the OSD exited at start" >&2; exit 1; }
    sleep 0.3
done
mon_cmd ceph osd pool create rbd 8 8 >/dev/null
mon_cmd ceph osd pool application enable rbd rbd >/dev/null
mon_cmd rbd pool init rbd >/dev/null
touch "$D/ready"
echo "ceph-cluster: ready (mon 127.0.0.1:$PORT, CEPH_CONF=$CEPH_CONF)"

# Supervise: exit when told to, when the parent is gone, or when a daemon exited.
while kill -0 "$PARENT" 2>/dev/null; do
    for p in "${pids[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then
            echo "ceph-cluster: daemon $p exited; stopping the cluster" >&2
            exit 0
        fi
    done
    sleep 0.5 &
    wait $! || true
done
echo "ceph-cluster: parent $PARENT is gone; stopping the cluster" >&2
