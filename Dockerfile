# qpher-proxy container image. Builds with the classic builder and with BuildKit:
#
#   docker build -t qpher-proxy:0.1.0 .
#   docker run -d --name qpher -p 8443:8443 -v qpher-state:/var/lib/qpher qpher-proxy:0.1.0
#
# The first start with an empty state volume runs `qpher-proxy init` (dev certificates, a generated
# KEK and pepper, a demo API key in /var/lib/qpher/secrets/demo-api-key); mount your own config at
# QPHER_CONFIG for anything else (deploy/sidecar/ shows one with the KEK, pepper and TLS key from
# secrets). Nothing secret is ever part of an image layer.
#
# Build arguments:
#   BASE_IMAGE       the Python 3.11+ Debian base (default the official slim image; the tests use a
#                    local one made with debootstrap, as no registry is reachable there)
#   LIBOQS_VERSION   "none" (default: crypto on the OpenSSL inside cryptography), or the version of
#   LIBOQS_SHA256    a liboqs build you provide as deploy/liboqs/liboqs-$LIBOQS_VERSION.tar.gz, with
#                    its SHA-256 (see deploy/liboqs/README.md)
#   VCS_REF, BUILD_DATE   recorded as org.opencontainers.image.revision / .created
#
# Python packages come from deploy/requirements.txt (exact pins) through PyPI, or from wheels in
# deploy/wheelhouse/ alone when there are any (offline builds, see its README).

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- Python packages into a virtualenv ------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/qpher-proxy
WORKDIR /src
# Dependencies first, in their own layer: a change to the code does not download them again.
COPY deploy/requirements.txt deploy/requirements.txt
COPY deploy/wheelhouse/ deploy/wheelhouse/
RUN set -eu; \
    if ls deploy/wheelhouse/*.whl >/dev/null 2>&1; then src="--no-index --find-links deploy/wheelhouse"; \
    else src=""; fi; \
    /opt/qpher-proxy/bin/pip install --no-deps --only-binary=:all: $src -r deploy/requirements.txt
COPY pyproject.toml README.md ./
COPY qpher_proxy/ qpher_proxy/
COPY qpher_proxy_bench/ qpher_proxy_bench/
RUN set -eu; \
    if ls deploy/wheelhouse/qpher_proxy-*.whl >/dev/null 2>&1; then \
      /opt/qpher-proxy/bin/pip install --no-deps --no-index deploy/wheelhouse/qpher_proxy-*.whl; \
    else \
      /opt/qpher-proxy/bin/pip install --no-deps . ; \
    fi; \
    /opt/qpher-proxy/bin/pip check

# --- liboqs: the build you provide, checked, or nothing ---------------------------------------------
FROM ${BASE_IMAGE} AS liboqs
ARG LIBOQS_VERSION=none
ARG LIBOQS_SHA256=
COPY deploy/liboqs/ /tmp/liboqs/
RUN set -eu; mkdir -p /opt/liboqs; \
    if [ "$LIBOQS_VERSION" = none ]; then exit 0; fi; \
    tarball="/tmp/liboqs/liboqs-$LIBOQS_VERSION.tar.gz"; \
    [ -f "$tarball" ] || { echo "LIBOQS_VERSION=$LIBOQS_VERSION but deploy/liboqs/liboqs-$LIBOQS_VERSION.tar.gz is not in the build context" >&2; exit 1; }; \
    [ -n "$LIBOQS_SHA256" ] || { echo "LIBOQS_VERSION is set: LIBOQS_SHA256 must name the tarball's SHA-256" >&2; exit 1; }; \
    echo "$LIBOQS_SHA256  $tarball" | sha256sum -c --strict --quiet - \
      || { echo "deploy/liboqs/liboqs-$LIBOQS_VERSION.tar.gz does not have SHA-256 $LIBOQS_SHA256" >&2; exit 1; }; \
    tar -C /opt/liboqs -xzf "$tarball" --no-same-owner; \
    ls /opt/liboqs/lib*/liboqs.so >/dev/null \
      || { echo "deploy/liboqs/liboqs-$LIBOQS_VERSION.tar.gz holds no lib/liboqs.so" >&2; exit 1; }

# --- the runtime image ----------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
ARG LIBOQS_VERSION=none
ARG LIBOQS_SHA256=
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
# Pins: the version of this package (pyproject.toml), cryptography's (deploy/requirements.txt) and
# the OpenSSL inside that cryptography wheel. A build whose installation differs fails below.
ARG QPHER_VERSION=0.1.0
ARG CRYPTOGRAPHY_VERSION=50.0.2
ARG OPENSSL_VERSION=4.0.3

# tini as PID 1: forwards SIGTERM to the supervisor (which drains and exits 0) and reaps orphans.
RUN set -eu; \
    if ! command -v tini >/dev/null 2>&1; then \
      apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 qpher; \
    useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/qpher --no-create-home \
      --shell /usr/sbin/nologin qpher; \
    install -d -o 10001 -g 10001 -m 0700 /var/lib/qpher

COPY --from=build /opt/qpher-proxy /opt/qpher-proxy
COPY --from=liboqs /opt/liboqs /opt/liboqs
COPY policies/ /usr/share/qpher-proxy/policies/
COPY deploy/docker-entrypoint.sh /usr/local/bin/qpher-entrypoint

ENV PATH=/opt/qpher-proxy/bin:$PATH \
    QPHER_CONFIG=/var/lib/qpher/config.yaml \
    QPHER_LISTEN=0.0.0.0:8443 \
    QPHER_POLICY_EXAMPLES=/usr/share/qpher-proxy/policies \
    OQS_INSTALL_PATH=/opt/liboqs \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The labels below must describe what this image holds: refuse to build otherwise.
RUN qpher-proxy version \
      --expect "qpher-proxy=$QPHER_VERSION" --expect "cryptography=$CRYPTOGRAPHY_VERSION" \
      --expect "openssl=$OPENSSL_VERSION" --expect "liboqs=$LIBOQS_VERSION" \
    && chmod 0755 /usr/local/bin/qpher-entrypoint

LABEL org.opencontainers.image.title="qpher-proxy" \
      org.opencontainers.image.description="Post-quantum crypto gateway: PQ TLS termination, API keys, policy, an isolated KMS" \
      org.opencontainers.image.version="${QPHER_VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.qpher.cryptography.version="${CRYPTOGRAPHY_VERSION}" \
      io.qpher.openssl.version="${OPENSSL_VERSION}" \
      io.qpher.liboqs.version="${LIBOQS_VERSION}" \
      io.qpher.liboqs.sha256="${LIBOQS_SHA256}"

USER 10001:10001
WORKDIR /var/lib/qpher
VOLUME ["/var/lib/qpher"]
EXPOSE 8443
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=6s --start-period=20s --retries=3 CMD ["qpher-proxy", "healthcheck", "--timeout", "5"]
ENTRYPOINT ["tini", "--", "qpher-entrypoint"]
CMD ["serve"]
