#!/usr/bin/env bash
# Compression on the wire (issue 18): fsc vs rsync -z (zstd) and curl --compressed from nginx
# (gzip on), on loopback and on an emulated long link (../shared/wan/wanem: two network
# namespaces joined by TUN devices; 1 Gbit/s, 50 ms RTT, 6.25 MB drop-tail queue, no loss).
#
#   scripts/bench_compress.sh [--runs N] [--size MiB] [--where loopback,wan]
#                             [--corpora log.txt,noise.bin] [--tools "fsc-auto rsync-z ..."] [--no-install]
#
# Corpora (generated once into $WORK, kept): log.txt, a synthetic web-server access log
# (scripts/gen_log.py: timestamps, addresses, paths, statuses, sizes, user agents from small
# vocabularies; about 5:1 with zstd -1, 7:1 with gzip -6), and noise.bin (urandom). For each
# corpus and place: fsc download with default flags (auto), -z (level 3), --compress=off, fsc
# upload auto and off, rsync -z pull and push, curl --compressed. Throughput = file bytes /
# wall time (effective MB/s; the link carries fewer bytes when compressed). fsd runs with
# --compress-cache 0 unless noted, so every run compresses afresh; a "cached" fsc row shows a
# file served again. Medians of N runs (default 3), runs alternate tools. Files are checked
# byte for byte after the first run of each tool.
#
# Needs root (namespaces, TUN, apt-get for rsync/nginx/curl). Stops only what it started; the
# namespaces it creates (fsz_s, fsz_c) are removed on exit.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
shared=$(cd "$repo/../shared" 2>/dev/null && pwd || true)

runs=3
size_mib=1024
where=loopback,wan
corpora=log.txt,noise.bin
tools="fsc-auto fsc-z3 fsc-off fsc-cached fsc-up-auto fsc-up-off rsync-z rsync-z-up curl-gz"
install=1
while [ $# -gt 0 ]; do
  case $1 in
    --runs) runs=$2; shift ;;
    --size) size_mib=$2; shift ;;
    --where) where=$2; shift ;;
    --corpora) corpora=$2; shift ;;
    --tools) tools=$2; shift ;;
    --no-install) install=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

WORK=${WORK:-/var/tmp/fsbench-z}
FSD=${FSD:-$repo/target/release/fsd}
FSC=${FSC:-$repo/target/release/fsc}
WANEM=${WANEM:-/tmp/wanem-target/release/wanem}
TOKEN=bench-compress-token-0123456789
NS_S=fsz_s NS_C=fsz_c SIP=10.79.0.1 CIP=10.79.0.2
log() { printf '[bench-z %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

if [ "$install" = 1 ]; then
  need=()
  for t in rsync nginx curl; do command -v $t >/dev/null || need+=("$t"); done
  if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
if [[ ,$where, == *,wan,* ]] && [ ! -x "$WANEM" ]; then
  [ -n "$shared" ] || { echo "../shared/wan not found: run with --where loopback" >&2; exit 1; }
  log "building the link emulator"
  cargo build --release --manifest-path "$shared/wan/wanem/Cargo.toml" --target-dir /tmp/wanem-target >&2
fi
[ -x "$FSD" ] && [ -x "$FSC" ] || (cd "$repo" && cargo build --release --bin fsd --bin fsc >&2)

mkdir -p "$WORK/data" "$WORK/out"
size=$((size_mib << 20))
if [ "$(stat -c %s "$WORK/data/log.txt" 2>/dev/null || echo 0)" != "$size" ]; then
  log "generating log.txt ($size_mib MiB)"
  python3 "$here/gen_log.py" "$size" > "$WORK/data/log.txt"
fi
if [ "$(stat -c %s "$WORK/data/noise.bin" 2>/dev/null || echo 0)" != "$size" ]; then
  head -c "$size" /dev/urandom > "$WORK/data/noise.bin"
fi
log "log.txt: zstd -1 $(zstd -1 -c "$WORK/data/log.txt" | wc -c) bytes, gzip -1 $(gzip -1 -c "$WORK/data/log.txt" | wc -c) bytes of $size"

declare -a PIDS=()
ALLOWED_ORIG=$(cat /proc/sys/net/ipv4/tcp_allowed_congestion_control)
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del $NS_S 2>/dev/null || true
  ip netns del $NS_C 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# in_s / in_c: run in the server / client namespace (nothing on loopback)
in_s() { if [ "$place" = wan ]; then ip netns exec $NS_S "$@"; else "$@"; fi; }
in_c() { if [ "$place" = wan ]; then ip netns exec $NS_C "$@"; else "$@"; fi; }
# bg_s: a server daemon in the server namespace, in the background; its pid goes to PIDS
bg_s() {
  if [ "$place" = wan ]; then ip netns exec $NS_S "$@" & else "$@" & fi
  PIDS+=($!)
}

start_place() {
  if [ "$place" = wan ]; then
    host=$SIP
    ip netns add $NS_S && ip netns add $NS_C
    ip -n $NS_S link set lo up
    ip -n $NS_C link set lo up
    "$WANEM" tzS tzC 25 0 0 1000 6250000 1800 > "$WORK/out/wanem.out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do grep -q ready "$WORK/out/wanem.out" && break; sleep 0.1; done
    ip link set tzS netns $NS_S && ip link set tzC netns $NS_C
    ip -n $NS_S addr add $SIP peer $CIP dev tzS
    ip -n $NS_S link set tzS mtu 1500 txqueuelen 10000 up
    ip -n $NS_C addr add $CIP peer $SIP dev tzC
    ip -n $NS_C link set tzC mtu 1500 txqueuelen 10000 up
    for ns in $NS_S $NS_C; do
      ip netns exec $ns sysctl -qw net.ipv4.tcp_congestion_control=bbr 2>/dev/null || true
      ip netns exec $ns sysctl -qw net.ipv4.tcp_wmem="4096 16384 33554432" net.ipv4.tcp_rmem="4096 131072 33554432"
    done
    sleep 0.3
  else
    host=127.0.0.1
  fi
  rm -rf "$WORK/state" "$WORK/state-c"
  bg_s "$FSD" --root "$WORK/data" --listen "$host:19300" --token "$TOKEN" \
    --state-dir "$WORK/state" --compress-cache 0 > "$WORK/out/fsd.log" 2>&1
  bg_s "$FSD" --root "$WORK/data" --listen "$host:19301" --token "$TOKEN" \
    --state-dir "$WORK/state-c" > "$WORK/out/fsd-cached.log" 2>&1
  cat > "$WORK/out/rsyncd.conf" <<EOF
use chroot = no
[data]
path = $WORK/data
read only = no
uid = root
gid = root
EOF
  bg_s rsync --daemon --no-detach --address "$host" --port 19302 --config "$WORK/out/rsyncd.conf"
  mkdir -p "$WORK/out/nginx/tmp"
  cat > "$WORK/out/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $WORK/out/nginx/nginx.pid; error_log $WORK/out/nginx/error.log warn;
events { worker_connections 64; }
http { access_log off; sendfile on; default_type application/octet-stream;
  gzip on; gzip_types *; gzip_comp_level 1; gzip_min_length 1000;
  client_body_temp_path $WORK/out/nginx/tmp/b; proxy_temp_path $WORK/out/nginx/tmp/p;
  fastcgi_temp_path $WORK/out/nginx/tmp/f; uwsgi_temp_path $WORK/out/nginx/tmp/u; scgi_temp_path $WORK/out/nginx/tmp/s;
  server { listen $host:19303; root $WORK/data; } }
EOF
  bg_s nginx -p "$WORK/out/nginx" -c "$WORK/out/nginx/nginx.conf" -e "$WORK/out/nginx/error.log"
  sleep 1
}

stop_place() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
  ip netns del $NS_S 2>/dev/null || true
  ip netns del $NS_C 2>/dev/null || true
}

