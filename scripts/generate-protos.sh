#!/usr/bin/env bash
# Regenerates Sources/EtcdProto/*.pb.swift from Protos/*.proto (etcd's APIs: kv, auth, rpc, v3lock, v3election).
#
# The generated Swift is committed, so a normal build never needs protoc or the plugin; run this
# (or `make protos`) only after changing a .proto file, and commit the result with it.
#
#   protoc:            Debian's protobuf-compiler (installed with apt-get if missing)
#   protoc-gen-swift:  $PROTOC_GEN_SWIFT, else protoc-gen-swift on PATH, else built once (release)
#                      from the swift-protobuf checkout this package depends on
#                      (.build/checkouts/swift-protobuf), so plugin and runtime versions match.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

protos=(kv.proto auth.proto rpc.proto v3lock.proto v3election.proto)
out="$root/Sources/EtcdProto"

# --- protoc -------------------------------------------------------------------------------------
if ! command -v protoc >/dev/null 2>&1; then
    echo "protoc not found; installing protobuf-compiler" >&2
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends protobuf-compiler >/dev/null
fi

# --- protoc-gen-swift ---------------------------------------------------------------------------
plugin="${PROTOC_GEN_SWIFT:-}"
if [ -z "$plugin" ]; then
    plugin="$(command -v protoc-gen-swift 2>/dev/null || true)"
fi
if [ -z "$plugin" ]; then
    checkout="$root/.build/checkouts/swift-protobuf"
    if [ ! -f "$checkout/Package.swift" ]; then
        swift package resolve
    fi
    # A scratch path of our own keeps build products out of the dependency checkout.
    scratch="$root/.build-protoc-gen-swift"
    (cd "$checkout" && swift build -c release --product protoc-gen-swift --scratch-path "$scratch")
    plugin="$scratch/release/protoc-gen-swift"
fi
if [ ! -x "$plugin" ]; then
    echo "error: protoc-gen-swift plugin '$plugin' is not an executable file" >&2
    exit 1
fi

# The generated code must match the SwiftProtobuf runtime the package links; warn on a mismatch.
pinned="$(sed -n '/"identity" : "swift-protobuf"/,/}/s/.*"version" : "\([^"]*\)".*/\1/p' \
    Package.resolved 2>/dev/null | head -n1 || true)"
have="$("$plugin" --version 2>/dev/null | awk '{print $NF}' || true)"
if [ -n "$pinned" ] && [ -n "$have" ] && [ "$pinned" != "$have" ]; then
    echo "warning: protoc-gen-swift is $have but Package.resolved pins swift-protobuf $pinned" >&2
fi

# --- generate -----------------------------------------------------------------------------------
# Generate into a temporary directory first so a failure leaves the committed files untouched.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

protoc --proto_path="$root/Protos" \
    --plugin=protoc-gen-swift="$plugin" \
    --swift_opt=Visibility=Public \
    --swift_opt=FileNaming=DropPath \
    --swift_out="$tmp" \
    "${protos[@]/#/$root/Protos/}"

mkdir -p "$out"
rm -f "$out"/*.pb.swift
cp "$tmp"/*.pb.swift "$out"/
echo "generated in ${out#"$root"/}: $(cd "$out" && ls *.pb.swift | tr '\n' ' ')"
