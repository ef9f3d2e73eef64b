"""An S3 prefix as storage (the interface is in `storage.py`).

Data files stream as multipart uploads whose parts go up in the background while rows keep
arriving (`s3_transfer.py`). Conditional writes are S3's own: `If-None-Match: *` (create only
if absent) and `If-Match: <etag>` on PutObject and DeleteObject; a store that ignores them is
refused up front (`check_conditional`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
import uuid
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import IO, TYPE_CHECKING

from ..errors import DestinationError
from .s3_transfer import (
    PARTS_IN_FLIGHT,
    S3Reader,
    S3Writer,
    UploadStats,
    back_off,
    code_of,
    new_session,
    s3_client,
    s3_error,
    transient,
)
from .storage import Versioned, Writer

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

logger = logging.getLogger(__name__)

# What S3 answers when a conditional write's condition fails: 412, or 409 when another
# conditional write to the key is in flight; 404 for If-Match on a key that is gone
_CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
_GONE = ("NoSuchKey", "404")
# What a store that does not implement conditional writes answers to them
_NOT_IMPLEMENTED = ("NotImplemented", "501")
PUT_IF_ATTEMPTS = 8  # as boto3's own retries would, but each after a look at the lease


class S3Storage:
    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        session = new_session()
        self.client = s3_client(session=session)
        # the lease's, the manifest's and a run's records' writes
        self.guarded = s3_client(4, guarded=True, session=session)
        # Parts in flight, all writers together: bounds the memory of parts not yet sent
        self.part_slots = threading.BoundedSemaphore(PARTS_IN_FLIGHT)
        self.stats = UploadStats()
        self._conditional_ok = False

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_writer(self, key: str) -> Writer:
        return S3Writer(self, key)

    def where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def put_bytes(self, key: str, data: bytes, *, check: Callable[[], None] | None = None) -> None:
        client = self.client if check is None else self.guarded
        put = functools.partial(
            client.put_object, Bucket=self.bucket, Key=self.full_key(key), Body=data
        )
        self._send(self.where(key), put, check)

    def _send(
        self, where: str, send: Callable[[], object], check: Callable[[], None] | None
    ) -> object:
        """`send` once (boto3 retries it), or with `check`, a call on the guarded client (one
        attempt, short timeouts) after `check()`; again after a transient failure, each time
        after a fresh `check()`: nothing is sent once the lease is lost, not even by a
        library's retry minutes later (see `put_if`). Returns what `send` returned."""
        if check is None:
            try:
                return send()
            except Exception as exc:
                raise s3_error(where, exc) from exc
        failed: Exception | None = None
        for attempt in range(PUT_IF_ATTEMPTS):
            back_off(attempt)
            check()
            try:
                return send()
            except Exception as exc:
                if not transient(exc):
                    raise s3_error(where, exc) from exc
                failed = exc
        assert failed is not None
        raise s3_error(where, failed) from failed

    def get_bytes(self, key: str) -> bytes | None:
        got = self.get_versioned(key)
        return None if got is None else got.data

    def _listed(self, key: str) -> bool:
        full = self.full_key(key)
        try:
            got = self.client.list_objects_v2(Bucket=self.bucket, Prefix=full, MaxKeys=1)
        except Exception as exc:
            raise s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return any(o["Key"] == full for o in got.get("Contents", []))

    def open_reader(self, key: str) -> IO[bytes]:
        full = self.full_key(key)
        try:
            size = self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]
        except Exception as exc:
            raise s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return io.BufferedReader(S3Reader(self.client, self.bucket, full, size), 1 << 20)

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
            raise s3_error(f"s3://{self.bucket}/{full}", exc) from exc
        return sorted(out)

    def delete(self, keys: list[str], *, check: Callable[[], None] | None = None) -> None:
        for start in range(0, len(keys), 1000):
            self._delete_chunk([self.full_key(k) for k in keys[start : start + 1000]], check)

    def _delete_chunk(self, full: list[str], check: Callable[[], None] | None) -> None:
        """Delete up to 1,000 keys in one `DeleteObjects`, which answers 200 even when keys were
        not deleted (a role without `s3:DeleteObject`: `AccessDenied` for each): each key's error
        is an error here, and the keys S3 was too busy for are sent again."""
        from botocore.exceptions import ClientError

        client = self.client if check is None else self.guarded
        for attempt in range(PUT_IF_ATTEMPTS):
            back_off(attempt)
            objects: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in full]
            send = functools.partial(
                client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": objects, "Quiet": True},
            )
            answer = self._send(f"s3://{self.bucket}/{self.prefix}", send, check)
            errors = (answer.get("Errors") if isinstance(answer, dict) else None) or []
            refused = [
                (
                    str(e.get("Key", "")),
                    ClientError(
                        {"Error": {"Code": str(e.get("Code")), "Message": str(e.get("Message"))}},
                        "DeleteObjects",
                    ),
                )
                for e in errors
            ]
            if not refused:
                return
            key, exc = next(((k, x) for k, x in refused if not transient(x)), refused[0])
            if not transient(exc) or attempt == PUT_IF_ATTEMPTS - 1:
                error = s3_error(f"s3://{self.bucket}/{key}", exc)
                more = len(refused) - 1
                also = f" (and {more} more keys not deleted)" if more else ""
                raise DestinationError(f"{error}{also}") from None
            full = [k for k, _ in refused]

    def check_writable(self) -> None:
        """The bucket exists and we may list, write and delete below the prefix.

        Only prefix-scoped calls: a least-privilege role (ListBucket limited to the prefix) is
        denied `HeadBucket`, which S3 authorises as an unconditioned ListBucket.
        """
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.full_key(""), MaxKeys=1)
        except Exception as exc:
            raise s3_error(f"s3://{self.bucket}/{self.prefix}", exc) from exc
        probe = f".write-test-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"ok")
        self.delete([probe])

    def discard_if_empty(self) -> None:
        """Nothing to do: S3 has no folders, only the objects a run wrote and deleted."""

    def cleanup_uploads(self, prefix: str, *, check: Callable[[], None] | None = None) -> int:
        """Abort multipart uploads left by killed runs below `prefix` (they are never read);
        with `check`, each abort as `delete` sends it."""
        full = self.full_key(prefix)
        where = f"s3://{self.bucket}/{full}"
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=full
            )
            uploads = [u for page in pages for u in page.get("Uploads", [])]
        except Exception as exc:
            raise s3_error(where, exc) from exc
        client = self.client if check is None else self.guarded
        for upload in uploads:
            abort = functools.partial(
                client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=upload["Key"],
                UploadId=upload["UploadId"],
            )
            self._send(where, abort, check)
        return len(uploads)

    # -- conditional writes ---------------------------------------------------------------------
    def get_versioned(self, key: str, *, with_age: bool = False) -> Versioned | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
            data = obj["Body"].read()
        except ClientError as exc:
            code = code_of(exc)
            if code in _GONE or (code in ("AccessDenied", "403") and not self._listed(key)):
                return None
            raise s3_error(self.where(key), exc) from exc
        except Exception as exc:
            raise s3_error(self.where(key), exc) from exc
        age = None
        date = obj["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        if with_age and date and obj.get("LastModified"):
            # both by S3's clock: when it answered, and when the object was written
            with contextlib.suppress(TypeError, ValueError):
                age = max(0.0, (parsedate_to_datetime(date) - obj["LastModified"]).total_seconds())
        return Versioned(data, str(obj["ETag"]), age)

    def put_if(
        self,
        key: str,
        data: bytes,
        *,
        expect: str | None,
        check: Callable[[], None] | None = None,
    ) -> str | None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        failed: Exception | None = None
        for attempt in range(PUT_IF_ATTEMPTS):
            back_off(attempt)
            if check is not None:
                check()
            try:  # one attempt, sent now (`s3_client(guarded=True)`)
                put = self.guarded.put_object(
                    Bucket=self.bucket,
                    Key=self.full_key(key),
                    Body=data,
                    **condition,  # type: ignore[arg-type]
                )
                return str(put["ETag"])
            except ClientError as exc:
                code = code_of(exc)
                if code in _NOT_IMPLEMENTED:
                    raise self._unconditional() from exc
                if transient(exc):
                    failed = exc
                    continue
                if code not in _CONDITION_FAILED and not (expect is not None and code in _GONE):
                    raise s3_error(self.where(key), exc) from exc
            except Exception as exc:
                if not transient(exc):
                    raise s3_error(self.where(key), exc) from exc
                failed = exc  # (it may have landed: the next attempt's condition then fails)
                continue
            now = self.get_versioned(key)
            if now is not None and now.data == data:
                return now.version  # a retried request whose first attempt had landed
            if (None if now is None else now.version) != expect:
                return None
            # 409: another conditional write to the key was in flight, and it did not land
            failed = None
        if failed is not None:
            raise s3_error(self.where(key), failed) from failed
        return None

    def delete_if(self, key: str, *, expect: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key), IfMatch=expect)
        except ClientError as exc:
            code = code_of(exc)
            if code in _CONDITION_FAILED or code in _GONE:
                return False
            if code not in _NOT_IMPLEMENTED:
                raise s3_error(self.where(key), exc) from exc
            # a store without conditional deletes: compare, then delete
            now = self.get_versioned(key)
            if now is None or now.version != expect:
                return False
            self.delete([key])
        except Exception as exc:
            raise s3_error(self.where(key), exc) from exc
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


__all__ = ["S3Storage", "UploadStats", "s3_client"]
