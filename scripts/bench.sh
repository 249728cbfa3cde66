#!/usr/bin/env bash
# Benchmarks fsd/fsc on loopback against anchors started here: nginx (sendfile on) + curl, an
# rsync daemon, and iperf3 as the ceiling (issue 7; method and results in docs/BENCHMARKS.md).
#
#   scripts/bench.sh                 # full run: 1 GiB, 10,000 small files, 5 runs per case (~15 min)
#   scripts/bench.sh --quick         # smoke test: 256 MiB, 1,000 small files, 1 run per case
#   scripts/bench.sh --cases a,b,p   # some cases; p (perf profiles) runs only when asked for
#
# Cases: a 1 GiB download to a file (fsc, rsync daemon, nginx+curl); b to stdout > /dev/null
# (fsc, curl, iperf3 -R); c 1 GiB upload (fsc, rsync push); d small files, recursive download
# and upload (fsc, rsync daemon, and tar | tar as the local floor): 10,000 x 4 KiB in 20
# directories, 100,000 x 1 KiB flat and 100,000 x 1 KiB in 20 x 5,000; e -j 1/2/4; f resume after kill -9 at 50%; g 100 concurrent downloads
# of 100 different files (fsd vs nginx CPU per GiB and peak RSS); s re-runs over an unchanged
# destination (issue 16: the small tree and the big file, download and upload, fsc vs rsync -rt,
# both deciding by size and mtime; not in the default set); p perf profiles of fsd and fsc;
# w (only when asked for, root) a long, lossy link emulated between two network namespaces:
# fsc vs curl, aria2c -x8 and iperf3 -P8 at 0 / 0.1 / 1 % loss under bbr and cubic
# (scripts/bench/wan.sh, which has its own anchors and installs them).
#
# Each case does one untimed warm-up per tool (it also builds fsd's manifests), then RUNS timed
# runs alternating the tools (rotating the order each run). The source is re-read right before
# every run (this VM evicts page cache idle for ~30 s), every run writes to a fresh directory
# (case d: to a file system made for the run, where it can),
# and written data is removed and synced before the next run. Client CPU and peak RSS come from
# /usr/bin/time; server CPU from /proc/PID/stat (utime+stime+cutime+cstime deltas) and server
# peak RSS from VmHWM after resetting it (clear_refs 5); the rsync daemon forks a child per
# connection, so it is started per run under /usr/bin/time instead.
#
# Needs root for apt-get (skipped with --no-install when everything is there) and for
# clear_refs. Stops only the processes it started, by pid.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --quick            1 run per case, 256 MiB file, 1,000 small files, 100 x 4 MiB for (g)
  --cases LIST       comma-separated subset of a,b,c,d,e,f,g,s,t,p,w (default a,b,c,d,e,f,g,t; t = TLS
                     vs scp; w = emulated long, lossy link, 2 runs unless --runs, ~15 min per run)
  --profile          also run p (perf record -e cpu-clock -g of fsd and fsc)
  --runs N           timed runs per tool and case (default 5; 1 with --quick)
  --workdir DIR      data and scratch (default /var/tmp/fsbench); data is kept for reuse
  --results FILE     also write the Markdown report to FILE
  --no-install       do not apt-get anything
  --no-build         do not run cargo build (binaries: $FSD_BIN / $FSC_BIN or target/release)
  --clean            delete the generated data at the end
Environment: FSD_BIN, FSC_BIN (binaries to test; default target/release/{fsd,fsc} after a build);
BENCH_REV (how the report names the binaries' version).
EOF
}

quick=0
cases=a,b,c,d,e,f,g,t
runs=
work=/var/tmp/fsbench
results_out=
install=1
build=1
clean=0
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick=1 ;;
    --cases) cases=${2:?--cases needs a list}; shift ;;
    --cases=*) cases=${1#*=} ;;
    --profile) cases=$cases,p ;;
    --runs) runs=${2:?}; shift ;;
    --workdir) work=${2:?}; shift ;;
    --results) results_out=${2:?}; shift ;;
    --no-install) install=0 ;;
    --no-build) build=0 ;;
    --clean) clean=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 1 ;;
  esac
  shift
done
has_case() { [[ ",$cases," == *",$1,"* ]]; }

# Case w runs the whole matrix (6 links x 6 tools) per run: 2 runs unless --runs says otherwise.
wan_runs=${runs:-2}
if [ "$quick" = 1 ]; then
  big=$((256 << 20)); big_h="256 MiB"
  small_n=1000
  g_n=100; g_size=$((4 << 20)); g_h="4 MiB"
  runs=${runs:-1}
else
  big=$((1 << 30)); big_h="1 GiB"
  small_n=10000
  g_n=100; g_size=$((64 << 20)); g_h="64 MiB"
  runs=${runs:-5}
