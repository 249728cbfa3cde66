#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS defaults to 60 per target; with no TARGET every target in fuzz/ is run.
# Prints, per target, the executions and wall time, and the hex and path of any crash artifact.
# Exits nonzero if any target crashed (or failed to build).
#
# Environment:
#   FUZZ_SANITIZER  address (default) or none; see below.
#   FUZZ_ARGS       extra libFuzzer flags, e.g. "-max_len=65536".
#
# The corpus (fuzz/corpus/TARGET) and crash artifacts (fuzz/artifacts/TARGET) are kept between
# runs and ignored by git: a run resumes from what earlier runs found.

# -e/-u/pipefail: a failed install or build must stop the script rather than report "no crash".
set -euo pipefail

secs=${1:-60}
shift || true
case $secs in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root/fuzz"

# cargo-fuzz is a cargo subcommand from crates.io, not part of the toolchain. --locked: build it
# with the dependency versions its release was tested with.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# cargo fuzz builds with nightly-only flags (-Zsanitizer=address, and it checks for a nightly
# rustc). This machine has only a stable toolchain; RUSTC_BOOTSTRAP=1 lets stable rustc accept
# them. The stable std for x86_64-unknown-linux-gnu ships the ASan runtime, so AddressSanitizer
# works; where it does not, the build is retried with --sanitizer none (coverage-guided fuzzing
# without ASan: Rust's own bounds and overflow checks still panic).
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-address}

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Seed corpora with a few valid inputs, so the fuzzer starts from well-formed frames and
# messages instead of having to discover the magic and CRC32s itself. Only into empty corpora.
seed() { # seed TARGET NAME PRINTF-FORMAT
    local dir="corpus/$1"
    mkdir -p "$dir"
    [ -e "$dir/$2" ] || printf "$3" >"$dir/$2"
}
if [ -z "$(ls -A corpus/frame_decoder 2>/dev/null)" ]; then
    # frame_decoder input: [piece size][DATA-limit selector][stream...]. Header: "FSD1", version,
    # flags, cmd u16, stream u32, payload_len u32, crc32 u32, big-endian.
    # PING on stream 7 with payload "x" (crc32 0x8cdc1683), fed whole, limit 4096.
    seed frame_decoder seed-ping '\x00\x03FSD1\x01\x01\x00\x03\x00\x00\x00\x07\x00\x00\x00\x01\x8c\xdc\x16\x83x'
    # DATA|END READ frame "chunk bytes" (crc32 0xe67298b8), then an empty PING; fed 7 at a time.
    seed frame_decoder seed-data '\x07\x03FSD1\x01\x03\x00\x14\x00\x00\x00\x03\x00\x00\x00\x0b\xe6\x72\x98\xb8chunk bytesFSD1\x01\x00\x00\x03\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00'
    # The same DATA frame with a wrong CRC32: a BadChecksum item.
    seed frame_decoder seed-badcrc '\x01\x03FSD1\x01\x03\x00\x14\x00\x00\x00\x03\x00\x00\x00\x0b\x00\x00\x00\x00chunk bytes'
fi
if [ -z "$(ls -A corpus/message_decoders 2>/dev/null)" ]; then
    # OpenRequest{path:"a/b", mode:WRITE, size:1024, resume_key:"k"}
    seed message_decoders seed-open '\x0a\x03a/b\x10\x01\x18\x80\x08\x22\x01k'
    # Hello{version:1, max_frame:1048576, agent:"fsc"}
    seed message_decoders seed-hello '\x08\x01\x10\x80\x80\x40\x2a\x03fsc'
    # RenameRequest{from:"x", to:"y", no_clobber:true}
    seed message_decoders seed-rename '\x0a\x01x\x12\x01y\x18\x01'
fi

# Build first so that the timed run below measures fuzzing, not compiling.
if ! cargo fuzz build --sanitizer "$sanitizer"; then
    if [ "$sanitizer" = address ] && cargo fuzz build --sanitizer none; then
        echo "== WARNING: ASan build failed; fuzzing with --sanitizer none" >&2
        sanitizer=none
    else
        echo "== build failed" >&2
        exit 1
    fi
fi

status=0
summary=()
for t in "${targets[@]}"; do
    # libFuzzer refuses a corpus directory that does not exist.
    mkdir -p "artifacts/$t" "corpus/$t"
    before=$(ls "artifacts/$t")
    log=$(mktemp "${TMPDIR:-/tmp}/fuzz-$t.XXXXXX")
    echo "== $t: fuzzing for ${secs}s (sanitizer: $sanitizer)"
    start=$(date +%s.%N)
    # -max_total_time bounds the run; -timeout flags any single input taking >10 s (a decode
    # loop that never ends); -print_final_stats prints stat::number_of_executed_units.
    # No -jobs/-workers: one process, one core. The exit status is kept, not fatal, so that the
    # summary and artifacts are still printed.
    set +e
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
    cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    end=$(date +%s.%N)
    dur=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1 || true)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
    corpus_n=$(find "corpus/$t" -type f | wc -l)
    line="$t: ${execs:-?} execs in ${dur}s (${rate:-?}/s), corpus $corpus_n, exit $rc"
    [ -n "$done_line" ] && line+=" | ${done_line}"

    # Crash, leak, timeout and OOM inputs that this run added.
    new=$(comm -13 <(printf '%s\n' "$before" | sort) <(ls "artifacts/$t" | sort) | sed '/^$/d' || true)
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        status=1
        line+=" | FAILED"
        echo "== $t FAILED (exit $rc)"
        for a in $new; do
            echo "-- artifact fuzz/artifacts/$t/$a ($(wc -c <"artifacts/$t/$a") bytes), hex:"
            od -An -tx1 -v "artifacts/$t/$a" | tr -d ' \n' | fold -w 64
            echo
            echo "   reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer $sanitizer $t artifacts/$t/$a"
        done
        # The first panic message or sanitizer report, with its stack.
        grep -m1 -A40 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | head -n 80 || true
    fi
    summary+=("$line")
    rm -f "$log"
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "$status"
