#!/usr/bin/env bash
# Fuzzes everything that parses network bytes, each target for a bounded time (libFuzzer through
# swiftc -sanitize=fuzzer, with the address sanitizer):
#   connection  one client connection's bytes (HTTP/1.1 gateway or HTTP/2 + gRPC, every service)
#               against an in-process server
#   framing     gRPC message framing, fed in chunks of varying sizes
#   tls         the TLS listener: raw bytes (handshakes), or a real session carrying a connection's bytes
# Usage: scripts/fuzz.sh [seconds per target, default 60] [target...]
# New inputs that reach new code are merged into Tests/FuzzCorpus/<target>/; inputs that crash
# are kept in Tests/FuzzCorpus/crashes/ — both are replayed by the ordinary tests (FuzzCorpusTests).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(connection framing tls)

swift build --scratch-path .build-fuzz --product vigil-fuzz \
    -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library -Xswiftc -DFUZZING
bin=.build-fuzz/debug/vigil-fuzz
mkdir -p Tests/FuzzCorpus/crashes
status=0
for t in "${targets[@]}"; do
    corpus="Tests/FuzzCorpus/$t"
    work="$(mktemp -d)"
    mkdir -p "$corpus"
    echo "== $t: ${seconds}s from $(ls "$corpus" | wc -l) inputs"
    VIGIL_FUZZ_TARGET="$t" ASAN_OPTIONS=detect_leaks=0 "$bin" "$work" "$corpus" \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="Tests/FuzzCorpus/crashes/$t-" || status=$?
    # Keep only what adds coverage.
    VIGIL_FUZZ_TARGET="$t" ASAN_OPTIONS=detect_leaks=0 "$bin" -merge=1 "$corpus" "$work" 2>&1 | grep -E "MERGE-OUTER: [0-9]+ new files" || true
    rm -rf "$work"
done
exit $status
