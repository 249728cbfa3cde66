#!/usr/bin/env bash
# Issue 8's benchmark: 1 GiB download over TLS, fsc (TLS 1.3, rustls, copy path: no kTLS on this
# kernel) vs scp -c aes128-gcm@openssh.com from a private sshd on a loopback port, and plain fsc
# (sendfile) for reference. Runs alternate; prints medians and ratios. Installs openssh-server if
# missing (its packaged service is kept from starting). Stops only the processes it started.
#
#   scripts/bench/tls.sh [RUNS] [SIZE_MIB]        (defaults 5 and 1024)
set -euo pipefail
runs=${1:-5}
size_mib=${2:-1024}
top=$(cd "$(dirname "$0")/../.." && pwd)
work=${BENCH_TLS_WORKDIR:-/var/tmp/fsbench-tls}
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

if [ ! -x /usr/sbin/sshd ]; then
  echo "== installing openssh-server" >&2
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
fsd=${FSD_BIN:-$top/target/release/fsd}
fsc=${FSC_BIN:-$top/target/release/fsc}
[ -n "${FSD_BIN:-}" ] || (cd "$top" && cargo build -q --release --workspace --bins)

# Data, certificates, ssh keys: made once.
mkdir -p "$work/data" "$work/out"
[ -f "$work/data/big" ] && [ "$(stat -c %s "$work/data/big")" = $((size_mib << 20)) ] ||
  head -c $((size_mib << 20)) /dev/urandom > "$work/data/big"
if [ ! -f "$work/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 -subj /CN=bench-ca \
    -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\n' > "$work/san.ext"
  openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 30 -extfile "$work/san.ext" -out "$work/server.pem" 2>/dev/null
fi
[ -f "$work/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
[ -f "$work/user_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$work/user_key"
cp "$work/user_key.pub" "$work/authorized_keys"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
token=bench-tls-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
start_fsd() { # $1 = variable to set to the address, $2 = log, rest = extra args
  "$fsd" --root "$work/data" --listen 127.0.0.1:0 --token "$token" "${@:3}" > /dev/null 2> "$2" &
  pids+=($!)
  local a=
  for _ in $(seq 100); do
    a=$(sed -n 's/^fsd: listening on \([^,]*\),.*/\1/p' "$2"); [ -n "$a" ] && break
    sleep 0.05
  done
  [ -n "$a" ] || { echo "fsd did not start: $(cat "$2")" >&2; exit 1; }
  printf -v "$1" '%s' "$a"
}
start_fsd plain "$work/plain.log"
start_fsd tls "$work/tls.log" --tls-cert "$work/server.pem" --tls-key "$work/server.key"
sshport=$(port)
mkdir -p /run/sshd # sshd's privilege-separation directory (normally made by its service)
/usr/sbin/sshd -D -e -f /dev/null -p "$sshport" -o ListenAddress=127.0.0.1 -h "$work/host_key" \
  -o AuthorizedKeysFile="$work/authorized_keys" -o StrictModes=no -o PasswordAuthentication=no \
  -o PidFile=none -o "Subsystem=sftp internal-sftp" > /dev/null 2> "$work/sshd.log" &
pids+=($!)
sleep 0.5
ssh_opts=(-i "$work/user_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -P "$sshport")

run() { # $1 = tool; prints seconds
  rm -f "$work/out/big"; sync
  cat "$work/data/big" > /dev/null
  local t0=$EPOCHREALTIME
  case $1 in
    fsc-tls) FSC_TOKEN=$token "$fsc" -q download --ca "$work/ca.pem" "fss://$tls" big "$work/out/big" ;;
    fsc-plain) FSC_TOKEN=$token "$fsc" -q download "$plain" big "$work/out/big" ;;
    scp) scp -q -c aes128-gcm@openssh.com "${ssh_opts[@]}" "root@127.0.0.1:$work/data/big" "$work/out/big" ;;
  esac
  local t1=$EPOCHREALTIME
  cmp -s "$work/data/big" "$work/out/big" || { echo "$1: output differs" >&2; exit 1; }
  echo "$t0 $t1" | awk '{printf "%.3f\n", $2 - $1}'
}
for t in fsc-tls fsc-plain scp; do run "$t" > /dev/null; done # warm-up (manifest, ssh)
declare -A times
tools=(fsc-tls scp fsc-plain)
for i in $(seq "$runs"); do
  for j in 0 1 2; do
    t=${tools[$(( (i + j) % 3 ))]}
    times[$t]+="$(run "$t") "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "| tool | runs | median s | MB/s | ÷ scp |"
echo "|---|---|---|---|---|"
scp_m=$(echo "${times[scp]}" | median)
for t in fsc-tls scp fsc-plain; do
  m=$(echo "${times[$t]}" | median)
  awk -v t="$t" -v m="$m" -v s="$scp_m" -v n="$runs" -v b=$((size_mib << 20)) \
    'BEGIN {printf "| %s | %d | %.3f | %.0f | %.2f |\n", t, n, m, b / m / 1e6, m / s}'
done
