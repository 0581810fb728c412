#!/usr/bin/env bash
# Runs the same etcdctl auth scenario against a fresh etcd and a fresh Vigil and prints the
# difference of their outputs (none expected but the lease ID, endpoint status figures, and where
# Vigil follows newer etcd: invalid permission ranges refused, Compact needs admin).
# Needs: etcd-server, etcd-client, a debug build of vigil (`swift build`).
set -uo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'kill $etcd_pid $vigil_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
etcd --data-dir "$work/etcd" --listen-client-urls http://127.0.0.1:25790 --advertise-client-urls http://127.0.0.1:25790 \
    --listen-peer-urls http://127.0.0.1:25791 >"$work/etcd.log" 2>&1 &
etcd_pid=$!
.build/debug/vigil --data-dir "$work/vigil" --listen-client-urls http://127.0.0.1:25792 --log-level error &
vigil_pid=$!
sleep 2

scenario() {
    local ep="$1"
    run() { echo "\$ $*"; etcdctl --endpoints="$ep" "$@" 2>&1 | grep -v '"level":"warn"'; }
    run user add root:rootpw
    run user add alice:apw
    run role add reader
    run role grant-permission reader read app/ --prefix
    run role grant-permission reader write b a
    run user grant-role alice reader
    run user grant-role alice nope
    run auth enable
    run put x y
    run --user alice:apw get app/a
    run --user alice:apw put app/a 1
    run --user alice:wrong get app/a
    run --user nobody:x get app/a
    run --user root:rootpw user list
    run --user root:rootpw role list
    run --user root:rootpw role get reader
    run --user alice:apw user get alice
    run --user alice:apw user get root
    run --user alice:apw role get root
    run --user root:rootpw user delete root
    run --user root:rootpw role delete root
    run --user root:rootpw user revoke-role alice root
    run --user root:rootpw role revoke-permission reader zzz
    run --user root:rootpw user add alice:x
    run --user root:rootpw role add reader
    run --user alice:apw compaction 1
    run --user alice:apw lease grant 10
    run --user root:rootpw auth disable
    run user list
}
scenario 127.0.0.1:25790 >"$work/etcd.txt"
scenario 127.0.0.1:25792 >"$work/vigil.txt"
diff "$work/etcd.txt" "$work/vigil.txt" && echo "identical"
