"""Moving bytes to and from S3: objects stream up as multipart uploads whose parts go up in
the background while rows keep arriving, and are read back by ranged GETs with read-ahead."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import random
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..daemon import DaemonCalls
from ..errors import DestinationError, UsageError

if TYPE_CHECKING:
    from boto3.session import Session
    from mypy_boto3_s3 import S3Client

    from .s3 import S3Storage

PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 4
READ_AHEAD = 8 * 1024 * 1024
ABORT_WAIT = 2.0  # seconds an aborted upload waits for its parts in flight
READ_ATTEMPTS = 5  # a ranged read whose body breaks off is fetched again this many times in all


_LOADER_LOCK = threading.Lock()


@functools.cache
def _service_models() -> Any:
    """botocore's loader of service models, one for the process: a session of its own would
    read and parse S3's model again for each storage opened (each warm Lambda invocation,
    each command of a test run)."""
    import botocore.session
    from botocore.loaders import create_loader

    return create_loader(botocore.session.get_session().get_config_variable("data_path"))


def new_session() -> Session:
    """A boto3 session that resolves credentials afresh and shares the loaded service models."""
    import boto3
    import botocore.session

    with _LOADER_LOCK:  # one loader, made once; boto3 adds its data folder at each session
        loader = _service_models()
        core = botocore.session.get_session()
        core.register_component("data_loader", loader)
        session = boto3.session.Session(botocore_session=core)
        loader.search_paths[:] = list(dict.fromkeys(loader.search_paths))
    return session


def s3_client(
    max_pool: int = 32, *, guarded: bool = False, session: Session | None = None
) -> S3Client:
    """A boto3 S3 client from the standard credential chain; honours AWS_ENDPOINT_URL(_S3).

    `guarded`: for the conditional writes of the lease and the manifest, one attempt per call
    and short timeouts, so that no request of a run goes out after it last made sure of its
    lease (boto3's own retries would send it again minutes later); `S3Storage.put_if` retries.
    """
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1}
        if guarded
        else {"mode": "adaptive", "max_attempts": 10},
        max_pool_connections=max_pool,
        connect_timeout=5 if guarded else 10,
        read_timeout=GUARDED_READ_TIMEOUT if guarded else 120,
    )
    try:
        # clients of one session share its loaded service models (12 MiB a client less)
        return (session or new_session()).client("s3", config=config)
    except ValueError as exc:  # botocore's "Invalid endpoint: ...", an invalid region
        raise UsageError(
            f"the S3 client's settings are not valid ({exc}): check AWS_ENDPOINT_URL (or "
            "AWS_ENDPOINT_URL_S3), AWS_REGION (or AWS_DEFAULT_REGION) and the profile"
        ) from None


GUARDED_READ_TIMEOUT = 20  # seconds: well under a quarter of the lease's default TTL (lease.py)
# S3's answers worth another attempt (as boto3 retries them), besides timeouts and resets
_TRANSIENT = (
    "500",
    "502",
    "503",
    "504",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
)


def back_off(attempt: int) -> None:
    """Before an attempt of our own at an S3 call: none before the first, then exponential with
    jitter."""
    if attempt:
        time.sleep(random.uniform(0.5, 1.0) * min(8.0, 0.25 * 2**attempt))


def transient(exc: Exception) -> bool:
    """Whether a failed S3 call is worth another attempt."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as S3ConnectionError

    if isinstance(exc, ClientError):
        return code_of(exc) in _TRANSIENT
    return isinstance(exc, S3ConnectionError | HTTPClientError)


def s3_error(where: str, exc: Exception) -> DestinationError:
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return DestinationError(
            f"{where}: no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY, or run where an IAM role is available)"
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code == "NoSuchBucket":
            return DestinationError(f"{where}: the bucket does not exist")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
            return DestinationError(
                f"{where}: S3 refused the AWS credentials ({code}); check AWS_PROFILE or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
            )
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return DestinationError(f"{where}: access denied ({code})")
        if code in (
            "PermanentRedirect",
            "301",
            "AuthorizationHeaderMalformed",
            "IllegalLocationConstraintException",
        ):
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            region = err.get("Region") or headers.get("x-amz-bucket-region") or "?"
            return DestinationError(
                f"{where}: the bucket is in another region ({region}); "
                f"set AWS_DEFAULT_REGION={region}"
            )
        return DestinationError(f"{where}: S3 error {code}: {err.get('Message', '')}")
    return DestinationError(f"{where}: {type(exc).__name__}: {exc}")


def code_of(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class UploadStats:
    """Where S3 time went: uploading (in background threads) and waiting for it (in workers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.objects = 0
        self.parts = 0
        self.bytes = 0
        self.upload_seconds = 0.0
        self.wait_seconds = 0.0

    def uploaded(self, nbytes: int, seconds: float, part: bool) -> None:
        with self._lock:
            self.bytes += nbytes
            self.upload_seconds += seconds
            self.parts += part

    def waited(self, seconds: float) -> None:
        with self._lock:
            self.wait_seconds += seconds

    def completed(self) -> None:
        with self._lock:
            self.objects += 1


class S3Writer:
    """Streams an object to S3: multipart once it passes one part, parts uploaded in background."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._stats = storage.stats
        self._s3 = storage.client
        self._bucket = storage.bucket
        self._key = storage.full_key(key)
        self._where = f"s3://{self._bucket}/{self._key}"
        self._buffer = io.BytesIO()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        # each part on a daemon thread (`part_slots` bounds them): a stop never waits for a
        # part S3 holds, not even at the interpreter's exit
        self._pool = DaemonCalls("s3-part")
        self._slots = storage.part_slots
        self.bytes_written = 0
        self.closed = False
        self._aborted = False

    def write(self, data: bytes | memoryview) -> int:
        if self._aborted:  # an encoder closing after an abort (e.g. at garbage collection)
            return len(data)
        self._buffer.write(data)
        self.bytes_written += len(data)
        if self._buffer.tell() >= PART_SIZE:
            self._send_part()
        return len(data)

    def flush(self) -> None:
        pass

    def _send_part(self) -> None:
        data = self._buffer.getvalue()
        self._buffer = io.BytesIO()
        try:
            if self._upload_id is None:
                created = self._s3.create_multipart_upload(Bucket=self._bucket, Key=self._key)
                self._upload_id = created["UploadId"]
        except Exception as exc:
            raise s3_error(self._where, exc) from exc
        number = len(self._parts) + 1
        started = time.monotonic()
        self._slots.acquire()
        self._stats.waited(time.monotonic() - started)
        try:
            self._parts.append(self._pool.submit(self._upload_part, number, data))
        except BaseException:  # no thread to give the slot back (the interpreter's exit)
            self._slots.release()
            raise

    def _upload_part(self, number: int, data: bytes) -> dict[str, Any]:
        started = time.monotonic()
        try:
            assert self._upload_id is not None
            result = self._s3.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
            )
            self._stats.uploaded(len(data), time.monotonic() - started, part=True)
            return {"PartNumber": number, "ETag": result["ETag"]}
        finally:
            self._slots.release()

    def close(self) -> None:
        if self.closed:
            return
        started = time.monotonic()
        try:
            if self._upload_id is None:
                body = self._buffer.getvalue()
                self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=body)
                self._stats.uploaded(len(body), time.monotonic() - started, part=False)
            else:
                if self._buffer.tell() or not self._parts:
                    self._send_part()
                parts = [f.result() for f in self._parts]
                self._s3.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
            self._stats.completed()
            self._stats.waited(time.monotonic() - started)
        except DestinationError:
            self.abort()
            raise
        except Exception as exc:
            self.abort()
            raise s3_error(self._where, exc) from exc
        self.closed = True

    def abort(self) -> None:
        self.closed = self._aborted = True
        # parts in flight have a moment to end; one S3 holds is left behind (the upload is
        # aborted under it, and the next run's cleanup aborts what a late part leaves)
        concurrent.futures.wait(self._parts, timeout=ABORT_WAIT)
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )


