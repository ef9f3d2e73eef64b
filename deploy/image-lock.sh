#!/bin/sh
# Which lock file the image installs, for its TABLE build argument (the template's Table
# parameter): empty = deploy/requirements.lock; delta = deploy/requirements-table.lock, the same
# pins plus the [table] extra (deltalake). Used by the Dockerfile and .ci/smoke.
# Usage: image-lock.sh [TABLE]   (prints the lock's path, relative to the project root)
set -eu
case "${1:-}" in
    "") echo deploy/requirements.lock ;;
    delta) echo deploy/requirements-table.lock ;;
    *)
        echo "image-lock.sh: TABLE=$1 is not a table format: use delta, or leave it empty" >&2
        exit 2
        ;;
esac