fi
small_dirs=20
small_size=4096
# Case d's other trees: 1 KiB files, flat and in 20 directories.
if [ "$quick" = 1 ]; then tiny_n=10000; else tiny_n=100000; fi
tiny_size=1024
[ "$runs" -ge 1 ] && [ "$runs" -le 50 ] || { echo "bench.sh: --runs must be 1..50" >&2; exit 1; }

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- tools
install_tools() {
  local need=() c
  for c in nginx:nginx-light rsync:rsync iperf3:iperf3 curl:curl /usr/bin/time:time; do
    command -v "${c%%:*}" >/dev/null 2>&1 || [ -x "${c%%:*}" ] || need+=("${c#*:}")
  done
  if has_case p && ! command -v perf >/dev/null 2>&1; then need+=(linux-perf); fi
  [ ${#need[@]} -eq 0 ] && return
  [ "$install" = 1 ] || die "missing ${need[*]} and --no-install given"
  log "installing ${need[*]}"
  # Keep the packages' own services (nginx on :80, an iperf3 daemon) from starting: only the
  # anchors this script starts, on its own ports, should run.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || {
    [ "$made_policy" = 1 ] && rm -f "$policy"
    die "apt-get install ${need[*]} failed"
  }
  [ "$made_policy" = 1 ] && rm -f "$policy"
  return 0
}
only_w=0; [ "$cases" = w ] && only_w=1
[ "$only_w" = 1 ] || install_tools
[ -r /proc/self/io ] || die "/proc/PID/io is needed"

if [ -n "${FSD_BIN:-}" ] || [ -n "${FSC_BIN:-}" ]; then
  fsd_bin=${FSD_BIN:?set both FSD_BIN and FSC_BIN}
  fsc_bin=${FSC_BIN:?set both FSD_BIN and FSC_BIN}
else
  fsd_bin=$repo/target/release/fsd
  fsc_bin=$repo/target/release/fsc
  if [ "$build" = 1 ]; then
    log "cargo build --release --workspace --bins"
    (cd "$repo" && cargo build --release --workspace --bins) >&2
  fi
fi
[ -x "$fsd_bin" ] && [ -x "$fsc_bin" ] || die "no fsd/fsc binaries ($fsd_bin, $fsc_bin)"
if [ -n "${BENCH_REV:-}" ]; then
  rev=$BENCH_REV
elif [ -n "${FSC_BIN:-}" ]; then
  rev="binaries $fsd_bin, $fsc_bin"
else
  rev="git $(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [ -n "$(cd "$repo" && git status --porcelain --untracked-files=no -- src client Cargo.toml Cargo.lock 2>/dev/null)" ]; then
    rev="$rev + uncommitted changes in src/client"
  fi
fi

# Case w has its own namespaces, servers and anchors (see scripts/bench/wan.sh).
if has_case w; then
  log "case w: emulated long, lossy link (scripts/bench/wan.sh), $wan_runs run(s)"
  RUNS=$wan_runs FSD_BIN=$fsd_bin FSC_BIN=$fsc_bin NO_INSTALL=$((1 - install)) \
    RESULTS=${results_out:+$results_out.wan.md} bash "$here/bench/wan.sh" || die "case w failed"
  cases=$(tr ',' '\n' <<< "$cases" | { grep -vx w || true; } | paste -sd, -)
  [ -n "$cases" ] || exit 0
fi

# ---------------------------------------------------------------- processes we own
W=$work/run.$$
data=$work/data
[ "$quick" = 1 ] && data=$work/data-quick   # so a smoke test does not replace the full data
mkdir -p "$W" "$W/out" "$data"
LOG=$W/bench.log
: > "$LOG"
RAW=$W/raw.tsv
: > "$RAW"
FANOUT_PIDS=$W/fanout.pids
: > "$FANOUT_PIDS"
declare -A pids=()   # pid -> what it runs: every background process this script started
own() { pids[$1]=$2; }     # own PID NAME
forget() { unset "pids[$1]"; }

# kill_ours PID NAME: stops PID if it is still one of ours (alive, and its command line
# mentions NAME, so a recycled pid is left alone).
kill_ours() {
  local pid=$1 name=$2 cmd i st
  [ -r "/proc/$pid/cmdline" ] || return 0
  cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 0
  [ -n "$cmd" ] && [[ "$cmd" == *"$name"* ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do
    st=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) || return 0
    [ "$st" = Z ] && return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? p
  trap - EXIT INT TERM
  if [ -s "$FANOUT_PIDS" ]; then
    while read -r p; do kill_ours "$p" "$fanout_name"; done < "$FANOUT_PIDS" || true
  fi
  for p in "${!pids[@]}"; do kill_ours "$p" "${pids[$p]}" || true; done
  for p in "${!pids[@]}"; do wait "$p" 2>/dev/null || true; done
  scratch_drop
  rm -rf "$W/out" "$data/up" "$W/sleep.fifo"
  if [ "$clean" = 1 ]; then rm -rf "$data"; fi
  if [ $rc -ne 0 ]; then
    log "exit $rc; log: $LOG"
    tail -n 20 "$LOG" >&2 || true
  fi
  exit $rc
}
fanout_name=fsc
trap cleanup EXIT
trap 'exit 130' INT TERM

# A fork-free sleep for polling loops: read with a timeout from a FIFO nobody writes.
mkfifo "$W/sleep.fifo"
exec {sleep_fd}<>"$W/sleep.fifo"
nap() { read -r -t "$1" -u "$sleep_fd" _ || true; }

# ---------------------------------------------------------------- data
randfile() { # randfile PATH BYTES SEED
  if command -v openssl >/dev/null 2>&1; then
    openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:fsbench-$3" < /dev/zero 2>/dev/null \
      | head -c "$2" > "$1" || true
  else
    head -c "$2" /dev/urandom > "$1"
  fi
  [ "$(stat -c %s "$1")" = "$2" ] || die "could not write $2 bytes to $1"
}

make_data() {
  local i d per
  if [ "$(stat -c %s "$data/big.bin" 2>/dev/null || echo 0)" != "$big" ]; then
    log "making $big_h random file"
    randfile "$data/big.bin" "$big" big
  fi
  per=$((small_n / small_dirs))
  if [ ! -e "$data/.small-complete-$small_n" ]; then
    log "making $small_n x $small_size-byte files in $small_dirs directories"
    rm -rf "$data/small" "$data"/.small-complete-*
    for ((i = 0; i < small_dirs; i++)); do
      d=$(printf '%s/small/d%02d' "$data" "$i")
      mkdir -p "$d"
      head -c $((per * small_size)) /dev/urandom | (cd "$d" && split -b "$small_size" -d -a 5 - f)
    done
    [ "$(find "$data/small" -type f | wc -l)" = "$small_n" ] || die "small files: wrong count"
    touch "$data/.small-complete-$small_n"
  fi
  if has_case d && [ ! -e "$data/.tiny-complete-$tiny_n" ]; then
    log "making $tiny_n x $tiny_size-byte files, flat and in $small_dirs directories"
    rm -rf "$data/tiny-flat" "$data/tiny-dirs" "$data"/.tiny-complete-*
    mkdir -p "$data/tiny-flat"
    head -c $((tiny_n * tiny_size)) /dev/urandom | (cd "$data/tiny-flat" && split -b "$tiny_size" -d -a 6 - f)
    for ((i = 0; i < small_dirs; i++)); do
      d=$(printf '%s/tiny-dirs/d%02d' "$data" "$i")
      mkdir -p "$d"
      head -c $((tiny_n / small_dirs * tiny_size)) /dev/urandom | (cd "$d" && split -b "$tiny_size" -d -a 6 - f)
    done
    [ "$(find "$data/tiny-flat" -type f | wc -l)" = "$tiny_n" ] || die "tiny-flat: wrong count"
    [ "$(find "$data/tiny-dirs" -type f | wc -l)" = "$tiny_n" ] || die "tiny-dirs: wrong count"
    touch "$data/.tiny-complete-$tiny_n"
  fi
  if has_case g || has_case p; then
    mkdir -p "$data/g"
    for ((i = 0; i < g_n; i++)); do
      f=$(printf '%s/g/f%03d' "$data" "$i")
      if [ "$(stat -c %s "$f" 2>/dev/null || echo 0)" != "$g_size" ]; then
        [ "$i" = 0 ] || [ -e "$W/g.msg" ] || { log "making $g_n x $g_h files"; touch "$W/g.msg"; }
        randfile "$f" "$g_size" "g$i"
      fi
    done
    : > "$W/g.list"
    for ((i = 0; i < g_n; i++)); do printf 'g/f%03d\n' "$i" >> "$W/g.list"; done
  fi
  rm -rf "$data/up" "$data/.fsd-state"
  mkdir -p "$data/up"
}

# Page cache on this VM is evicted after ~30 s idle: re-read sources right before each run.
warm_big() { cat "$data/big.bin" > /dev/null; }
warm_small() { find "$data/${1:-small}" -type f -exec cat {} + > /dev/null; }
warm_g() { (cd "$data" && xargs cat < "$W/g.list" > /dev/null); }

# ---------------------------------------------------------------- ports and servers
declare -A used_ports=()
scan_ports() {
  local f loc p
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    while read -r _ loc _; do
      p=${loc##*:}
      if [[ $p =~ ^[0-9A-Fa-f]{4}$ ]]; then used_ports[$((16#$p))]=1; fi
    done < "$f"
  done
  return 0
}
pick_port() { # sets PORT to a free loopback port
  local p tries
  scan_ports
  p=$((20000 + RANDOM % 20000))
  for ((tries = 0; tries < 1000; tries++)); do
    if [ -z "${used_ports[$p]:-}" ]; then used_ports[$p]=1; PORT=$p; return 0; fi
    p=$((p + 1))
  done
  die "no free port"
}
port_listening() { # port_listening PORT
  local hex st loc f
  printf -v hex '%04X' "$1"
  for f in /proc/net/tcp /proc/net/tcp6; do
    [ -r "$f" ] || continue
    while read -r _ loc _ st _; do
      if [ "${loc##*:}" = "$hex" ] && [ "$st" = 0A ]; then return 0; fi
    done < "$f"
  done
  return 1
}
wait_port() { # wait_port PORT PID WHAT
  local i
  for ((i = 0; i < 200; i++)); do
    port_listening "$1" && return 0
    [ -e "/proc/$2" ] || die "$3 exited; see $LOG"
    nap 0.05
  done
  die "$3 did not listen on $1"
}

declare -A srv_pids=()
export FSC_TOKEN="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

# launch_fsd ROOT LOG: starts an fsd serving ROOT; sets LAUNCHED_PID and LAUNCHED_ADDR.
launch_fsd() {
  local root=$1 flog=$2 i pid addr=
  : > "$flog"
  "$fsd_bin" --root "$root" --listen 127.0.0.1:0 --token "$FSC_TOKEN" 2>> "$flog" &
  pid=$!
  own "$pid" "$fsd_bin"
  for ((i = 0; i < 200; i++)); do
    addr=$(sed -n 's/^fsd: listening on \([^,]*\),.*/\1/p' "$flog")
    [ -n "$addr" ] && break
    [ -e "/proc/$pid" ] || { cat "$flog" >&2; die "fsd exited"; }
    nap 0.05
  done
  [ -n "$addr" ] || die "fsd did not print its address"
  LAUNCHED_PID=$pid LAUNCHED_ADDR=$addr
}
stop_ours() { # stop_ours PID NAME: stops one of our background processes and reaps it
  kill_ours "$1" "$2"
  wait "$1" 2>/dev/null || true
  forget "$1"
}

start_fsd() {
  launch_fsd "$data" "$W/fsd.log"
  fsd_pid=$LAUNCHED_PID fsd_addr=$LAUNCHED_ADDR
  srv_pids[fsd]=$fsd_pid
}

# A fresh fsd per case: its peak RSS then belongs to that case. What the previous one still held
# (malloc arenas of blocking threads, caches) is logged to fsd-retained.tsv for the report.
restart_fsd() { # restart_fsd CASE-THAT-ENDED
  local k v _u rss=0 thr=0
  if [ -n "${fsd_pid:-}" ] && [ -e "/proc/$fsd_pid" ]; then
    while read -r k v _u; do
      case $k in VmRSS:) rss=$v ;; Threads:) thr=$v ;; esac
    done < "/proc/$fsd_pid/status"
    printf '%s\t%s\t%s\n' "$1" "$rss" "$thr" >> "$W/fsd-retained.tsv"
    stop_ours "$fsd_pid" "$fsd_bin"
  fi
  start_fsd
}

start_nginx() {
  local w
  pick_port; nginx_port=$PORT
  mkdir -p "$W/nginx/tmp"
  cat > "$W/nginx/nginx.conf" <<EOF
daemon off;
user root;
worker_processes 2;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_timeout 5;
  default_type application/octet-stream;
  client_body_temp_path $W/nginx/tmp/body;
  proxy_temp_path $W/nginx/tmp/proxy;
  server {
    listen 127.0.0.1:$nginx_port;
    root $data;
    location / { }
  }
}
EOF
  nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log" 2>> "$LOG" &
  nginx_pid=$!
  own "$nginx_pid" nginx
  wait_port "$nginx_port" "$nginx_pid" nginx
  nap 0.2
  w=$(pgrep -P "$nginx_pid" | tr '\n' ' ')
  [ -n "$w" ] || die "nginx has no workers"
  srv_pids[nginx]="$nginx_pid $w"
}

start_iperf3() {
  pick_port; iperf_port=$PORT
  iperf3 -s -B 127.0.0.1 -p "$iperf_port" > /dev/null 2>> "$LOG" &
  iperf_pid=$!
  own "$iperf_pid" iperf3
  wait_port "$iperf_port" "$iperf_pid" iperf3
  srv_pids[iperf3]=$iperf_pid
}

setup_rsyncd() {
  pick_port; rsync_port=$PORT
  cat > "$W/rsyncd.conf" <<EOF
pid file = $W/rsyncd.pid
log file = $W/rsyncd.log
use chroot = no
[data]
  path = $data
  read only = no
  uid = root
  gid = root
[scratch]
  path = $scratch_mnt
  read only = no
  uid = root
  gid = root
EOF
}
# The rsync daemon forks per connection and its children are gone by the time we look, so it
# runs per measured run under /usr/bin/time, which sees the children's CPU and peak RSS.
rsyncd_start() {
  local i
  rm -f "$W/rsyncd.pid" "$W/rsyncd.time"
  /usr/bin/time -o "$W/rsyncd.time" -f '%e %U %S %M' \
    rsync --daemon --no-detach --config="$W/rsyncd.conf" --address=127.0.0.1 --port="$rsync_port" \
    2>> "$LOG" &
  rsyncd_time_pid=$!
  own "$rsyncd_time_pid" rsync
  wait_port "$rsync_port" "$rsyncd_time_pid" "rsync daemon"
  for ((i = 0; i < 100; i++)); do [ -s "$W/rsyncd.pid" ] && break; nap 0.02; done
  rsyncd_pid=$(cat "$W/rsyncd.pid" 2>/dev/null || pgrep -P "$rsyncd_time_pid" | head -n1)
}
rsyncd_stop() {
  local i
  for ((i = 0; i < 500; i++)); do  # let the per-connection children finish and be reaped
    pgrep -P "$rsyncd_pid" > /dev/null || break
    nap 0.01
  done
  kill_ours "$rsyncd_pid" rsync
  wait "$rsyncd_time_pid" 2>/dev/null || true
  forget "$rsyncd_time_pid"
}

# ---------------------------------------------------------------- measuring
clk_tck=$(getconf CLK_TCK)
machine_busy() { # REPLY = busy ticks of all CPUs so far (user, nice, system, irq, softirq)
  local us ni sy irq sirq
  read -r _ us ni sy _ _ irq sirq _ < /proc/stat
  REPLY=$((us + ni + sy + irq + sirq))
}
proc_ticks() { # REPLY = utime+stime+cutime+cstime of PID, in ticks
  local s a
  REPLY=0
  read -r s < "/proc/$1/stat" 2>/dev/null || return 0
  s=${s##*) }
  read -r -a a <<< "$s"
  REPLY=$((a[11] + a[12] + a[13] + a[14]))
}
proc_hwm() { # REPLY = VmHWM of PID in kB
  local k v _u
  REPLY=0
  while read -r k v _u; do
    [ "$k" = "VmHWM:" ] && { REPLY=$v; return 0; }
  done < "/proc/$1/status" 2>/dev/null || true
}
to_ms() { # to_ms 1.23 -> REPLY=1230
  local s=$1 i f
  i=${s%%.*}; f=
  [[ $s == *.* ]] && f=${s#*.}
  f=${f}000; f=${f:0:3}
  REPLY=$((10#${i:-0} * 1000 + 10#$f))
}

srv_begin() {
  local p
  s_t0=0
  case $1 in
    none) ;;
    rsync) rsyncd_start ;;
    *) for p in ${srv_pids[$1]}; do
         echo 5 > "/proc/$p/clear_refs" 2>/dev/null || true
         proc_ticks "$p"; s_t0=$((s_t0 + REPLY))
       done ;;
  esac
}
srv_end() {
  local p t1=0 hwm=0 a
  m_scpu_ms=0; m_srss_kb=0
  case $1 in
    none) ;;
    rsync)
      rsyncd_stop
      mapfile -t a < "$W/rsyncd.time"
      read -r _ u s m <<< "${a[-1]}"
      to_ms "$u"; m_scpu_ms=$REPLY; to_ms "$s"; m_scpu_ms=$((m_scpu_ms + REPLY)); m_srss_kb=$m ;;
    *) for p in ${srv_pids[$1]}; do
         proc_ticks "$p"; t1=$((t1 + REPLY))
         proc_hwm "$p"; [ "$REPLY" -gt "$hwm" ] && hwm=$REPLY
       done
       m_scpu_ms=$(((t1 - s_t0) * 1000 / clk_tck)); m_srss_kb=$hwm ;;
  esac
}

# measure SERVER STDOUT CMD...: one timed run. Sets m_ok m_wall_us m_ccpu_ms m_crss_kb m_scpu_ms m_srss_kb.
measure() {
  local srv=$1 out=$2 rc=0 t0 t1 a u s m b0 b1
  shift 2
  srv_begin "$srv"
  machine_busy; b0=$REPLY
  t0=$EPOCHREALTIME
  /usr/bin/time -o "$W/time.out" -f '%U %S %M' "$@" > "$out" 2>> "$LOG" || rc=$?
  t1=$EPOCHREALTIME
  machine_busy; b1=$REPLY
  srv_end "$srv"
  m_wall_us=$((${t1/./} - ${t0/./}))
  mapfile -t a < "$W/time.out"
  read -r u s m <<< "${a[-1]}"
  to_ms "$u"; m_ccpu_ms=$REPLY; to_ms "$s"; m_ccpu_ms=$((m_ccpu_ms + REPLY)); m_crss_kb=$m
  # CPU the rest of the machine used meanwhile (other users, kernel threads): noise indicator.
  m_other_ms=$(((b1 - b0) * 1000 / clk_tck - m_ccpu_ms - m_scpu_ms))
  [ "$m_other_ms" -ge 0 ] || m_other_ms=0
  m_ok=1
  if [ "$rc" -ne 0 ]; then
    m_ok=0
    log "  FAILED (exit $rc): $*"
    tail -n 5 "$LOG" >&2
  fi
  return 0
}

# record CASE LABEL TOOL RUN BYTES FILES [EXTRA]: run 0 is the warm-up and is not recorded.
record() {
  local c=$1 label=$2 tool=$3 run=$4 bytes=$5 files=$6 extra=${7:-}
  if [ "$run" -eq 0 ]; then
    log "  $c warm-up $tool: $(fmt_us "$m_wall_us") s${extra:+ $extra}"
    return 0
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$label" "$tool" "$run" \
    "$m_ok" "$m_wall_us" "$m_ccpu_ms" "$m_crss_kb" "$m_scpu_ms" "$m_srss_kb" "$bytes" "$files" \
    "$extra" "$m_other_ms" >> "$RAW"
  log "  $c run $run/$runs $tool: $(fmt_us "$m_wall_us") s, client $m_ccpu_ms ms cpu $((m_crss_kb / 1024)) MiB, server $m_scpu_ms ms cpu $((m_srss_kb / 1024)) MiB${extra:+, $extra}"
}
fmt_us() { printf '%d.%03d' $(($1 / 1000000)) $((($1 / 1000) % 1000)); }

# rotate RUN TOOL...: prints the tools rotated by RUN (alternates who goes first).
rotate() {
  local r=$1 n i
  shift
  n=$#
  local t=("$@")
  for ((i = 0; i < n; i++)); do printf '%s\n' "${t[$(((i + r) % n))]}"; done
}

# A file system of its own for each small-file run. ext4 creates files slowly for a while after
# many were deleted (recently freed inodes: 100,000 files cost the first tool after a deletion
# 2-5x the CPU of the next), so in one shared file system whichever tool follows a deletion
# pays for it. Case d writes each run into an ext4 made for that run (a loop-mounted image in
# the workdir, inode tables written at mkfs so no lazy init runs meanwhile) when it can: root,
# mkfs.ext4 and a loop device. Otherwise into fresh directories, said in the log and report.
scratch_mnt=$W/scratch
scratch_img=$W/scratch.img
scratch_why="not run"
scratch_new() { # scratch_new: a new, empty file system at $scratch_mnt (returns 1 if it cannot)
  scratch_drop
  mkdir -p "$scratch_mnt"
  truncate -s 4G "$scratch_img" &&
    mkfs.ext4 -q -F -N 400000 -E lazy_itable_init=0,lazy_journal_init=0 "$scratch_img" 2>> "$LOG" &&
    mount -o loop "$scratch_img" "$scratch_mnt" 2>> "$LOG"
}
scratch_drop() {
  if mountpoint -q "$scratch_mnt" 2>/dev/null; then umount "$scratch_mnt" || umount -l "$scratch_mnt"; fi
  rm -f "$scratch_img"
}
scratch_probe() { # sets scratch_why to why case d cannot have file systems of its own, or empty
  scratch_why=
  if [ "$(id -u)" != 0 ]; then scratch_why="not root"
  elif ! command -v mkfs.ext4 > /dev/null; then scratch_why="no mkfs.ext4"
  elif ! scratch_new; then scratch_why="mkfs or loop mount failed (see the log)"
  fi
  scratch_drop
  [ -z "$scratch_why" ] || log "case d: fresh directories, not file systems of their own: $scratch_why"
}

fresh() { # fresh NAME: a new empty directory under out/
  FRESH=$W/out/$1
  rm -rf "$FRESH"
  mkdir -p "$FRESH"
}
done_with() { rm -rf "$@"; sync; }

check_file() { # check_file PATH: in warm-ups, the download must be byte-identical
  cmp -s "$data/big.bin" "$1" || die "$1 differs from the source"
}

fsc() { "$fsc_bin" "$@"; }
nurl() { printf 'http://127.0.0.1:%s/%s' "$nginx_port" "$1"; }
rurl() { printf 'rsync://127.0.0.1:%s/data/%s' "$rsync_port" "$1"; }

# ---------------------------------------------------------------- cases
case_a() {
  local label="$big_h download → file" r t
  log "case a: $label"
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc rsync curl); do
      warm_big; fresh "a-$t-$r"
      case $t in
        fsc) measure fsd /dev/null "$fsc_bin" -q download "$fsd_addr" big.bin "$FRESH/big.bin"
             record a "$label" fsc "$r" "$big" 1 ;;
        rsync) measure rsync /dev/null rsync --whole-file "$(rurl big.bin)" "$FRESH/big.bin"
             record a "$label" "rsync daemon" "$r" "$big" 1 ;;
        curl) measure nginx /dev/null curl -fsS -o "$FRESH/big.bin" "$(nurl big.bin)"
             record a "$label" "nginx+curl" "$r" "$big" 1 ;;
      esac
      [ "$r" -gt 0 ] || check_file "$FRESH/big.bin"
      done_with "$FRESH"
    done
  done
}

