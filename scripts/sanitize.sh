#!/usr/bin/env bash
# Runs the test suite with a sanitizer: the test runner, the in-process servers and the `vigil`
# binary the tests start are all built with it.
# Usage: scripts/sanitize.sh address|thread [swift test arguments, e.g. --filter MVCCTests]
#   address: scratch path .build-asan; LeakSanitizer off (the servers the tests stop by signal
#            keep connections open at exit).
#   thread:  scratch path .build-tsan.
# VIGIL_SANITIZER tells the tests to widen their memory and time bounds by the sanitizer's cost.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?address or thread}"
shift
case "$kind" in
    address) scratch=.build-asan
             export ASAN_OPTIONS="detect_leaks=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}" ;;
    thread)  scratch=.build-tsan
             export TSAN_OPTIONS="halt_on_error=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}" ;;
    *) echo "unknown sanitizer $kind" >&2; exit 2 ;;
esac
export VIGIL_SANITIZER="$kind"
swift build --build-tests --sanitize="$kind" --scratch-path "$scratch"
swift test --skip-build --sanitize="$kind" --scratch-path "$scratch" "$@"
