#!/bin/sh
# Test certificates for the TCP Control API: a CA, a server certificate it
# signs for 127.0.0.1 and localhost, a second CA that signs nothing the
# server presents, and a token. Everything private is 0600.
# Usage: make-certs.sh DIR
set -eu
dir=$1
mkdir -p "$dir"
cd "$dir"
umask 077
for ca in ca other-ca; do
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$ca.key" -out "$ca.crt" -days 2 -subj "/CN=seamless test $ca" 2>/dev/null
done
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout server.key -out server.csr -subj "/CN=seamless test node" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out server.crt -days 2 -extfile server.ext 2>/dev/null
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > token
echo >> token
