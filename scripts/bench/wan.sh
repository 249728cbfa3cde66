#!/usr/bin/env bash
# Case w of scripts/bench.sh: a long, lossy link (issue 15). fsc against curl, aria2c -x8 and
# iperf3 -P8 over an emulated 1 Gbit/s path with 50 ms RTT, a 6.25 MB drop-tail queue (one BDP)
# and random loss on the data direction, under each namespace-wide congestion control.
#
#   FSD_BIN=target/release/fsd FSC_BIN=target/release/fsc scripts/bench/wan.sh
#   RUNS=1 LOSSES="0 0.001" CCS=cubic TOOLS="fsc fsc-up" FSC_ARGS="--congestion system" scripts/bench/wan.sh
#
# This kernel has no sch_netem, so the link is the user-space emulator `wanem` (default source
# /work/shared/wan/wanem, built here; WANEM=binary to use another), brought up by
# scripts/wanlink.sh (the same link tests/lossy_link.rs uses) between two network namespaces
# (fswan_s: servers, 10.78.0.1; fswan_c: clients, 10.78.0.2), once per direction of loss. All
# traffic stays inside them; they are removed on exit. Each namespace gets the congestion
# control under test as its default, and the usual buffer limits (tcp_wmem max 4 MiB, tcp_rmem
# max 32 MiB, set by wanlink.sh). Child namespaces may pick only congestion controls listed in
# the global net.ipv4.tcp_allowed_congestion_control: cubic is added for the run and the list
# restored.
#
# Per congestion control and loss: curl (one connection) and aria2c -x8 from nginx, iperf3 -P8
# -R for 8 s, fsc download (default flags: -j auto) — then, with the loss moved to the client's
# sending direction, fsc upload and iperf3 -P8 (forward). 256 MiB (SIZE_MIB), to disk; MB/s =
# bytes that arrived / wall time. A client still running after MAX_SECS is stopped and its rate
# is a bound ("<"): bytes it wrote are not counted for fsc (its part file is preallocated).
# iperf3-n, iperf3-n-up (not in the default set): iperf3 -P8 -n SIZE, timed from its start like
# fsc — the best a transfer of this size can do on the link (iperf3 -t 8 leaves startup out).
#
# Background transfers (fsc --background, src/ledbat.rs), TOOLS tokens (not in the default set):
#   fsc-bg, fsc-bg-up   fsc --background alone (256 MiB, as fsc / fsc-up)
#   fg, fg-up           the foreground alone: iperf3 with FG_STREAMS streams (1) for FG_SECS
#                       (-R for downloads); one stream is held by its 4 MiB send buffer to
#                       ~63 MB/s, FG_STREAMS=4 fills the link
#   fg+bg, fg-up+bg     that stream and fsc --background (BG_SIZE_MIB) started together: the
#                       stream's MB/s, and fsc's MB/s over the same window (bytes written by
#                       fsc for downloads, by fsd for uploads, from /proc/PID/io) as TOOL:bg;
#                       fsc is stopped when the stream ends
#   fg+fsc, fg-up+fsc   the same with plain fsc: what the foreground keeps without --background
#   RUNS=3 LOSSES=0 CCS="bbr cubic" TOOLS="fsc fsc-bg fg fg+bg fg+fsc fsc-up fsc-bg-up fg-up fg-up+bg fg-up+fsc" scripts/bench/wan.sh
#
# Needs root (namespaces, TUN, sysctls). Installs nginx-light, aria2, iperf3, curl, jq with
# apt-get when missing (NO_INSTALL=1 to refuse). Env: RUNS (2), LOSSES ("0 0.001 0.01"),
# CCS ("bbr cubic"), TOOLS (curl aria2c iperf3 fsc fsc-up iperf3-up), FSC_ARGS (extra fsc
# flags), SIZE_MIB (256), MAX_SECS (60), WORK (/var/tmp/fsbench-wan), RESULTS (Markdown out).
set -uo pipefail
export LC_ALL=C

