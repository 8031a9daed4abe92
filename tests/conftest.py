"""The deployment tests (tests/deploy) start a Docker engine and build images: `make test-deploy`
runs them (QPHER_DEPLOY_TESTS=1), `make test` does not collect them."""

import os

collect_ignore = [] if os.environ.get("QPHER_DEPLOY_TESTS") else ["deploy"]
