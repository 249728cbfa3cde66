#!/usr/bin/env bash
# Denial-of-service scenarios against a release fsd on loopback (examples/attack.rs), one fresh
# fsd per scenario, each while a legitimate client on 127.0.0.1 (attackers: 127.0.0.2 and up),
# a known user that logged in once before the attack, logs in every 500 ms and STATs in between,
# and a never-seen client on 127.1.0.1 tries to log in 1 s into the attack. Prints per scenario: fsd RSS before and at peak,
# peak open descriptors, what the attack achieved, the legitimate client's worst AUTH latency
# and STAT p50/p99, and its failures. docs/SECURITY.md quotes a run.
#
#   scripts/attack.sh                 # every scenario
#   scripts/attack.sh guess unread    # some of them
#
# Scenarios: flood (1,100 silent connections), bigframe (Hello + 16 MiB DATA before AUTH),
# guess / guess-rotating (wrong tokens from one address / 4,000 addresses, hanging up at once;
# ATTACK_THREADS senders, default 8: on this 2-CPU machine 32 starve fsd of CPU by themselves),
# unread (20 connections x 64 inline OPENs never read), handles (read handles until refused),
# uploads (64 GiB uploads with 64 KiB chunks until refused). fsd runs with two credentials
# (the legitimate one and the attacker's), --max-connections 1024 and RLIMIT_NOFILE 4096.

set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=(flood bigframe guess guess-rotating unread handles uploads)

cargo build --release --bin fsd --example attack 2>&1 | tail -1
fsd_bin=$top/target/release/fsd
attack_bin=$top/target/release/examples/attack

work=$(mktemp -d)
fsd_pid=
cleanup() {
    [ -n "$fsd_pid" ] && kill "$fsd_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/root"
head -c $((64 << 20)) /dev/urandom > "$work/root/big"
for i in $(seq 0 63); do head -c $((256 << 10)) /dev/urandom > "$work/root/i$i"; done
legit="legit-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
evil="evil-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf 'alice %s rw\nmallory %s rw\n' "$legit" "$evil" > "$work/tokens"
chmod 600 "$work/tokens"

echo "attack: $(nproc) CPUs, fsd $(git rev-parse --short HEAD), one fresh fsd per scenario"
for s in "${scenarios[@]}"; do
    rm -rf "$work/root/.fsd-state" "$work/fsd.log"
    # The scenario's fsd: its own limit on descriptors, as a modest server would have.
    prlimit --nofile=4096:4096 -- "$fsd_bin" --root "$work/root" --listen 127.0.0.1:0 \
        --token-file "$work/tokens" --metrics 127.0.0.1:0 2> "$work/fsd.log" &
    fsd_pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$work/fsd.log" && break; sleep 0.05; done
    addr=$(sed -n 's/^fsd: listening on \([0-9.:]*\),.*/\1/p' "$work/fsd.log")
    metrics=$(sed -n 's/^fsd: metrics on \([0-9.:]*\)$/\1/p' "$work/fsd.log")
    [ -n "$addr" ] || { cat "$work/fsd.log"; exit 1; }
    "$attack_bin" "$s" "$addr" "$fsd_pid" "$legit" "$evil" "$metrics" || echo "$s: attack tool failed"
    kill "$fsd_pid"
    wait "$fsd_pid" 2>/dev/null || true
    fsd_pid=
done
