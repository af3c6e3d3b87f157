#!/bin/sh
# One-time setup for the compose example: build the image, create the CA in the ca-data volume
# (kept if it exists), and write .env beside docker-compose.yml with the project name, the CA
# root fingerprint and one join token per sidecar. Re-run it to issue fresh tokens (they expire
# after 30 days; a join token enrols once, so a sidecar needs a new one whenever it restarts:
# re-run this, then `up -d` recreates the sidecars with the new tokens).
#
# Works with Compose v2 (`docker compose`) and v1 (`docker-compose`); COMPOSE=... picks one.
# Environment: COMPOSE_PROJECT_NAME (default mtls-sidecar-demo), BASE_IMAGE (the build's base).
set -eu
cd "$(dirname "$0")"

if [ -z "${COMPOSE:-}" ]; then
  if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"
  elif command -v docker-compose >/dev/null 2>&1; then COMPOSE="docker-compose"
  else echo "setup.sh: neither 'docker compose' nor 'docker-compose' found" >&2; exit 1
  fi
fi
# The project name names the CA volume (<project>_ca-data): keep the one .env already has.
if [ -z "${COMPOSE_PROJECT_NAME:-}" ] && [ -f .env ]; then
  COMPOSE_PROJECT_NAME=$(sed -n 's/^COMPOSE_PROJECT_NAME=//p' .env)
fi
COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-mtls-sidecar-demo}
export COMPOSE_PROJECT_NAME

# Compose interpolates every service before it runs one, and the sidecars' ${...:?} guards
# stop it while .env is not written yet: give those variables placeholders for the setup runs
# (ca-init uses none of them; the environment wins over .env).
dc() {
  MTLS_CA_FINGERPRINT=setup WEB_JOIN_TOKEN=setup CLIENT_JOIN_TOKEN=setup \
    $COMPOSE --profile setup "$@"
}

dc build ca-init
if dc run --rm --no-deps -T --entrypoint python ca-init \
    -c "import os,sys; sys.exit(0 if os.listdir('/var/lib/mtls-ca') else 1)"; then
  echo "CA exists in volume ${COMPOSE_PROJECT_NAME}_ca-data: keeping it"
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
{
  echo "COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME"
  if [ -n "${BASE_IMAGE:-}" ]; then echo "BASE_IMAGE=$BASE_IMAGE"; fi
  echo "MTLS_CA_FINGERPRINT=$fp"
  echo "WEB_JOIN_TOKEN=$web"
  echo "CLIENT_JOIN_TOKEN=$client"
} > .env
echo "wrote $(pwd)/.env; now: $COMPOSE -f $(pwd)/docker-compose.yml up -d"
