#!/usr/bin/env bash
# Bounded load test: LOAD_CLIENTS concurrent raw-protocol clients (default 200) for LOAD_SECS
# seconds (default 60) against one release-built fsd, mixing LIST, verified downloads and verified
# uploads of small and ~4 MiB files (tests/load.rs, test `load_full`).
#
#   scripts/load.sh
#   LOAD_CLIENTS=50 LOAD_SECS=10 scripts/load.sh
#
# Prints clients, seconds, operations, errors (the test fails unless 0), MiB/s moved, latency
# percentiles per operation and fsd's peak RSS (VmHWM). fsd logs at warn (FSD_TEST_LOG) so that
# logging does not dominate the measurement; set FSD_TEST_LOG=info to see every request.

set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

export LOAD_CLIENTS=${LOAD_CLIENTS:-200}
export LOAD_SECS=${LOAD_SECS:-60}
export FSD_TEST_LOG=${FSD_TEST_LOG:-warn}

case $LOAD_CLIENTS$LOAD_SECS in
    *[!0-9]*) echo "LOAD_CLIENTS and LOAD_SECS must be whole numbers" >&2; exit 2 ;;
esac

# Release binaries: the test's fsd is env!("CARGO_BIN_EXE_fsd") of this profile.
cargo build --release --workspace --bins
echo "load: $LOAD_CLIENTS clients for $LOAD_SECS s against target/release/fsd ($(nproc) CPUs)"
cargo test --release --test load -- --ignored --nocapture