case_b() {
  local label="$big_h download → /dev/null" r t
  log "case b: $label"
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc curl iperf3); do
      warm_big
      case $t in
        fsc) measure fsd /dev/null "$fsc_bin" -q download "$fsd_addr" big.bin -
             record b "$label" fsc "$r" "$big" 1 ;;
        curl) measure nginx /dev/null curl -fsS "$(nurl big.bin)"
             record b "$label" "nginx+curl" "$r" "$big" 1 ;;
        iperf3) measure iperf3 /dev/null iperf3 -c 127.0.0.1 -p "$iperf_port" -R -n "$big"
             record b "$label" "iperf3 -R (ceiling)" "$r" "$big" 1 ;;
      esac
    done
  done
}

case_c() {
  local label="$big_h upload" r t
  log "case c: $label"
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc rsync); do
      warm_big
      case $t in
        fsc) measure fsd /dev/null "$fsc_bin" -q upload "$fsd_addr" "$data/big.bin" "up/c-fsc-$r.bin"
             record c "$label" fsc "$r" "$big" 1
             [ "$r" -gt 0 ] || check_file "$data/up/c-fsc-$r.bin"
             done_with "$data/up/c-fsc-$r.bin" ;;
        rsync) measure rsync /dev/null rsync --whole-file "$data/big.bin" "$(rurl "up/c-rsync-$r.bin")"
             record c "$label" "rsync push" "$r" "$big" 1
             [ "$r" -gt 0 ] || check_file "$data/up/c-rsync-$r.bin"
             done_with "$data/up/c-rsync-$r.bin" ;;
      esac
    done
  done
}

