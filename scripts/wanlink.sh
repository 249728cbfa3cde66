#!/usr/bin/env bash
# An emulated long-distance link between two network namespaces, for tests and benchmarks.
#
#   scripts/wanlink.sh up NAME NET LOSS_S2C LOSS_C2S [DELAY_MS RATE_MBIT QUEUE_BYTES]
#   scripts/wanlink.sh down NAME
#
# `up` makes namespaces NAME_s (server, NET.1) and NAME_c (client, NET.2), e.g. NET=10.81.0,
# joined by the user-space emulator `wanem` (../shared/wan/wanem, or WANEM_SRC; built once
# into WANEM_TARGET, or WANEM=binary): DELAY_MS each way (25), RATE_MBIT bottleneck (1000), a
# drop-tail queue of QUEUE_BYTES (6250000: one BDP at 50 ms), random loss per direction. Each
# namespace gets the usual buffer limits (tcp_wmem max 4 MiB, tcp_rmem max 32 MiB) and BBR if
# the kernel has it. This kernel has no sch_netem, so `tc netem` is not an option. `down` stops
# the emulator and removes both namespaces (a left-over pair is removed by `up` too).
#
# Needs root, iproute2 and /dev/net/tun. When the link cannot be made here it prints the reason
# and exits 77 (tests print SKIPPED with it); other failures exit 1.
set -uo pipefail
export LC_ALL=C

HERE=$(cd "$(dirname "$0")" && pwd)
WANEM_SRC=${WANEM_SRC:-$HERE/../../shared/wan/wanem}
WANEM_TARGET=${WANEM_TARGET:-$HERE/../target/wanem}
RUN=/run/fswanlink

skip() { echo "$*"; exit 77; }
die() { echo "wanlink: $*" >&2; exit 1; }

down() {
  local name=$1 pid
  if [ -f "$RUN/$name.pid" ]; then
    pid=$(cat "$RUN/$name.pid")
    kill "$pid" 2>/dev/null && for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$RUN/$name.pid"
  fi
  ip netns del "${name}_s" 2>/dev/null
  ip netns del "${name}_c" 2>/dev/null
  return 0
}

up() {
  [ $# -ge 4 ] || die "usage: wanlink.sh up NAME NET LOSS_S2C LOSS_C2S [DELAY_MS RATE_MBIT QUEUE_BYTES]"
  local name=$1 net=$2 loss_s2c=$3 loss_c2s=$4 delay=${5:-25} rate=${6:-1000} queue=${7:-6250000}
  [ "$(id -u)" = 0 ] || skip "not root (network namespaces and TUN devices need it)"
  command -v ip >/dev/null || skip "ip (iproute2) missing"
  [ -c /dev/net/tun ] || skip "no /dev/net/tun"
  local wanem=${WANEM:-$WANEM_TARGET/release/wanem}
  if [ ! -x "$wanem" ]; then
    [ -f "$WANEM_SRC/Cargo.toml" ] || skip "no link emulator: $WANEM_SRC missing (../shared beside the repo)"
    cargo build -q --release --manifest-path "$WANEM_SRC/Cargo.toml" --target-dir "$WANEM_TARGET" >&2 \
      || die "cannot build wanem from $WANEM_SRC"
  fi
  down "$name"
  mkdir -p "$RUN"
  local s=${name}_s c=${name}_c ts=${name}S tc=${name}C
  ip netns add "$s" && ip netns add "$c" || skip "cannot create network namespaces"
  local ns cc=bbr
  grep -qw bbr /proc/sys/net/ipv4/tcp_available_congestion_control || cc=cubic
  for ns in "$s" "$c"; do
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_wmem="4096 16384 4194304" \
      net.ipv4.tcp_rmem="4096 131072 33554432" net.ipv4.tcp_congestion_control=$cc
  done
  local out=$RUN/$name.out
  # wanem's last argument bounds its life (seconds), should `down` never come.
  setsid "$wanem" "$ts" "$tc" "$delay" "$loss_s2c" "$loss_c2s" "$rate" "$queue" "${WANEM_MAX_SECS:-1800}" > "$out" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
  for _ in $(seq 1 50); do grep -q ready "$out" 2>/dev/null && break; sleep 0.1; done
  grep -q ready "$out" || { down "$name"; die "wanem did not start: $(cat "$out")"; }
  ip link set "$ts" netns "$s" && ip link set "$tc" netns "$c" || { down "$name"; die "cannot move the TUN devices"; }
  ip -n "$s" addr add "$net.1" peer "$net.2" dev "$ts"
  ip -n "$s" link set "$ts" mtu 1500 txqueuelen 10000 up
  ip -n "$c" addr add "$net.2" peer "$net.1" dev "$tc"
  ip -n "$c" link set "$tc" mtu 1500 txqueuelen 10000 up
  sleep 0.3 # both ends up (as ../shared/wan/wan.sh waits)
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) [ $# = 2 ] || die "usage: wanlink.sh down NAME"; down "$2" ;;
  *) die "usage: wanlink.sh up NAME NET LOSS_S2C LOSS_C2S [DELAY_MS RATE_MBIT QUEUE_BYTES] | down NAME" ;;
esac