RUNS=${RUNS:-2}
LOSSES=${LOSSES:-0 0.001 0.01}
CCS=${CCS:-bbr cubic}
TOOLS=${TOOLS:-curl aria2c iperf3 fsc fsc-up iperf3-up}
FSC_ARGS=${FSC_ARGS:-}
SIZE_MIB=${SIZE_MIB:-256}
BG_SIZE_MIB=${BG_SIZE_MIB:-1024} # background next to a foreground: must outlast FG_SECS
FG_SECS=${FG_SECS:-10}
FG_STREAMS=${FG_STREAMS:-1}
MAX_SECS=${MAX_SECS:-60}
WORK=${WORK:-/var/tmp/fsbench-wan}
FSD=${FSD_BIN:?set FSD_BIN}
FSC=${FSC_BIN:?set FSC_BIN}
WANEM_SRC=${WANEM_SRC:-/work/shared/wan/wanem}
LINK=fswan NS_S=fswan_s NS_C=fswan_c NET=10.78.0 SIP=10.78.0.1
WANLINK=$(cd "$(dirname "$0")/.." && pwd)/wanlink.sh
DELAY=25 RATE=1000 QUEUE=6250000 # ms each way (50 ms RTT), Mbit/s, bottleneck FIFO bytes
TOKEN=wan-bench-token-0123456789