count_files() { # count_files DIR EXPECTED
  local n
  n=$(find "$1" -type f | wc -l)
  [ "$n" = "$2" ] || die "$1 has $n files, expected $2"
}

# Recursive download and upload of a small-file tree under $data: TREE N SIZE say which one.
# tar is the local floor: the same tree copied through a pipe, no network, no sync. With
# SCRATCH=1 (case d, when scratch_probe found no reason against it) each run writes into a new
# file system: downloads into it, uploads to an fsd and an rsync module rooted in it.
small_down() { # small_down CASE LABEL TOOL RUN JOBS [TREE N SIZE [SUFFIX]]
  local c=$1 label=$2 tool=$3 r=$4 j=$5 tree=${6:-small} n=${7:-$small_n} size=${8:-$small_size}
  local dst
  if [ "${SCRATCH:-0}" = 1 ]; then
    scratch_new || die "could not make a scratch file system"
    dst=$scratch_mnt/tree
  else
    fresh "$c-down-$tree-$tool-$j-$r"; dst=$FRESH/tree
  fi
  warm_small "$tree"
  case $tool in
    fsc) measure fsd /dev/null "$fsc_bin" -q download -r -j "$j" "$fsd_addr" "$tree" "$dst"
         record "$c" "$label" "fsc${9:-}" "$r" $((n * size)) "$n" ;;
    rsync) measure rsync /dev/null rsync -r --whole-file "$(rurl "$tree/")" "$dst/"
         record "$c" "$label" rsync "$r" $((n * size)) "$n" ;;
    tar) mkdir -p "$dst"
         measure none /dev/null bash -c 'tar -C "$1" -cf - . | tar -C "$2" -xf -' tar "$data/$tree" "$dst"
         record "$c" "$label" "tar | tar" "$r" $((n * size)) "$n" ;;
  esac
  [ "$r" -gt 0 ] || count_files "$dst" "$n"
  # Without scratch file systems each run writes to a fresh directory; all are deleted at the
  # end of the case.
  [ "${SCRATCH:-0}" = 0 ] || scratch_drop
}
small_up() { # small_up CASE LABEL TOOL RUN JOBS [TREE N SIZE [SUFFIX]]
  local c=$1 label=$2 tool=$3 r=$4 j=$5 tree=${6:-small} n=${7:-$small_n} size=${8:-$small_size}
  local addr=$fsd_addr module=data dst=up/$c-$tree-$tool-$j-$r top=$data srv=fsd
  if [ "${SCRATCH:-0}" = 1 ]; then
    scratch_new || die "could not make a scratch file system"
    module=scratch dst=tree top=$scratch_mnt
    if [ "$tool" = fsc ]; then
      launch_fsd "$scratch_mnt" "$W/fsd-scratch.log"
      addr=$LAUNCHED_ADDR srv=fsd-scratch srv_pids[fsd-scratch]=$LAUNCHED_PID
    fi
  fi
  warm_small "$tree"
  case $tool in
    fsc) measure "$srv" /dev/null "$fsc_bin" -q upload -r -j "$j" "$addr" "$data/$tree" "$dst"
         record "$c" "$label" "fsc${9:-}" "$r" $((n * size)) "$n" ;;
    rsync) measure rsync /dev/null rsync -r --whole-file "$data/$tree/" \
             "rsync://127.0.0.1:$rsync_port/$module/$dst/"
         record "$c" "$label" rsync "$r" $((n * size)) "$n" ;;
    tar) mkdir -p "$top/$dst"
         measure none /dev/null bash -c 'tar -C "$1" -cf - . | tar -C "$2" -xf -' tar "$data/$tree" "$top/$dst"
         record "$c" "$label" "tar | tar" "$r" $((n * size)) "$n" ;;
  esac
  [ "$r" -gt 0 ] || count_files "$top/$dst" "$n"
  if [ "${SCRATCH:-0}" = 1 ]; then
    if [ "$tool" = fsc ]; then
      stop_ours "${srv_pids[fsd-scratch]}" "$fsd_bin"
      unset "srv_pids[fsd-scratch]"
    fi
    scratch_drop
  fi
}

