"""An S3 prefix as storage (the interface is in `storage.py`).

Data files stream as multipart uploads whose parts go up in the background while rows keep
arriving. Conditional writes are S3's own: `If-None-Match: *` (create only if absent) and
`If-Match: <etag>` on PutObject and DeleteObject; a store that ignores them is refused up front
(`check_conditional`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from typing import IO, TYPE_CHECKING, Any

from ..errors import DestinationError
from .storage import Versioned, Writer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 4
READ_AHEAD = 8 * 1024 * 1024
# What S3 answers when a conditional write's condition fails: 412, or 409 when another
# conditional write to the key is in flight; 404 for If-Match on a key that is gone
_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_GONE = ("NoSuchKey", "404")
# What a store that does not implement conditional writes answers to them
_NOT_IMPLEMENTED = ("NotImplemented", "501")


def s3_client(max_pool: int = 32) -> S3Client:
    """A boto3 S3 client from the standard credential chain; honours AWS_ENDPOINT_URL(_S3)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "adaptive", "max_attempts": 10},
        max_pool_connections=max_pool,
        connect_timeout=10,
        read_timeout=120,
    )
    return boto3.session.Session().client("s3", config=config)


def _s3_error(where: str, exc: Exception) -> DestinationError:
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


def _code(exc: Any) -> str:
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


class _S3Writer:
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
        self._pool = storage.upload_pool
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
            raise _s3_error(self._where, exc) from exc
        number = len(self._parts) + 1
        started = time.monotonic()
        self._slots.acquire()
        self._stats.waited(time.monotonic() - started)
        self._parts.append(self._pool.submit(self._upload_part, number, data))

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
            raise _s3_error(self._where, exc) from exc
        self.closed = True

    def abort(self) -> None:
        self.closed = self._aborted = True
        for f in self._parts:
            with contextlib.suppress(Exception):
                f.result()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._s3.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )


class S3Storage:
    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self.client = s3_client()
        self.upload_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-upload")
        # Parts in flight, all writers together: bounds the memory of parts not yet sent
        self.part_slots = threading.BoundedSemaphore(PARTS_IN_FLIGHT)
        self.stats = UploadStats()
        self._conditional_ok = False

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_writer(self, key: str) -> Writer:
        return _S3Writer(self, key)

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def put_bytes(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data)
        except Exception as exc:
            raise _s3_error(self.where(key), exc) from exc

    def get_bytes(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            return obj["Body"].read()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404"):
                return None
            if code in ("AccessDenied", "403") and not self._listed(key):
                # without an unconditioned ListBucket, S3 answers 403 for a missing key
                return None
            raise _s3_error(f"s3://{self.bucket}/{self.full_key(key)}", exc) from exc
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{self.full_key(key)}", exc) from exc

    def _listed(self, key: str) -> bool:
        full = self.full_key(key)
        try:
            got = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return any(o["Key"] == full for o in got.get("Contents", []))

    def open_reader(self, key: str) -> IO[bytes]:
        full = self.full_key(key)
        try:
            size = self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return io.BufferedReader(_S3Reader(self.client, self.bucket, full, size), 1 << 20)

    def list_keys(self, prefix: str) -> list[str]:
        full = self.full_key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        out: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                out.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return sorted(out)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self.full_key(k)} for k in chunk], "Quiet": True},
                )
            except Exception as exc:
                raise _s3_error(f"s3://{self.bucket}/{self.prefix}", exc) from exc

    def check_writable(self) -> None:
        """The bucket exists and we may list, write and delete below the prefix.

        Only prefix-scoped calls: a least-privilege role (ListBucket limited to the prefix) is
        denied `HeadBucket`, which S3 authorises as an unconditioned ListBucket.
        """
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.full_key(""), MaxKeys=1)
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{self.prefix}", exc) from exc
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"ok")
        self.delete([probe])

    def discard_if_empty(self) -> None:
        """Nothing to do: S3 has no folders, only the objects a run wrote and deleted."""

    def cleanup_uploads(self, prefix: str) -> int:
        """Abort multipart uploads left by killed runs below `prefix` (they are never read)."""
        full = self.full_key(prefix)
        n = 0
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full
            )
            for page in pages:
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    n += 1
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return n

    # -- conditional writes ---------------------------------------------------------------------
    def get_versioned(self, key: str, *, with_age: bool = False) -> Versioned | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            data = obj["Body"].read()
        except ClientError as exc:
            code = _code(exc)
            if code in _GONE or (code in ("AccessDenied", "403") and not self._listed(key)):
                return None
            raise _s3_error(self.where(key), exc) from exc
        except Exception as exc:
            raise _s3_error(self.where(key), exc) from exc
        age = None
        date = obj["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        if with_age and date and obj.get("LastModified"):
            # both by S3's clock: when it answered, and when the object was written
            with contextlib.suppress(TypeError, ValueError):
                age = max(0.0, (parsedate_to_datetime(date) - obj["LastModified"]).total_seconds())
        return Versioned(data, str(obj["ETag"]), age)

    def put_if(self, key: str, data: bytes, *, expect: str | None) -> str | None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        for _attempt in range(3):
            try:
                put = self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.full_key(key),
                    Body=data,
                    **condition,  # type: ignore[arg-type]
                )
                return str(put["ETag"])
            except ClientError as exc:
                code = _code(exc)
                if code in _NOT_IMPLEMENTED:
                    raise self._unconditional() from exc
                if code not in _CONDITION_FAILED and not (expect is not None and code in _GONE):
                    raise _s3_error(self.where(key), exc) from exc
            except Exception as exc:
                raise _s3_error(self.where(key), exc) from exc
            now = self.get_versioned(key)
            if now is not None and now.data == data:
                return now.version  # a retried request whose first attempt had landed
            if (None if now is None else now.version) != expect:
                return None
            # 409: another conditional write to the key was in flight, and it did not land
        return None

    def delete_if(self, key: str, *, expect: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key), IfMatch=expect)
        except ClientError as exc:
            code = _code(exc)
            if code in _CONDITION_FAILED or code in _GONE:
                return False
            if code not in _NOT_IMPLEMENTED:
                raise _s3_error(self.where(key), exc) from exc
            # a store without conditional deletes: compare, then delete
            now = self.get_versioned(key)
            if now is None or now.version != expect:
                return False
            self.delete([key])
        except Exception as exc:
            raise _s3_error(self.where(key), exc) from exc
        return True

    def _unconditional(self) -> DestinationError:
        return DestinationError(
            f"{self.url}: this store ignores conditional writes (If-None-Match / If-Match on "
            "PutObject); nyc-collisions needs them to keep two runs from writing at once: use "
            "Amazon S3 or a store that honours them"
        )

    def check_conditional(self) -> None:
        """Create a probe object with `If-None-Match: *` twice, and replace it with a wrong
        `If-Match`: the store must refuse both."""
        if self._conditional_ok:
            return
        probe = f".conditional-probe-{uuid.uuid4().hex[:8]}"
        try:
            first = self.put_if(probe, b"first", expect=None)
            again = self.put_if(probe, b"again", expect=None)
            stale = self.put_if(probe, b"stale", expect='"00000000000000000000000000000000"')
        finally:
            self.delete([probe])
        if first is None or again is not None or stale is not None:
            raise self._unconditional()
        self._conditional_ok = True


class _S3Reader(io.RawIOBase):
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
            obj = self._s3.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-{last}"
            )
            self._buf = obj["Body"].read()
            self._buf_start = self._pos
        start = self._pos - self._buf_start
        data = self._buf[start : start + want]
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)
