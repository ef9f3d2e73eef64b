"""Storage behind one small interface: a local folder or an S3 prefix.

Keys are relative, `/`-separated paths below the destination root. Writers make a file visible
only when it is complete: a local file is written under a temporary name and renamed; an S3 object
is a multipart upload (parts sent in the background while rows keep arriving) that is completed on
`close()` and aborted on `abort()`. Small metadata objects (manifests, plans) are written whole.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

from ..errors import DestinationError, UsageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

logger = logging.getLogger(__name__)

DEFAULT_LOCAL_DEST = "./nyc-collisions-data"
PART_SIZE = 8 * 1024 * 1024
PARTS_IN_FLIGHT = 4
READ_AHEAD = 8 * 1024 * 1024
MIN_FREE_BYTES = 64 * 1024 * 1024


class Writer(Protocol):
    """A binary, write-only file whose content becomes visible at `close()`."""

    def write(self, data: bytes | memoryview) -> int: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def bytes_written(self) -> int: ...


class Storage(Protocol):
    url: str

    def open_writer(self, key: str) -> Writer: ...
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool: ...
    def get_bytes(self, key: str) -> bytes | None: ...
    def open_reader(self, key: str) -> IO[bytes]: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def delete(self, keys: list[str]) -> None: ...
    def check_writable(self) -> None: ...
    def cleanup_uploads(self, prefix: str) -> int: ...
    def discard_if_empty(self) -> None: ...


def open_storage(dest: str) -> Storage:
    """`s3://bucket/prefix` or a local path (`file://` allowed)."""
    if not dest or not dest.strip():
        raise UsageError("--dest is empty")
    if "://" in dest:
        parsed = urlparse(dest)
        if parsed.scheme == "s3":
            if not parsed.netloc or parsed.query or parsed.fragment:
                raise UsageError(f"--dest {dest!r} is not s3://bucket/prefix")
            return S3Storage(parsed.netloc, parsed.path.strip("/"))
        if parsed.scheme == "file":
            return LocalStorage(Path(parsed.path))
        raise UsageError(f"--dest {dest!r}: use s3://bucket/prefix or a local folder")
    return LocalStorage(Path(dest))


# -- local folder ---------------------------------------------------------------------------


def _disk_error(path: Path | str, exc: OSError) -> DestinationError:
    if exc.errno == errno.ENOSPC:
        return DestinationError(f"{path}: no space left on device")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DestinationError(f"{path}: not writable ({exc.strerror})")
    return DestinationError(f"{path}: {exc.strerror or exc}")


class _LocalWriter:
    def __init__(self, final: Path, make_folder: Callable[[Path], None]) -> None:
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            make_folder(final.parent)
            self._file: IO[bytes] = open(self._tmp, "wb", buffering=1 << 20)  # noqa: SIM115
        except OSError as exc:
            raise _disk_error(final, exc) from exc
        self.bytes_written = 0
        self.closed = False
        self._aborted = False

    def write(self, data: bytes | memoryview) -> int:
        if self._aborted:  # an encoder closing after an abort (e.g. at garbage collection)
            return len(data)
        try:
            n = self._file.write(data)
        except OSError as exc:
            self.abort()
            raise _disk_error(self._final, exc) from exc
        self.bytes_written += n
        return n

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self._final)
        except OSError as exc:
            self.abort()
            raise _disk_error(self._final, exc) from exc
        self.closed = True

    def abort(self) -> None:
        self.closed = self._aborted = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self._tmp.unlink()


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()
        self.url = str(self.root)
        self._made: set[Path] = set()  # folders this run created (removed again if left empty)
        self._made_lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.root / key

    def _make_folder(self, folder: Path) -> None:
        """`mkdir -p`, remembering which folders did not exist before."""
        missing = []
        parent = folder
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        folder.mkdir(parents=True, exist_ok=True)
        with self._made_lock:
            self._made.update(missing)

    def open_writer(self, key: str) -> Writer:
        return _LocalWriter(self._path(key), self._make_folder)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        if if_absent:
            try:
                self._make_folder(path.parent)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except OSError as exc:
                raise _disk_error(path, exc) from exc
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        writer = _LocalWriter(path, self._make_folder)
        writer.write(data)
        writer.close()
        return True

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _disk_error(self._path(key), exc) from exc

    def open_reader(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except OSError as exc:
            raise _disk_error(self._path(key), exc) from exc

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = Path(dirpath) / name
                out.append(full.relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()

    def check_writable(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise DestinationError(f"{self.root}: exists and is not a folder")
        probe = self.root / f".write-test-{uuid.uuid4().hex[:8]}"
        try:
            self._make_folder(self.root)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise _disk_error(self.root, exc) from exc
        free = shutil.disk_usage(self.root).free
        if free < MIN_FREE_BYTES:
            raise DestinationError(f"{self.root}: only {free // 1024} KiB free on the disk")

    def discard_if_empty(self) -> None:
        """Remove the folders this run created that hold no file, deepest first: a run that
        failed before landing anything leaves nothing behind, in a new destination folder or in
        one that already existed (its lock's folders are empty once the lock is released)."""
        with self._made_lock:
            made = sorted(self._made, key=lambda folder: len(folder.parts), reverse=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only ever removes an empty folder

    def cleanup_uploads(self, prefix: str) -> int:
        """Remove temporary files left by killed runs."""
        stale = [
            k for k in self.list_keys(prefix) if Path(k).name.startswith(".") and k.endswith(".tmp")
        ]
        self.delete(stale)
        return len(stale)


# -- S3 -------------------------------------------------------------------------------------


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

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_writer(self, key: str) -> Writer:
        return _S3Writer(self, key)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        from botocore.exceptions import ClientError

        extra: dict[str, Any] = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.full_key(key), Body=data, **extra)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if if_absent and code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise _s3_error(f"s3://{self.bucket}/{self.full_key(key)}", exc) from exc
        except Exception as exc:
            raise _s3_error(f"s3://{self.bucket}/{self.full_key(key)}", exc) from exc
        return True

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
