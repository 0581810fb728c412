#!/usr/bin/env bash
# Installs the Debian packages Vigil builds and tests with, if any is missing.
# Needs root (or sudo) only when something has to be installed.
set -euo pipefail

packages=(libuv1-dev libnghttp2-dev libhttp-parser-dev liblmdb-dev libcrypt-dev libssl-dev pkg-config)
if [ "${1:-}" = "--test" ]; then
    # etcdctl drives the integration tests, curl the gateway tests; etcd runs beside Vigil in the
    # benchmarks; openssl makes the TLS tests' certificates, PyJWT checks Vigil's JWTs, and
    # Prometheus runs etcd's dashboard and alert queries against /metrics; python3-h2 is the
    # streaming gateway watch client, Chromium runs the live page of Examples/live-config.
    packages+=(etcd-client etcd-server curl openssl python3-jwt python3-cryptography python3-h2 prometheus chromium)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
