# The nyc-collisions Lambda image (also usable as the CLI: see deploy/README.md).
# AWS Lambda base image for Python 3.12 on Amazon Linux 2023, pinned by the digest of its
# multi-architecture index (a rebuild gets exactly this base; deploy/README.md, "Upgrading",
# says how to move the pin). deploy/lock.sh resolves the lock for the Python of this tag.
ARG BASE=public.ecr.aws/lambda/python:3.12@sha256:145350008f3f67d82c0bc6ecd34d9eb0c95aecf11f9b69db6bab7de3d5d3cc61

# ---- builder: compiles the native JSON -> CSV converter (src/nyc_collisions/_jsoncsv.c) into the
# package's wheel and installs exactly the locked set into /install; the compiler stays here.
FROM ${BASE} AS builder
# TABLE=delta (the template's Table parameter, or --build-arg) builds the image for `--table
# delta`: deploy/requirements-table.lock, the same pins plus deltalake, which must then import.
ARG TABLE=
# hadolint ignore=DL3041
RUN dnf install -y gcc && dnf clean all
WORKDIR /build
COPY deploy/requirements.lock deploy/requirements-table.lock deploy/build.lock \
    deploy/image-lock.sh deploy/prune-site-packages.sh deploy/
RUN lock=$(sh deploy/image-lock.sh "$TABLE") \
    && pip install --no-cache-dir --require-hashes --only-binary :all: -r deploy/build.lock \
    && pip install --no-cache-dir --require-hashes --only-binary :all: --no-deps \
        --target /install -r "$lock"
COPY pyproject.toml README.md ./
COPY src/ ./src/
# The build fails if the converter did not compile (setuptools treats it as optional).
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip install --no-cache-dir --no-deps --target /install /wheels/nyc_collisions-*.whl \
    && sh deploy/prune-site-packages.sh /install \
    && rm -rf /install/bin \
    && PYTHONPATH=/install python -c "import nyc_collisions._jsoncsv, nyc_collisions.aws, boto3" \
    && PYTHONPATH=/install python -c "from nyc_collisions.settings import check_table_format as c; c('$TABLE')"

# ---- the image: the base, the installed set in the function's own folder (first on the Lambda
# runtime's sys.path, so the locked boto3 wins over the base image's), and the CLI's launcher.
FROM ${BASE}
COPY --from=builder /install ${LAMBDA_TASK_ROOT}
COPY deploy/nyc-collisions /usr/local/bin/nyc-collisions

# numpy (loaded by pyarrow) would start an OpenBLAS thread per core that spins beside the
# workers; nothing here uses BLAS (the `nyc-collisions` command sets the same default).
ENV OPENBLAS_NUM_THREADS=1

CMD ["nyc_collisions.aws.handler"]
