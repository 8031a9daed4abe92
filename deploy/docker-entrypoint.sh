#!/bin/sh
# The image's entrypoint (under tini). `serve` (the default command) on a state volume without a
# config first runs `qpher-proxy init` there: dev certificates, a generated KEK and pepper, a demo API
# key, listening on $QPHER_LISTEN. Any other command is qpher-proxy's own:
#   docker run --rm -v qpher-state:/var/lib/qpher qpher-proxy apikey list
# and a command that is not one of qpher-proxy's (sh, python3) runs as given.
set -eu
config="${QPHER_CONFIG:-/var/lib/qpher/config.yaml}"
if [ "$#" -eq 0 ]; then
    set -- serve
fi
case "$1" in
    serve)
        if [ ! -e "$config" ]; then
            if [ "$config" != /var/lib/qpher/config.yaml ]; then
                echo "qpher-entrypoint: QPHER_CONFIG=$config does not exist (mount your config there)" >&2
                exit 2
            fi
            qpher-proxy init --dir /var/lib/qpher --listen "${QPHER_LISTEN:-0.0.0.0:8443}"
        fi
        exec qpher-proxy "$@"
        ;;
    init|version|check-config|healthcheck|apikey|policy|audit|kms|db|fail-open|bench|-h|--help)
        exec qpher-proxy "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
