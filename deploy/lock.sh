#!/bin/sh
# Refresh the image's lock files (deploy/README.md, "Upgrading"): every package the image installs,
# pinned with its hashes, resolved for the base image's Python (the Dockerfile's BASE tag) on
# x86_64 Linux with glibc 2.34 (Amazon Linux 2023), wheels only. Needs uv (pip install uv).
# Usage: lock.sh         all three locks, upgraded to the newest versions allowed
#        lock.sh table   only requirements-table.lock, against requirements.lock as it is
set -eu
cd "$(dirname "$0")/.."
py=$(sed -n 's|^ARG BASE=public\.ecr\.aws/lambda/python:\([0-9][0-9.]*\)@.*|\1|p' Dockerfile)
[ -n "$py" ] || { echo "lock.sh: no 'ARG BASE=public.ecr.aws/lambda/python:X.Y@sha256:...' in Dockerfile" >&2; exit 1; }
target="--python-version $py --python-platform x86_64-manylinux_2_34 --only-binary :all:"
if [ "${1:-}" != table ]; then
    # shellcheck disable=SC2086
    uv pip compile --quiet --upgrade --generate-hashes $target pyproject.toml -o deploy/requirements.lock
    # The build backend, for the builder stage's `pip wheel --no-build-isolation`.
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' |
        # shellcheck disable=SC2086
        uv pip compile --quiet --upgrade --generate-hashes $target - -o deploy/build.lock
fi
# The image with TABLE=delta (deploy/image-lock.sh): the same pins as requirements.lock (as
# constraints), plus the [table] extra and what it needs.
# shellcheck disable=SC2086
uv pip compile --quiet --upgrade --generate-hashes $target --extra table \
    -c deploy/requirements.lock pyproject.toml -o deploy/requirements-table.lock
