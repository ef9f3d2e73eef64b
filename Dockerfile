# The nyc-collisions Lambda image (also usable as the CLI: see deploy/README.md).
# AWS Lambda base image for Python 3.11 (Amazon Linux 2, x86_64). For byte-for-byte reproducible
# builds pin its digest: FROM public.ecr.aws/lambda/python:3.11@sha256:<digest>
FROM public.ecr.aws/lambda/python:3.11

# Install the package (and its pinned-by-range dependencies) into the image's site-packages,
# /var/lang/lib/python3.11/site-packages: the Lambda runtime imports the handler from there and
# the `nyc-collisions` console script lands on PATH (/var/lang/bin). gcc compiles the native
# JSON -> CSV converter (src/nyc_collisions/_jsoncsv.c; the image has the Python headers) and is
# removed in the same layer; the build fails if the converter did not compile.
WORKDIR /tmp/build
COPY pyproject.toml README.md ./
COPY src/ ./src/
# hadolint ignore=DL3033
RUN yum install -y gcc \
    && pip install --no-cache-dir . \
    && python -c "import nyc_collisions._jsoncsv" \
    && yum remove -y gcc && yum clean all \
    && rm -rf /var/cache/yum /tmp/build

# numpy (loaded by pyarrow) would start an OpenBLAS thread per core that spins beside the
# workers; nothing here uses BLAS (the `nyc-collisions` command sets the same default).
ENV OPENBLAS_NUM_THREADS=1

WORKDIR ${LAMBDA_TASK_ROOT}
CMD ["nyc_collisions.aws.handler"]