# one TOOL FILE: one timed run; prints seconds. The copy lands in $WORK/dst (client side) or
# under the server's root (uploads: up/NAME).
one() {
  local tool=$1 f=$2 t0 t1
  rm -rf "$WORK/dst" "$WORK/data/up/$f"
  mkdir -p "$WORK/dst"
  sync
  t0=$(date +%s%N)
  case $tool in
    fsc-auto) in_c env FSC_TOKEN=$TOKEN "$FSC" -q download "$host:19300" "$f" "$WORK/dst/$f" ;;
    fsc-z3) in_c env FSC_TOKEN=$TOKEN "$FSC" -q download -z "$host:19300" "$f" "$WORK/dst/$f" ;;
    fsc-off) in_c env FSC_TOKEN=$TOKEN "$FSC" -q download --compress=off "$host:19300" "$f" "$WORK/dst/$f" ;;
    fsc-cached) in_c env FSC_TOKEN=$TOKEN "$FSC" -q download "$host:19301" "$f" "$WORK/dst/$f" ;;
    fsc-up-auto) in_c env FSC_TOKEN=$TOKEN "$FSC" -q upload "$host:19300" "$WORK/data/$f" "up/$f" ;;
    fsc-up-off) in_c env FSC_TOKEN=$TOKEN "$FSC" -q upload --compress=off "$host:19300" "$WORK/data/$f" "up/$f" ;;
    rsync-z) in_c rsync -z -q "rsync://$host:19302/data/$f" "$WORK/dst/$f" ;;
    rsync-z-up) in_c rsync -z -q "$WORK/data/$f" "rsync://$host:19302/data/up/$f" ;;
    curl-gz) in_c curl -s --compressed -o "$WORK/dst/$f" "http://$host:19303/$f" ;;
  esac
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000000))
}

check() {
  local tool=$1 f=$2 got
  case $tool in *up*) got=$WORK/data/up/$f ;; *) got=$WORK/dst/$f ;; esac
  cmp -s "$got" "$WORK/data/$f" || { log "FAIL: $tool $f: copy differs"; return 1; }
}

median() { sort -n | awk '{a[NR]=$1} END{print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

report="$WORK/out/report.md"
: > "$report"
for place in ${where//,/ }; do
  log "== $place"
  start_place
  mkdir -p "$WORK/data/up"
  for f in ${corpora//,/ }; do
    declare -A ms=()
    for t in $tools; do
      one "$t" "$f" > /dev/null # warm-up (page cache, manifests; the cached fsd fills its cache)
      check "$t" "$f"
    done
    for ((r = 0; r < runs; r++)); do
      for t in $tools; do
        v=$(one "$t" "$f")
        ms[$t]="${ms[$t]:-} $v"
        log "$place $f $t run $r: $v ms"
      done
    done
    {
      echo "### $place, $f ($size_mib MiB), medians of $runs"
      echo
      echo "| tool | ms (runs) | effective MB/s |"
      echo "|---|---|---|"
      for t in $tools; do
        m=$(printf '%s\n' ${ms[$t]} | median)
        echo "| $t | $m (${ms[$t]# }) | $(awk -v b="$size" -v m="$m" 'BEGIN{printf "%.1f", b/(m/1000)/1e6}') |"
      done
      echo
    } | tee -a "$report"
    unset ms
  done
  rm -rf "$WORK/data/up"
  stop_place
done
log "report: $report"