case_d() {
  local r t tree n size what ld lu
  scratch_probe
  local SCRATCH=0
  [ -n "$scratch_why" ] || SCRATCH=1
  for tree in small tiny-flat tiny-dirs; do
    case $tree in
      small) n=$small_n size=$small_size what="$small_n × 4 KiB ($small_dirs dirs)" ;;
      tiny-flat) n=$tiny_n size=$tiny_size what="$tiny_n × 1 KiB (flat)" ;;
      tiny-dirs) n=$tiny_n size=$tiny_size what="$tiny_n × 1 KiB ($small_dirs dirs)" ;;
    esac
    ld="$what download -r" lu="$what upload -r"
    log "case d: $ld / $lu"
    for ((r = 0; r <= runs; r++)); do
      for t in $(rotate "$r" fsc rsync tar); do small_down d "$ld" "$t" "$r" 1 "$tree" "$n" "$size"; done
      for t in $(rotate "$r" fsc rsync tar); do small_up d "$lu" "$t" "$r" 1 "$tree" "$n" "$size"; done
    done
    # Fresh directories per run, removed per tree: 100,000-file trees are slow to delete late.
    done_with "$W/out/"d-* "$data/up/"d-*
  done
}

# case s: a re-run over a destination that already holds everything: the small tree and the
# big file, each downloaded and uploaded. One untimed full copy per tool first; every timed run
# (warm-up included) must move nothing and leave the copy as it was.
case_s() {
  local r t d u ld="re-run, $small_n × 4 KiB download -r unchanged" lu="re-run, $small_n × 4 KiB upload -r unchanged"
  local bd="re-run, $big_h download unchanged" bu="re-run, $big_h upload unchanged"
  log "case s: $ld / $lu / $bd / $bu"
  fresh s-fsc; d[0]=$FRESH
  fresh s-rsync; d[1]=$FRESH
  "$fsc_bin" -q download -r "$fsd_addr" small "${d[0]}/tree"
  "$fsc_bin" -q download "$fsd_addr" big.bin "${d[0]}/big.bin"
  "$fsc_bin" -q upload -r "$fsd_addr" "$data/small" up/s-fsc
  "$fsc_bin" -q upload "$fsd_addr" "$data/big.bin" up/s-fsc.bin
  rsyncd_start
  rsync -rt "$(rurl small/)" "${d[1]}/tree/"
  rsync -t "$(rurl big.bin)" "${d[1]}/big.bin"
  rsync -rt "$data/small/" "$(rurl up/s-rsync/)"
  rsync -t "$data/big.bin" "$(rurl up/s-rsync.bin)"
  rsyncd_stop
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc rsync); do
      warm_small
      case $t in
        fsc)
          measure fsd /dev/null "$fsc_bin" -q download -r "$fsd_addr" small "${d[0]}/tree"
          record s "$ld" fsc "$r" $((small_n * small_size)) "$small_n"
          measure fsd /dev/null "$fsc_bin" -q upload -r "$fsd_addr" "$data/small" up/s-fsc
          record s "$lu" fsc "$r" $((small_n * small_size)) "$small_n"
          measure fsd /dev/null "$fsc_bin" -q download "$fsd_addr" big.bin "${d[0]}/big.bin"
          record s "$bd" fsc "$r" "$big" 1
          measure fsd /dev/null "$fsc_bin" -q upload "$fsd_addr" "$data/big.bin" up/s-fsc.bin
          record s "$bu" fsc "$r" "$big" 1 ;;
        rsync)
          measure rsync /dev/null rsync -rt "$(rurl small/)" "${d[1]}/tree/"
          record s "$ld" rsync "$r" $((small_n * small_size)) "$small_n"
          measure rsync /dev/null rsync -rt "$data/small/" "$(rurl up/s-rsync/)"
          record s "$lu" rsync "$r" $((small_n * small_size)) "$small_n"
          measure rsync /dev/null rsync -t "$(rurl big.bin)" "${d[1]}/big.bin"
          record s "$bd" rsync "$r" "$big" 1
          measure rsync /dev/null rsync -t "$data/big.bin" "$(rurl up/s-rsync.bin)"
          record s "$bu" rsync "$r" "$big" 1 ;;
      esac
    done
  done
  # fsc's re-runs moved no file data (its NDJSON has no done event, one unchanged per file).
  local n
  for args in "download -r $fsd_addr small ${d[0]}/tree" "upload -r $fsd_addr $data/small up/s-fsc" \
      "download $fsd_addr big.bin ${d[0]}/big.bin" "upload $fsd_addr $data/big.bin up/s-fsc.bin"; do
    # shellcheck disable=SC2086 # word splitting of the argument list is intended
    n=$("$fsc_bin" --json $args | grep -c '"event":"done"' || true)
    [ "$n" = 0 ] || die "fsc $args: a re-run moved $n file(s)"
  done
  for u in 0 1; do count_files "${d[$u]}/tree" "$small_n"; done
  check_file "${d[0]}/big.bin"
  check_file "${d[1]}/big.bin"
  done_with "$W/out/"s-* "$data/up/"s-*
  changed_tree_runs
  delta_runs
}

# The small tree with 1 % of its files changed (new contents, same size, new mtime), to a
# destination holding the old tree, both ways (issue 16): fsc (quick check, then the changed
# files) against rsync -rt. The destination is reset to the old tree before each timed run
# (untimed); the changed tree is a copy beside the original, so other cases keep theirs.
changed_tree_runs() {
  local r t i f n=0 ld="$small_n × 4 KiB, 1 % changed, download -r" lu="$small_n × 4 KiB, 1 % changed, upload -r"
  local new=$data/small-1pct dst
  log "case s: $ld / $lu"
  rm -rf "$new"; cp -a "$data/small" "$new"
  while IFS= read -r f; do
    n=$((n + 1))
    [ $((n % 100)) = 0 ] || continue
    head -c "$small_size" /dev/urandom > "$f"
  done < <(find "$new" -type f | sort)
  reset_tree() { rm -rf "$1"; cp -a "$data/small" "$1"; sync; }
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc rsync); do
      dst=$W/out/s-1pct-$t
      reset_tree "$dst"; warm_small
      case $t in
        fsc) measure fsd /dev/null "$fsc_bin" -q download -r "$fsd_addr" small-1pct "$dst" ;;
        rsync) measure rsync /dev/null rsync -rt "$(rurl small-1pct/)" "$dst/" ;;
      esac
      record s "$ld" "$t" "$r" $((small_n * small_size / 100)) $((small_n / 100))
      diff -rq "$new" "$dst" > /dev/null || die "$dst differs from small-1pct"
      dst=$data/up/s-1pct-$t
      reset_tree "$dst"; warm_small
      case $t in
        fsc) measure fsd /dev/null "$fsc_bin" -q upload -r "$fsd_addr" "$new" "up/s-1pct-$t" ;;
        rsync) measure rsync /dev/null rsync -rt "$new/" "$(rurl "up/s-1pct-$t/")" ;;
      esac
      record s "$lu" "$t" "$r" $((small_n * small_size / 100)) $((small_n / 100))
      diff -rq "$new" "$dst" > /dev/null || die "$dst differs from small-1pct"
    done
  done
  done_with "$W/out/"s-1pct-* "$data/up/"s-1pct-* "$new"
}