class S3Reader(io.RawIOBase):
    """A seekable reader over ranged GETs with read-ahead (pyarrow's Parquet reader seeks)."""

    def __init__(self, client: S3Client, bucket: str, key: str, size: int) -> None:
        self._s3 = client
        self._bucket = bucket
        self._key = key
        self._size = size
        self._pos = 0
        self._buf = b""
        self._buf_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        want = min(len(b), self._size - self._pos)
        if want <= 0:
            return 0
        end_of_buf = self._buf_start + len(self._buf)
        if not (self._buf_start <= self._pos and self._pos + want <= end_of_buf):
            length = max(want, READ_AHEAD)
            last = min(self._size, self._pos + length) - 1
            self._buf = self._get_range(self._pos, last)
            self._buf_start = self._pos
        start = self._pos - self._buf_start
        data = self._buf[start : start + want]
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def _get_range(self, first: int, last: int) -> bytes:
        """Bytes `first`..`last`, fetched again when the body breaks off while it is read
        (boto3 retries a request that fails, not a body that fails after its answer began)."""
        from botocore.exceptions import IncompleteReadError

        where = f"s3://{self._bucket}/{self._key}"
        failed: Exception | None = None
        for attempt in range(READ_ATTEMPTS):
            back_off(attempt)
            try:
                obj = self._s3.get_object(
                    Bucket=self._bucket, Key=self._key, Range=f"bytes={first}-{last}"
                )
                data: bytes = obj["Body"].read()
            except Exception as exc:
                if not (transient(exc) or isinstance(exc, IncompleteReadError)):
                    raise s3_error(where, exc) from exc
                failed = exc
                continue
            if len(data) == last - first + 1:
                return data
            failed = DestinationError(f"{len(data)} bytes of {last - first + 1}")
        assert failed is not None
        raise s3_error(where, failed) from failed
