# mtls-sidecar container image: `make image` (docker build -t mtls-sidecar:dev .).
#
# Two stages: `build` turns the source into a wheel and installs it with its dependencies into
# a virtualenv; the final stage gets only that virtualenv, iptables/nftables for
# `mtls-sidecar iptables --apply` (the Kubernetes init container), and runs as UID 1337, the
# proxy UID that the capture rules exempt. Everything at run time is exec form (entrypoint,
# healthcheck): signals reach the sidecar directly and no shell is needed.
# Base image: python:3.11-slim with the Debian release pinned (bookworm), so the apt package
# names and iptables backend cannot change under a rebuild. Pin a digest in your registry for
# fully reproducible builds.
# TLS: the sidecar does not use the image's OpenSSL (Debian 12: 3.0, no post-quantum groups).
# It runs on the OpenSSL that the `cryptography` wheel bundles (4.x, via pyOpenSSL), so the
# image gets X25519MLKEM768 from pip; the build checks that binding (proxy/tls_ffi.py).

# BASE_IMAGE: any Debian bookworm image with Python 3.11 as `python` and its venv module; the
# tests build one from Debian packages (debootstrap) where no registry can be reached.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy/ proxy/
# The same steps CI exercises (tests/test_deploy.py): build the wheel, install it into a fresh venv.
RUN python -m venv /opt/mtls-sidecar \
    && /opt/mtls-sidecar/bin/pip install --no-cache-dir --upgrade pip \
    && /opt/mtls-sidecar/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/mtls-sidecar/bin/pip install --no-cache-dir /wheels/*.whl \
    && /opt/mtls-sidecar/bin/mtls-sidecar --help >/dev/null \
    && /opt/mtls-sidecar/bin/python -c "import proxy.tls_ffi as t; print(t.VERSION_TEXT)"

FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mtls-sidecar" \
      org.opencontainers.image.description="A mutual-TLS sidecar: wraps every connection between services in mTLS, with a small built-in CA and metrics that prove what was encrypted." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="mtls-sidecar" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# iptables/nftables for the transparent-mode init container; the proxy user and group (1337);
# the CA directory owned by it, so a named volume mounted there starts out writable for
# `mtls-sidecar ca init` (compose example).
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 1337 mtls \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mtls \
    && install -d -o 1337 -g 1337 -m 0700 /var/lib/mtls-ca
COPY --from=build /opt/mtls-sidecar /opt/mtls-sidecar
ENV PATH=/opt/mtls-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1337:1337
WORKDIR /tmp
EXPOSE 15000
STOPSIGNAL SIGTERM
# GET /ready on the admin port (MTLS_ADMIN_LISTEN, default 127.0.0.1:15000; a wildcard address
# is probed on loopback). Docker has no readiness, so "healthy" must mean "can serve": a valid
# certificate loaded and every listener up, not merely "the process answers" (/live).
# urlopen raises on a refused connection or a non-2xx status (/ready is 503 until then): exit 1.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request as u;h,_,p=os.environ.get('MTLS_ADMIN_LISTEN','127.0.0.1:15000').rpartition(':');h=h.strip('[]');h={'':'127.0.0.1','0.0.0.0':'127.0.0.1','::':'::1'}.get(h,h);h='['+h+']' if ':' in h else h;u.urlopen('http://'+h+':'+p+'/ready',timeout=2)"]
ENTRYPOINT ["mtls-sidecar"]
CMD ["run"]
