#!/usr/bin/env bash
# Regenerates Sources/EtcdProto/*.pb.swift from Protos/*.proto.
# The generated Swift is committed, so a normal build never needs protoc; run this only after
# changing a .proto file.
#   protoc:            Debian's protobuf-compiler (installed if missing)
#   protoc-gen-swift:  $PROTOC_GEN_SWIFT, else on PATH, else built once from the swift-protobuf
#                      package this project depends on.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! command -v protoc >/dev/null; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq protobuf-compiler >/dev/null
fi

plugin="${PROTOC_GEN_SWIFT:-$(command -v protoc-gen-swift || true)}"
if [ -z "$plugin" ]; then
    swift package resolve
    checkout="$root/.build/checkouts/swift-protobuf"
    (cd "$checkout" && swift build -c release --product protoc-gen-swift --scratch-path "$root/.build-protoc-gen-swift")
    plugin="$root/.build-protoc-gen-swift/release/protoc-gen-swift"
fi

out="$root/Sources/EtcdProto"
rm -f "$out"/*.pb.swift
protoc -I Protos \
    --plugin=protoc-gen-swift="$plugin" \
    --swift_opt=Visibility=Public \
    --swift_opt=FileNaming=DropPath \
    --swift_out="$out" \
    Protos/kv.proto Protos/auth.proto Protos/rpc.proto
echo "generated: $(ls "$out"/*.pb.swift | xargs -n1 basename | tr '\n' ' ')"
