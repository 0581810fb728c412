#!/usr/bin/env bash
# Makes the certificates the TLS tests and benchmarks use, in directory $1 (default ./certs):
#   ca.pem                     the CA clients and the server trust
#   server.pem server-key.pem  the server, for 127.0.0.1 and localhost (RSA 2048, as etcd's docs)
#   client-<CN>.pem / -key.pem client certificates by Common Name: root, alice, nobody (no such user)
#   client-nocn*.pem           a client certificate without a Common Name (grpc-proxy's --cert)
#   client-revoked*.pem        revoked in crl.pem, and in crl-expired.pem (whose nextUpdate has passed)
#   client-expired*.pem        expired yesterday
#   client-otherca*.pem        from a CA the server does not trust
#   client-selfsigned*.pem     self-signed
#   jwt-rs.pem jwt-rs.pub.pem  an RSA key pair for JWT; jwt-es.pem jwt-es.pub.pem a P-256 one
# Uses the openssl command only.
set -euo pipefail
dir=${1:-certs}
mkdir -p "$dir"
cd "$dir"
[ -f .complete-2 ] && exit 0

cat > ca.cnf <<'CNF'
[ ca ]
default_ca = testca
[ testca ]
dir = .
database = index.txt
new_certs_dir = newcerts
serial = serial
default_md = sha256
policy = anything
copy_extensions = copy
default_crl_days = 3650
unique_subject = no
[ anything ]
commonName = optional
organizationName = optional
[ client ]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
[ server ]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
CNF
mkdir -p newcerts
: > index.txt
echo 1000 > serial

quiet() { "$@" > /dev/null 2>&1 || { echo "failed: $*" >&2; "$@"; exit 1; }; }

quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem -days 3650 -subj "/CN=vigil-test-ca"

issue() { # name CN section [startdate enddate]
    local name=$1 cn=$2 section=$3
    quiet openssl req -newkey rsa:2048 -nodes -keyout "$name-key.pem" -out "$name.csr" -subj "/CN=$cn"
    local dates=(-days 3650)
    [ $# -ge 5 ] && dates=(-startdate "$4" -enddate "$5")
    quiet openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -extensions "$section" \
        "${dates[@]}" -in "$name.csr" -out "$name.pem" -notext
    rm -f "$name.csr"
}

issue server etcd-server server
for cn in root alice nobody revoked; do issue "client-$cn" "$cn" client; done
quiet openssl req -newkey rsa:2048 -nodes -keyout client-nocn-key.pem -out client-nocn.csr -subj "/O=vigil-test"
quiet openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -extensions client -days 3650 \
    -in client-nocn.csr -out client-nocn.pem -notext
rm -f client-nocn.csr
issue client-expired expired client 200101000000Z "$(date -u -d yesterday +%y%m%d%H%M%SZ)"
quiet openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -revoke client-revoked.pem
quiet openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -gencrl -out crl.pem
# The same list, expired long ago (as etcd's own fixture revoke.crl, nextUpdate 2021-03-07).
quiet openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca-key.pem -gencrl -crl_lastupdate 20200101000000Z \
    -crl_nextupdate 20210307000000Z -out crl-expired.pem

quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca-key.pem -out other-ca.pem -days 3650 -subj "/CN=other-ca"
quiet openssl req -newkey rsa:2048 -nodes -keyout client-otherca-key.pem -out otherca.csr -subj "/CN=root"
quiet openssl x509 -req -in otherca.csr -CA other-ca.pem -CAkey other-ca-key.pem -CAcreateserial -days 3650 \
    -out client-otherca.pem
quiet openssl req -x509 -newkey rsa:2048 -nodes -keyout client-selfsigned-key.pem -out client-selfsigned.pem \
    -days 3650 -subj "/CN=root"
rm -f otherca.csr ./*.srl

quiet openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out jwt-rs.pem
quiet openssl pkey -in jwt-rs.pem -pubout -out jwt-rs.pub.pem
quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out jwt-es.pem
quiet openssl pkey -in jwt-es.pem -pubout -out jwt-es.pub.pem
chmod 600 ./*-key.pem jwt-rs.pem jwt-es.pem
touch .complete-2