log() { printf '[wan %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
want() { [[ " $TOOLS " == *" $1 "* ]]; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, TUN devices, sysctls)"

need=()
for c in nginx:nginx-light aria2c:aria2 iperf3:iperf3 curl:curl jq:jq; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  [ "${NO_INSTALL:-0}" = 1 ] && die "missing ${need[*]} and NO_INSTALL=1"
  log "installing ${need[*]} (apt-get; the packages' own services are kept from starting)"
  policy=/usr/sbin/policy-rc.d made=0
  [ -e $policy ] || { printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy && made=1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  rc=$?
  [ $made = 1 ] && rm -f $policy
  [ $rc = 0 ] || die "apt-get install ${need[*]} failed"
fi
if [ -z "${WANEM:-}" ]; then
  WANEM=$WORK/wanem-target/release/wanem
  [ -x "$WANEM" ] || cargo build -q --release --manifest-path "$WANEM_SRC/Cargo.toml" \
    --target-dir "$WORK/wanem-target" >&2 || die "cannot build wanem from $WANEM_SRC"
fi

mkdir -p "$WORK/data"
DATA=$WORK/data/rand_${SIZE_MIB}M.bin
[ -s "$DATA" ] || head -c $((SIZE_MIB << 20)) /dev/urandom > "$DATA"
SIZE=$(stat -c %s "$DATA")
BG_DATA=$WORK/data/rand_${BG_SIZE_MIB}M.bin
if [[ " $TOOLS " == *"+"* ]]; then
  [ -s "$BG_DATA" ] || head -c $((BG_SIZE_MIB << 20)) /dev/urandom > "$BG_DATA"
fi
W=$(mktemp -d "$WORK/run.XXXXXX")
RAW=$W/raw.tsv
ALLOWED_ORIG=$(cat /proc/sys/net/ipv4/tcp_allowed_congestion_control)
SPIDS=()

cleanup() {
  local p
  for p in "${SPIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${SPIDS[@]}"; do wait "$p" 2>/dev/null; done
  "$WANLINK" down $LINK
  echo "$ALLOWED_ORIG" > /proc/sys/net/ipv4/tcp_allowed_congestion_control
  rm -rf "$W/dl" "$W/up" "$W/fsd-state" # fsd-state: uploads stopped mid-way (run_fg)
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "$ALLOWED_ORIG cubic" > /proc/sys/net/ipv4/tcp_allowed_congestion_control

# link_up CC LOSS_S2C LOSS_C2S: the namespaces and the emulated link (scripts/wanlink.sh), with
# congestion control CC as both namespaces' default.
link_up() {
  WANEM=$WANEM "$WANLINK" up $LINK $NET "$2" "$3" $DELAY $RATE $QUEUE > "$W/wanlink.out" 2>&1 \
    || die "wanlink.sh up: $(cat "$W/wanlink.out")"
  local ns
  for ns in $NS_S $NS_C; do ip netns exec $ns sysctl -qw net.ipv4.tcp_congestion_control="$1" || die "cc $1"; done
}
link_down() { "$WANLINK" down $LINK; }

mkdir -p "$W/nginx/tmp" "$W/up"
cat > "$W/nginx/nginx.conf" <<EOF
user root; worker_processes 1; daemon off; pid $W/nginx/nginx.pid; error_log $W/nginx/error.log warn;
events { worker_connections 256; }
http { access_log off; sendfile on; tcp_nopush on; default_type application/octet-stream;
  client_body_temp_path $W/nginx/tmp/b; proxy_temp_path $W/nginx/tmp/p; fastcgi_temp_path $W/nginx/tmp/f;
  uwsgi_temp_path $W/nginx/tmp/u; scgi_temp_path $W/nginx/tmp/s;
  server { listen $SIP:8080; root $WORK/data; } }
EOF
# Servers start after the link exists (they bind its address); started once per link below.
start_servers() {
  ip netns exec $NS_S nginx -p "$W/nginx" -c "$W/nginx/nginx.conf" -e "$W/nginx/error.log" & SPIDS+=($!)
  ip netns exec $NS_S iperf3 -s -B $SIP -p 5201 > "$W/iperf3.log" 2>&1 & SPIDS+=($!)
  ip netns exec $NS_S "$FSD" --root "$WORK/data" --listen $SIP:9000 --token $TOKEN \
    --state-dir "$W/fsd-state" > "$W/fsd.log" 2>&1 & SPIDS+=($!) FSD_PID=$!
  sleep 1
}
stop_servers() {
  local p
  for p in "${SPIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${SPIDS[@]}"; do wait "$p" 2>/dev/null; done
  SPIDS=()
}

now() { date +%s%N; }
rate() { awk -v b="$1" -v a="$2" -v c="$3" 'BEGIN{printf "%.1f", b/((c-a)/1e9)/1e6}'; }
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$RAW"; } # cc loss tool run MB/s

run_http() { # TOOL CC LOSS RUN
  local t0 t1 b url=http://$SIP:8080/$(basename "$DATA")
  rm -rf "$W/dl"; mkdir -p "$W/dl"; sync
  t0=$(now)
  if [ "$1" = curl ]; then
    ip netns exec $NS_C curl -s --max-time "$MAX_SECS" -o "$W/dl/f" "$url"
  else
    ip netns exec $NS_C timeout -k 5 "$MAX_SECS" aria2c -q -x8 -s8 -k1M --file-allocation=none \
      --disk-cache=0 --summary-interval=0 -d "$W/dl" -o f "$url"
  fi
  t1=$(now)
  # aria2c writes pieces out of order: count allocated bytes, not the apparent size.
  b=$(du -B1 --apparent-size "$W/dl/f" 2>/dev/null | cut -f1)
  [ "$1" = curl ] || b=$(du -B1 "$W/dl/f" 2>/dev/null | cut -f1)
  b=${b:-0}; [ "$b" -gt "$SIZE" ] && b=$SIZE
  local r; r=$(rate "$b" "$t0" "$t1"); [ "$b" -lt "$SIZE" ] && r="<$r"
  record "$2" "$3" "$1" "$4" "$r"
}

run_iperf() { # TOOL(iperf3|iperf3-up) CC LOSS RUN
  local dir=-R v; [ "$1" = iperf3-up ] && dir=
  ip netns exec $NS_C timeout 40 iperf3 -c $SIP -p 5201 $dir -t 8 -P 8 -J > "$W/ip.json" 2>/dev/null
  v=$(jq -r '.end.sum_received.bits_per_second // 0' "$W/ip.json" 2>/dev/null)
  record "$2" "$3" "$1" "$4" "$(awk -v b="${v:-0}" 'BEGIN{printf "%.1f", b/8e6}')"
}

# What the best transfer of this size can do here: iperf3 with 8 streams moving exactly SIZE
# bytes (-n counts all streams together), timed from its start like fsc (its control
# connection's round trips and every stream's startup included).
run_iperf_n() { # TOOL(iperf3-n|iperf3-n-up) CC LOSS RUN
  local dir=-R t0 t1 r; [ "$1" = iperf3-n-up ] && dir=
  t0=$(now)
  if ip netns exec $NS_C timeout 40 iperf3 -c $SIP -p 5201 $dir -n "$SIZE" -P 8 > /dev/null 2>&1; then
    t1=$(now); r=$(rate "$SIZE" "$t0" "$t1")
  else
    t1=$(now); r="<$(rate "$SIZE" "$t0" "$t1")"
  fi
  record "$2" "$3" "$1" "$4" "$r"
}

run_fsc() { # TOOL(fsc|fsc-up) CC LOSS RUN
  local t0 t1 ok=0 r bg=""
  case $1 in fsc-bg*) bg=--background ;; esac
  rm -rf "$W/dl"; mkdir -p "$W/dl"; rm -f "$WORK/data/up.bin"; sync
  cat "$DATA" > /dev/null
  t0=$(now)
  # shellcheck disable=SC2086 # FSC_ARGS is a list of flags
  if [ "$1" = fsc ] || [ "$1" = fsc-bg ]; then
    ip netns exec $NS_C timeout -k 5 "$MAX_SECS" env FSC_TOKEN=$TOKEN "$FSC" -q $bg download $FSC_ARGS \
      $SIP:9000 "$(basename "$DATA")" "$W/dl/f" > /dev/null 2> "$W/fsc.err" && ok=1
  else
    ip netns exec $NS_C timeout -k 5 "$MAX_SECS" env FSC_TOKEN=$TOKEN "$FSC" -q $bg upload $FSC_ARGS \
      $SIP:9000 "$DATA" up.bin > /dev/null 2> "$W/fsc.err" && ok=1
  fi
  t1=$(now)
  if [ $ok = 1 ]; then r=$(rate "$SIZE" "$t0" "$t1"); else
    r="<$(rate "$SIZE" "$t0" "$t1")"
    log "$1 run $4 ($2, loss $3) did not finish: $(tail -c 200 "$W/fsc.err" | tr '\n' ' ')"
  fi
  record "$2" "$3" "$1" "$4" "$r"
  rm -f "$WORK/data/up.bin"
}

wchar() { awk '/^wchar/ {print $2}' "/proc/$1/io" 2>/dev/null || echo 0; }

# A foreground iperf3 stream for FG_SECS, alone or with fsc (--background) started together.
run_fg() { # TOOL(fg|fg+bg|fg+fsc|fg-up|fg-up+bg|fg-up+fsc) CC LOSS RUN
  local dir=-R up=0 v fpid="" w0=0 w1 t0 t1 bg=""
  case $1 in fg-up*) dir= up=1 ;; esac
  case $1 in *+bg) bg=--background ;; esac
  rm -rf "$W/dl"; mkdir -p "$W/dl"; rm -f "$WORK/data/up.bin"; sync
  cat "$BG_DATA" > /dev/null
  if [[ $1 == *+* ]]; then
    [ $up = 1 ] && w0=$(wchar "$FSD_PID")
    # shellcheck disable=SC2086 # FSC_ARGS is a list of flags
    if [ $up = 0 ]; then
      ip netns exec $NS_C timeout -k 5 "$MAX_SECS" env FSC_TOKEN=$TOKEN "$FSC" -q $bg download $FSC_ARGS \
        $SIP:9000 "$(basename "$BG_DATA")" "$W/dl/f" > /dev/null 2> "$W/fsc.err" & fpid=$!
    else
      # A name of its own per run: an upload stopped mid-way must not be resumed by the next.
      ip netns exec $NS_C timeout -k 5 "$MAX_SECS" env FSC_TOKEN=$TOKEN "$FSC" -q $bg upload $FSC_ARGS \
        $SIP:9000 "$BG_DATA" "up-$1-$2-$3-$4.bin" > /dev/null 2> "$W/fsc.err" & fpid=$!
    fi
  fi
  t0=$(now)
  ip netns exec $NS_C timeout 40 iperf3 -c $SIP -p 5201 $dir -t "$FG_SECS" -P "$FG_STREAMS" -J > "$W/fg.json" 2>/dev/null
  t1=$(now)
  v=$(jq -r '.end.sum_received.bits_per_second // 0' "$W/fg.json" 2>/dev/null)
  record "$2" "$3" "$1" "$4" "$(awk -v b="${v:-0}" 'BEGIN{printf "%.1f", b/8e6}')"
  if [ -n "$fpid" ]; then
    if [ $up = 1 ]; then w1=$(wchar "$FSD_PID"); else
      w1=$(wchar "$(pgrep -P "$(pgrep -P $fpid | head -1)" | head -1)")
      [ "$w1" = 0 ] && w1=$(wchar "$(pgrep -P $fpid | head -1)")
    fi
    if ! kill -0 $fpid 2>/dev/null; then
      log "$1 run $4: fsc ended before the foreground"
      [ $up = 0 ] && w1=$(stat -c %s "$BG_DATA")
    fi
    kill $fpid 2>/dev/null; wait $fpid 2>/dev/null
    record "$2" "$3" "$1:bg" "$4" "$(rate $((w1 - w0)) "$t0" "$t1")"
  fi
  rm -f "$WORK/data/up.bin" "$WORK"/data/up-*.bin
}