# The big file with 16 scattered 4 KiB changes, to a destination holding the old version, both
# ways (issue 16): fsc's chunk delta (download: old chunks kept by the server's BLAKE3 chaining
# values; upload: SEED) against rsync's delta algorithm (rsync daemon, -t). Before each timed
# run the destination is reset to the old version with an old mtime (untimed). Bytes on the
# wire: fsc's `transferred` (file data sent), rsync's --stats total bytes received (download) or
# sent (upload), protocol included.
delta_runs() {
  local r t i off ld="$big_h with 16 × 4 KiB changed, download" lu="$big_h with 16 × 4 KiB changed, upload"
  local new=$data/delta.bin old_remote out wire
  log "case s: $ld / $lu"
  cp "$data/big.bin" "$new"
  for ((i = 0; i < 16; i++)); do
    off=$(((i * big / 16 + 12345 * (i + 1)) / 4096 * 4096))
    head -c 4096 /dev/urandom | dd of="$new" bs=4096 seek=$((off / 4096)) conv=notrunc status=none
  done
  mkdir -p "$data/up"
  reset_old() { cp "$data/big.bin" "$1"; touch -d @1000000000 "$1"; sync; }
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc rsync); do
      out=$W/out/s-delta-$t.bin
      old_remote=$data/up/s-delta-$t.bin
      reset_old "$out"; cat "$new" > /dev/null
      case $t in
        fsc) measure fsd "$W/delta.out" "$fsc_bin" --json download "$fsd_addr" delta.bin "$out"
             wire=$(sed -n 's/.*"event":"done".*"transferred":\([0-9]*\).*/\1/p' "$W/delta.out" | head -n1) ;;
        rsync) measure rsync "$W/delta.out" rsync -t --stats "$(rurl delta.bin)" "$out"
               wire=$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$W/delta.out" | tr -d ,) ;;
      esac
      record s "$ld" "$t" "$r" "$big" 1 "wire=${wire:-?}"
      cmp -s "$new" "$out" || die "$out differs from delta.bin"
      reset_old "$old_remote"; cat "$new" > /dev/null
      case $t in
        fsc) measure fsd "$W/delta.out" "$fsc_bin" --json upload "$fsd_addr" "$new" "up/s-delta-$t.bin"
             wire=$(sed -n 's/.*"event":"done".*"transferred":\([0-9]*\).*/\1/p' "$W/delta.out" | head -n1) ;;
        rsync) measure rsync "$W/delta.out" rsync -t --stats "$new" "$(rurl "up/s-delta-$t.bin")"
               wire=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$W/delta.out" | tr -d ,) ;;
      esac
      record s "$lu" "$t" "$r" "$big" 1 "wire=${wire:-?}"
      cmp -s "$new" "$old_remote" || die "$old_remote differs from delta.bin"
    done
  done
  done_with "$W/out/"s-delta-* "$data/up/"s-delta-* "$new"
}

case_e() {
  local r j lf="$big_h download → file" ln="$big_h download → /dev/null" lu="$big_h upload"
  local sd="$small_n × 4 KiB download -r" su="$small_n × 4 KiB upload -r"
  log "case e: -j 1/2/4"
  for ((r = 0; r <= runs; r++)); do
    for j in $(rotate "$r" 1 2 4); do
      warm_big; fresh "e-$j-$r"
      measure fsd /dev/null "$fsc_bin" -q download -j "$j" "$fsd_addr" big.bin "$FRESH/big.bin"
      record e "$lf" "fsc -j $j" "$r" "$big" 1
      [ "$r" -gt 0 ] || check_file "$FRESH/big.bin"
      done_with "$FRESH"
    done
    for j in $(rotate "$r" 1 2 4); do
      warm_big
      measure fsd /dev/null "$fsc_bin" -q download -j "$j" "$fsd_addr" big.bin -
      record e "$ln" "fsc -j $j" "$r" "$big" 1
    done
    for j in $(rotate "$r" 1 2 4); do
      warm_big
      measure fsd /dev/null "$fsc_bin" -q upload -j "$j" "$fsd_addr" "$data/big.bin" "up/e-$j-$r.bin"
      record e "$lu" "fsc -j $j" "$r" "$big" 1
      done_with "$data/up/e-$j-$r.bin"
    done
    for j in $(rotate "$r" 1 4); do small_down e "$sd" fsc "$r" "$j" small "$small_n" "$small_size" " -j $j"; done
    for j in $(rotate "$r" 1 4); do small_up e "$su" fsc "$r" "$j" small "$small_n" "$small_size" " -j $j"; done
  done
  done_with "$W/out/"e-* "$data/up/"e-*
}

# kill_at_half VICTIM WATCHED BASE: polls /proc/WATCHED/io until WATCHED has written half of
# the big file (wchar - BASE), then stops VICTIM (SIGSTOP: its in-flight writes complete, so
# the count is exact), reads the count again into `held`, and kills VICTIM with SIGKILL.
io_wchar() { # REPLY = wchar of PID
  local k v
  REPLY=0
  while read -r k v; do
    if [ "$k" = "wchar:" ]; then REPLY=$v; break; fi
  done < "/proc/$1/io" 2>/dev/null || true
}
kill_at_half() {
  local victim=$1 watched=$2 base=$3 i st t running
  held=0
  for ((i = 0; i < 60000; i++)); do  # 1 ms naps: at most ~60 s
    io_wchar "$watched"
    held=$((REPLY - base))
    [ "$held" -ge $((big / 2)) ] && break
    [ -e "/proc/$victim" ] || break
    nap 0.001
  done
  kill -STOP "$victim" 2>/dev/null || true
  for ((i = 0; i < 1000; i++)); do  # every thread, not just the main one, must have stopped
    running=0
    for t in /proc/"$victim"/task/*/stat; do
      read -r _ _ st _ < "$t" 2>/dev/null || continue
      [ "$st" = T ] || [ "$st" = t ] || running=1
    done
    [ "$running" = 0 ] && break
    nap 0.001
  done
  io_wchar "$watched"
  held=$((REPLY - base))
  kill -KILL "$victim" 2>/dev/null || true
  wait "$victim" 2>/dev/null || true
  forget "$victim"
}
json_num() { # json_num FILE EVENT FIELD: FIELD of the last EVENT line of an NDJSON file
  grep "\"event\":\"$2\"" "$1" | tail -n1 | sed -n "s/.*\"$3\":\([0-9]*\).*/\1/p"
}

