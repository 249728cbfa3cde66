#!/usr/bin/env bash
# The main job, end to end on one machine: build, start fsd on a temp directory, upload a file
# with fsc, download it back, verify, list, and stop the server. Needs nothing but cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace --bins
bin=target/release
work=$(mktemp -d)
fsd_pid=
cleanup() {
  [ -n "$fsd_pid" ] && kill "$fsd_pid" 2>/dev/null && wait "$fsd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/served" "$work/local"
export FSC_TOKEN="demo-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
head -c $((64 * 1024 * 1024)) /dev/urandom > "$work/served/sample.bin"

"$bin/fsd" --root "$work/served" --listen 127.0.0.1:0 --token "$FSC_TOKEN" 2> "$work/fsd.log" &
fsd_pid=$!
for _ in $(seq 100); do
  addr=$(sed -n 's/^fsd: listening on \([^,]*\),.*/\1/p' "$work/fsd.log")
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$work/fsd.log"; exit 1; }
echo "fsd serving $work/served on $addr"

"$bin/fsc" ls "$addr"
"$bin/fsc" download "$addr" sample.bin "$work/local/sample.bin"
cmp "$work/served/sample.bin" "$work/local/sample.bin"
echo "download verified: $(wc -c < "$work/local/sample.bin") bytes identical"

"$bin/fsc" mkdir "$addr" uploaded
"$bin/fsc" upload "$addr" "$work/local/sample.bin" uploaded/sample-copy.bin
cmp "$work/served/sample.bin" "$work/served/uploaded/sample-copy.bin"
echo "upload verified"
"$bin/fsc" ls "$addr" uploaded
echo "demo OK"