log "runs=$RUNS losses=($LOSSES) ccs=($CCS) tools=($TOOLS) fsc args=($FSC_ARGS) ${SIZE_MIB} MiB; fg $FG_STREAMS stream(s) ${FG_SECS} s; work $W"
for cc in $CCS; do
  for loss in $LOSSES; do
    # Downloads: loss on the server's sending direction.
    link_up "$cc" "$loss" 0; start_servers
    for ((i = 1; i <= RUNS; i++)); do
      want curl && run_http curl "$cc" "$loss" $i
      want fsc && run_fsc fsc "$cc" "$loss" $i
      want fsc-bg && run_fsc fsc-bg "$cc" "$loss" $i
      for t in fg fg+bg fg+fsc; do want $t && run_fg $t "$cc" "$loss" $i; done
      want aria2c && run_http aria2c "$cc" "$loss" $i
      want iperf3 && run_iperf iperf3 "$cc" "$loss" $i
      want iperf3-n && run_iperf_n iperf3-n "$cc" "$loss" $i
    done
    stop_servers; link_down
    if want fsc-up || want iperf3-up || want iperf3-n-up || want fsc-bg-up || [[ " $TOOLS " == *" fg-up"* ]]; then
      link_up "$cc" 0 "$loss"; start_servers
      for ((i = 1; i <= RUNS; i++)); do
        want fsc-up && run_fsc fsc-up "$cc" "$loss" $i
        want fsc-bg-up && run_fsc fsc-bg-up "$cc" "$loss" $i
        for t in fg-up fg-up+bg fg-up+fsc; do want $t && run_fg $t "$cc" "$loss" $i; done
        want iperf3-up && run_iperf iperf3-up "$cc" "$loss" $i
        want iperf3-n-up && run_iperf_n iperf3-n-up "$cc" "$loss" $i
      done
      stop_servers; link_down
    fi
    log "cc=$cc loss=$loss: $(awk -F'\t' -v c="$cc" -v l="$loss" '$1==c && $2==l {printf "%s %s; ", $3, $5}' "$RAW")"
  done