case_f() {
  local r pid base ev resumed transferred lost ld="resume download at 50%" lu="resume upload at 50%"
  log "case f: $ld / $lu"
  for ((r = 0; r <= runs; r++)); do
    # Reference: the same download without an interruption.
    warm_big; fresh "f-full-$r"
    measure fsd /dev/null "$fsc_bin" -q download "$fsd_addr" big.bin "$FRESH/big.bin"
    record f "$ld" "fsc uninterrupted" "$r" "$big" 1
    done_with "$FRESH"

    warm_big; fresh "f-resume-$r"
    ev=$W/out/f-ev-$r
    "$fsc_bin" --json download "$fsd_addr" big.bin "$FRESH/big.bin" > "$ev.1" 2>> "$LOG" &
    pid=$!; own "$pid" fsc
    kill_at_half "$pid" "$pid" 0
    [ -e "$FRESH/big.bin" ] && die "download finished before it could be interrupted"
    measure fsd "$ev.2" "$fsc_bin" --json download "$fsd_addr" big.bin "$FRESH/big.bin"
    resumed=$(json_num "$ev.2" start resumed); transferred=$(json_num "$ev.2" "done" transferred)
    lost=$((held - ${resumed:-0}))
    record f "$ld" "fsc resume" "$r" "$big" 1 \
      "killed_at=$held resumed=${resumed:-?} transferred=${transferred:-?} lost=$lost"
    [ "$r" -gt 0 ] || check_file "$FRESH/big.bin"
    done_with "$FRESH" "$ev".*

    # Upload: kill fsc once fsd has written half of the file.
    warm_big
    measure fsd /dev/null "$fsc_bin" -q upload "$fsd_addr" "$data/big.bin" "up/f-full-$r.bin"
    record f "$lu" "fsc uninterrupted" "$r" "$big" 1
    done_with "$data/up/f-full-$r.bin"

    warm_big
    ev=$W/out/f-uev-$r
    io_wchar "$fsd_pid"; base=$REPLY
    "$fsc_bin" --json upload "$fsd_addr" "$data/big.bin" "up/f-$r.bin" > "$ev.1" 2>> "$LOG" &
    pid=$!; own "$pid" fsc
    kill_at_half "$pid" "$fsd_pid" "$base"
    # fsd also stores what was already in its socket: held = data the server has on disk for
    # this upload (its data file is sparse: allocated blocks are written chunks).
    nap 0.5
    held=$(find "$data/.fsd-state/uploads" -name '*.data' -printf '%b\n' 2>/dev/null \
             | awk '{s += $1 * 512} END {printf "%d", s}')
    measure fsd "$ev.2" "$fsc_bin" --json upload "$fsd_addr" "$data/big.bin" "up/f-$r.bin"
    resumed=$(json_num "$ev.2" start resumed); transferred=$(json_num "$ev.2" "done" transferred)
    lost=$((held - ${resumed:-0}))
    record f "$lu" "fsc resume" "$r" "$big" 1 \
      "killed_at=$held resumed=${resumed:-?} transferred=${transferred:-?} lost=$lost"
    [ "$r" -gt 0 ] || check_file "$data/up/f-$r.bin"
    done_with "$data/up/f-$r.bin" "$ev".*
  done
}

case_g() {
  local label="$g_n × $g_h concurrent → /dev/null" r t
  log "case g: $label"
  for ((r = 0; r <= runs; r++)); do
    for t in $(rotate "$r" fsc curl); do
      warm_g
      case $t in
        fsc) fanout_name=fsc
             measure fsd /dev/null bash "$here/bench/fanout.sh" "$FANOUT_PIDS" "$W/g.list" \
               "$fsc_bin" -q download "$fsd_addr" @F@ -
             record g "$label" "fsc ×$g_n" "$r" $((g_n * g_size)) "$g_n"
             [ "$r" -gt 0 ] || g_first="$m_srss_kb $m_scpu_ms" ;;
        curl) fanout_name=curl
             measure nginx /dev/null bash "$here/bench/fanout.sh" "$FANOUT_PIDS" "$W/g.list" \
               curl -fsS "http://127.0.0.1:$nginx_port/@F@"
             record g "$label" "nginx+curl ×$g_n" "$r" $((g_n * g_size)) "$g_n" ;;
      esac
      : > "$FANOUT_PIDS"
    done
    # The warm-up made fsd compute 100 manifests at once (first request of each file); the
    # timed runs use a fresh fsd that loads them from its state directory, as a server that
    # has seen the files before does.
    [ "$r" -gt 0 ] || restart_fsd "g warm-up (100 manifests computed at once)"
  done
}

