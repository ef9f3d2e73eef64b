#!/bin/sh
# Refresh the image's lock files (deploy/README.md, "Upgrading"): every package the image installs,
# pinned with its hashes, resolved for the base image's Python (the Dockerfile's BASE tag) on
# x86_64 Linux with glibc 2.34 (Amazon Linux 2023), wheels only. Needs uv (pip install uv).
set -eu
cd "$(dirname "$0")/.."
py=$(sed -n 's|^ARG BASE=public\.ecr\.aws/lambda/python:\([0-9][0-9.]*\)@.*|\1|p' Dockerfile)
[ -n "$py" ] || { echo "lock.sh: no 'ARG BASE=public.ecr.aws/lambda/python:X.Y@sha256:...' in Dockerfile" >&2; exit 1; }
target="--python-version $py --python-platform x86_64-manylinux_2_34 --only-binary :all:"
# shellcheck disable=SC2086
uv pip compile --quiet --upgrade --generate-hashes $target pyproject.toml -o deploy/requirements.lock
# The build backend, for the builder stage's `pip wheel --no-build-isolation`.
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' |
    # shellcheck disable=SC2086
    uv pip compile --quiet --upgrade --generate-hashes $target - -o deploy/build.lock
