#!/bin/sh
# One-time setup for the compose example: build the image, create the CA in the ca-data volume
# (kept if it exists), and write .env beside docker-compose.yml with the CA root fingerprint
# and one join token per sidecar. Re-run it to issue fresh tokens (they expire after 30 days;
# a sidecar needs its token again only when it restarts and re-enrols).
set -eu
cd "$(dirname "$0")"
dc() { docker compose --profile setup "$@"; }

dc build ca-init
if dc run --rm --no-deps -T --entrypoint python ca-init \
    -c "import os,sys; sys.exit(0 if os.listdir('/var/lib/mtls-ca') else 1)"; then
  echo "CA exists in volume ca-data: keeping it"
else
  dc run --rm --no-deps -T ca-init
fi

# sha256 over the DER of the self-signed root certificate in the CA directory.
fp=$(dc run --rm --no-deps -T --entrypoint python ca-init -c "
import glob, hashlib
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
for path in sorted(glob.glob('/var/lib/mtls-ca/*')):
    try:
        certs = x509.load_pem_x509_certificates(open(path, 'rb').read())
    except (ValueError, OSError):
        continue
    for cert in certs:
        if cert.issuer == cert.subject:
            print(hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest())
            raise SystemExit(0)
raise SystemExit('no self-signed root certificate in /var/lib/mtls-ca')
")
token() { dc run --rm --no-deps -T ca-init ca token --dir /var/lib/mtls-ca --id "$1" --ttl 30d; }
web=$(token spiffe://compose.local/web)
client=$(token spiffe://compose.local/client)

umask 077
cat > .env <<ENV
MTLS_CA_FINGERPRINT=$fp
WEB_JOIN_TOKEN=$web
CLIENT_JOIN_TOKEN=$client
ENV
echo "wrote $(pwd)/.env; now: docker compose -f $(pwd)/docker-compose.yml up -d"