done

COLS=""
for t in $TOOLS; do COLS="$COLS $t"; [[ $t == *+* ]] && COLS="$COLS $t:bg"; done
# Medians per (cc, loss, tool); a "<" run (stopped at MAX_SECS) sorts by its bound and keeps
# its mark.
{
  echo "| system cc | loss | $(for t in $COLS; do printf '%s | ' "$t"; done | sed 's/ | $//') |"
  echo "|---|---|$(for t in $COLS; do printf -- '---|'; done)"
  for cc in $CCS; do for loss in $LOSSES; do
    printf '| %s | %s %% |' "$cc" "$(awk -v l="$loss" 'BEGIN{print l*100}')"
    for t in $COLS; do
      awk -F'\t' -v c="$cc" -v l="$loss" -v t="$t" '$1==c && $2==l && $3==t {v=$5; m=(v ~ /^</); sub(/^</,"",v); a[++n]=v; mark[n]=m}
        END { if (!n) { printf " – |"; exit }
          for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { x=a[i]; a[i]=a[j]; a[j]=x; y=mark[i]; mark[i]=mark[j]; mark[j]=y }
          if (n % 2) { med=a[(n+1)/2]; mk=mark[(n+1)/2] } else { med=(a[n/2]+a[n/2+1])/2; mk=mark[n/2] || mark[n/2+1] }
          runs=""; for (i = 1; i <= n; i++) runs=runs (i>1?", ":"") (mark[i]?"<":"") a[i]
          printf " %s%.1f (%s) |", (mk?"<":""), med, runs }' "$RAW"
    done
    echo
  done; done
} | tee "$W/table.md"
[ -n "${RESULTS:-}" ] && cp "$W/table.md" "$RESULTS"
log "raw runs: $RAW"
