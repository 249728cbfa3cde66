#!/usr/bin/env bash
# fanout.sh PIDFILE LISTFILE CMD [ARG...]
# Starts CMD once per line of LISTFILE, all at once, with @F@ in any argument replaced by that
# line; records each child's pid in PIDFILE (so bench.sh can stop exactly those), waits
# for all of them and exits 1 if any failed. The children inherit stdout/stderr.
set -euo pipefail
pidfile=$1 list=$2
shift 2
pids=()
while IFS= read -r f; do
  [ -n "$f" ] || continue
  args=()
  for a in "$@"; do args+=("${a//@F@/$f}"); done
  "${args[@]}" &
  pids+=("$!")
  echo "$!" >> "$pidfile"
done < "$list"
fail=0
for p in "${pids[@]}"; do
  wait "$p" || fail=$((fail + 1))
done
if [ "$fail" -gt 0 ]; then
  echo "fanout: $fail of ${#pids[@]} failed" >&2
  exit 1
fi