# perf profiles: fsd attached by pid; the client (unless CLIENT=0) run under perf record.
profile_one() { # profile_one NAME CLIENT CMD...
  local name=$1 client=$2 ppid side sides=fsd slug
  shift 2
  slug=${name//[^A-Za-z0-9]/_}
  mkdir -p "$W/perf"
  perf record -q -e cpu-clock -g -p "$fsd_pid" -o "$W/perf/fsd-$slug.data" > /dev/null 2>> "$LOG" &
  ppid=$!; own "$ppid" perf
  nap 0.5
  if [ "$client" = 1 ]; then
    sides="fsd fsc"
    perf record -q -e cpu-clock -g -o "$W/perf/fsc-$slug.data" -- "$@" > /dev/null 2>> "$LOG" \
      || log "profile $name: command failed"
  else
    "$@" > /dev/null 2>> "$LOG" || log "profile $name: command failed"
  fi
  kill -INT "$ppid" 2>/dev/null || true
  wait "$ppid" 2>/dev/null || true
  forget "$ppid"
  for side in $sides; do
    {
      echo "#### $side — $name (perf record -e cpu-clock -g; self time, top symbols)"
      echo
      echo '```'
      { perf report -i "$W/perf/$side-$slug.data" --no-children -g none --sort dso,sym --stdio \
          --percent-limit 1.5 2>/dev/null || echo "(no profile)"; } | grep -v '^#' | grep -v '^$' | head -n 18 || true
      echo '```'
      echo
    } >> "$W/profiles.md"
  done
}
case_t() { # TLS: fsc over TLS 1.3 vs scp (aes128-gcm) from a private sshd; see bench/tls.sh
  log "case t: $big_h download over TLS vs scp"
  FSD_BIN=$fsd_bin FSC_BIN=$fsc_bin BENCH_TLS_WORKDIR=$work/tls \
    bash "$here/bench/tls.sh" "$runs" $((big >> 20)) > "$W/tls.md"
}

case_p() {
  log "case p: perf profiles"
  : > "$W/profiles.md"
  # Untimed first pass: fsd computes and caches its manifests, as the other cases' warm-ups do.
  "$fsc_bin" -q download "$fsd_addr" big.bin - > /dev/null
  fresh p-prime
  "$fsc_bin" -q download -r "$fsd_addr" small "$FRESH/t"
  done_with "$FRESH"
  bash "$here/bench/fanout.sh" "$FANOUT_PIDS" "$W/g.list" "$fsc_bin" -q download "$fsd_addr" @F@ - > /dev/null
  : > "$FANOUT_PIDS"
  warm_big; fresh p-file
  profile_one "download $big_h → file" 1 "$fsc_bin" -q download "$fsd_addr" big.bin "$FRESH/big.bin"
  done_with "$FRESH"
  warm_big
  profile_one "download $big_h → stdout" 1 "$fsc_bin" -q download "$fsd_addr" big.bin -
  warm_big
  profile_one "upload $big_h" 1 "$fsc_bin" -q upload "$fsd_addr" "$data/big.bin" up/p.bin
  done_with "$data/up/p.bin"
  warm_small; fresh p-small
  profile_one "download -r $small_n small files" 1 "$fsc_bin" -q download -r "$fsd_addr" small "$FRESH/t"
  warm_small
  profile_one "upload -r $small_n small files" 1 "$fsc_bin" -q upload -r "$fsd_addr" "$data/small" up/p-small
  done_with "$FRESH" "$data/up/p-small"
  warm_g
  profile_one "$g_n concurrent downloads of $g_h → /dev/null" 0 \
    bash "$here/bench/fanout.sh" "$FANOUT_PIDS" "$W/g.list" "$fsc_bin" -q download "$fsd_addr" @F@ -
  : > "$FANOUT_PIDS"
}

# ---------------------------------------------------------------- main
started=$(date -u '+%Y-%m-%d %H:%M UTC')
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
make_data
start_fsd
if has_case a || has_case b || has_case g; then start_nginx; fi
if has_case b; then start_iperf3; fi
if has_case a || has_case c || has_case d || has_case s; then setup_rsyncd; fi
log "fsd $fsd_addr (pid $fsd_pid)${nginx_port:+, nginx :$nginx_port}${iperf_port:+, iperf3 :$iperf_port}${rsync_port:+, rsyncd :$rsync_port}; $runs run(s) per case"

prev=
for c in a b c d e f g s t p; do
  has_case "$c" || continue
  [ -z "$prev" ] || restart_fsd "$prev"
  "case_$c"
  prev=$c
done
[ -z "$prev" ] || restart_fsd "$prev"

# ---------------------------------------------------------------- report
SUM=$W/summary.tsv
table=$(awk -v sumfile="$SUM" -f "$here/bench/summary.awk" "$RAW")

med() { # med CASE LABEL TOOL FIELD -> median (µs for wall, ms for cpu, kB for rss)
  awk -F'\t' -v c="$1" -v l="$2" -v t="$3" -v f="$4" \
    'BEGIN{col["wall"]=6;col["ccpu"]=7;col["crss"]=8;col["scpu"]=9;col["srss"]=10}
     $1==c && $2==l && $3==t {print $(col[f]); exit}' "$SUM"
}
verdict() { # verdict LABEL VALUE OP LIMIT
  awk -v l="$1" -v v="$2" -v op="$3" -v lim="$4" 'BEGIN{
    if (v == "" || v < 0) { printf "| %s | — | %s %s | not measured |\n", l, op, lim; exit }
    ok = (op == "≤") ? (v <= lim) : (v >= lim)
    printf "| %s | %.2f | %s %s | %s |\n", l, v, op, lim, ok ? "met" : "MISSED" }'
}
ratio() { # ratio A B -> A/B
  awk -v a="$1" -v b="$2" 'BEGIN{ if (a == "" || b == "" || a <= 0 || b <= 0) print -1; else printf "%.4f", a / b }'
}
targets() {
  local a f r c u
  echo "| target | value | limit | result |"
  echo "|---|---|---|---|"
  if has_case a; then
    a="$big_h download → file"; f=$(med a "$a" fsc wall)
    verdict "(a) fsc ÷ rsync daemon, to a file" "$(ratio "$f" "$(med a "$a" "rsync daemon" wall)")" "≤" 0.8
    verdict "(a) fsc ÷ nginx+curl, to a file" "$(ratio "$f" "$(med a "$a" nginx+curl wall)")" "≤" 0.5
  fi
  if has_case b; then
    a="$big_h download → /dev/null"; f=$(med b "$a" fsc wall)
    verdict "(b) fsc ÷ nginx+curl, to /dev/null" "$(ratio "$f" "$(med b "$a" nginx+curl wall)")" "≤" 1.0
    verdict "(b) fsc rate ÷ iperf3 rate" "$(ratio "$(med b "$a" "iperf3 -R (ceiling)" wall)" "$f")" "≥" 0.7
  fi
  if has_case c; then
    a="$big_h upload"
    verdict "(c) fsc ÷ rsync push, upload" "$(ratio "$(med c "$a" fsc wall)" "$(med c "$a" "rsync push" wall)")" "≤" 1.0
  fi
  if has_case d; then
    local what
    for what in "$small_n × 4 KiB ($small_dirs dirs)" "$tiny_n × 1 KiB (flat)" "$tiny_n × 1 KiB ($small_dirs dirs)"; do
      for a in "$what download -r" "$what upload -r"; do
        verdict "(d) fsc ÷ rsync, $a" "$(ratio "$(med d "$a" fsc wall)" "$(med d "$a" rsync wall)")" "≤" 0.5
      done
    done
  fi
  if has_case f; then
    local lost lanes
    # "One chunk per stream": fsc keeps LANES reads (download: 4) or writes (upload: 8) in
    # flight per connection (client/src/download.rs, upload.rs); fsd's chunk is 1 MiB here.
    for a in "resume download at 50%" "resume upload at 50%"; do
      lanes=4; [[ $a == *upload* ]] && lanes=8
      lost=$(awk -F'\t' -v l="$a" '$1=="f" && $2==l && $3=="fsc resume" {
               n = split($13, kv, " "); for (i = 1; i <= n; i++) if (kv[i] ~ /^lost=/) { v = substr(kv[i], 6) + 0; if (v > m) m = v }
             } END { printf "%d", m }' "$RAW")
      verdict "(f) $a: most bytes lost, in 1 MiB chunks" "$(awk -v l="$lost" 'BEGIN{printf "%.2f", l / 1048576}')" "≤" "$lanes"
    done
  fi
  if has_case g; then
    a="$g_n × $g_h concurrent → /dev/null"
    local gib fs ns
    gib=$(awk -v b=$((g_n * g_size)) 'BEGIN{printf "%.4f", b / 1073741824}')
    fs=$(med g "$a" "fsc ×$g_n" scpu); ns=$(med g "$a" "nginx+curl ×$g_n" scpu)
    verdict "(g) fsd peak RSS, MiB (manifests cached)" "$(awk -v k="$(med g "$a" "fsc ×$g_n" srss)" 'BEGIN{printf "%.1f", k / 1024}')" "≤" 64
    [ -z "${g_first:-}" ] || verdict "(g) fsd peak RSS, MiB, first request of the 100 files (warm-up)" \
      "$(awk -v k="${g_first% *}" 'BEGIN{printf "%.1f", k / 1024}')" "≤" 64
    verdict "(g) fsd CPU s per GiB served" "$(awk -v m="$fs" -v g="$gib" 'BEGIN{printf "%.3f", m / 1000 / g}')" "≤" \
      "$(awk -v m="$ns" -v g="$gib" 'BEGIN{printf "%.3f", m / 1000 / g}') (nginx)"
  fi
}

resume_detail() {
  awk -F'\t' '$1=="f" && $3=="fsc resume" {
    printf "| %s | %s | %.3f | %s |\n", $2, $4, $6 / 1e6, $13 }' "$RAW"
}

report=$W/report.md
{
  echo "## Results ($started)"
  echo
  echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM."
  echo "fsd/fsc: $("$fsc_bin" --version 2>/dev/null | head -n1), $rev."
  echo "Anchors: $(nginx -v 2>&1 | sed 's/.*: //'), rsync $(rsync --version | head -n1 | awk '{print $3}'), $(iperf3 --version | head -n1 | awk '{print "iperf3 "$2}'), curl $(curl --version | head -n1 | awk '{print $2}')."
  echo "Load average (1/5/15 min) at the start: $load_start; at the end: $(cut -d' ' -f1-3 /proc/loadavg). The last column is the CPU the rest of the machine used during each run (median; busy time from /proc/stat minus both sides): ksoftirqd and kworkers doing part of the transfer's work, and other users' noise."
  echo "Command: \`scripts/bench.sh$( [ "$quick" = 1 ] && echo " --quick") --cases $cases --runs $runs\`; medians of $runs run(s) after one warm-up."
  if has_case d; then
    if [ -z "$scratch_why" ]; then echo "Case d: every run wrote into an ext4 file system made for it (loop image, mkfs'ed just before)."
    else echo "Case d: every run wrote into a fresh directory of the workdir's file system ($scratch_why); its figures depend on what was deleted before each run."; fi
  fi
  echo
  echo "$table"
  echo
  echo "### Targets"
  echo
  targets
  if has_case f; then
    echo
    echo "### Resume runs"
    echo
    echo "Bytes. Download: killed_at = what fsc had written to its part file when it was stopped (SIGSTOP, then SIGKILL); upload: what fsd had stored for the upload after the kill. resumed = what the re-run found present and kept (its start event), transferred = what it moved (its done event), lost = killed_at - resumed."
    echo
    echo "| case | run | resume s | detail |"
    echo "|---|---|---|---|"
    resume_detail
  fi
  if [ -s "$W/fsd-retained.tsv" ]; then
    echo
    echo "### fsd memory still held at the end of each case (fsd is restarted between cases)"
    echo
    echo "| case | VmRSS MiB | threads |"
    echo "|---|---|---|"
    awk -F'\t' '{printf "| %s | %.1f | %s |\n", $1, $2 / 1024, $3}' "$W/fsd-retained.tsv"
  fi
  if has_case t && [ -s "$W/tls.md" ]; then
    echo
    echo "### (t) $big_h download over TLS: fsc (TLS 1.3, copy path) vs scp -c aes128-gcm@openssh.com, plain fsc for reference"
    echo
    cat "$W/tls.md"
  fi
  if has_case p && [ -s "$W/profiles.md" ]; then
    echo
    echo "### Profiles"
    echo
    cat "$W/profiles.md"
  fi
} > "$report"
cat "$report"
[ -z "$results_out" ] || cp "$report" "$results_out"
log "raw results: $RAW; report: $report; log: $LOG"
