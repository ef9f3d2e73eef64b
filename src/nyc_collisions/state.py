"""What is committed at a destination: the manifest (the commit point), runs in progress, the
watermark and the lock.

Layout below `<dest>/<dataset>/`::

    manifest.json                      the commit point: every committed batch and its files
    data/<batch_id>/part-PPPP-SSSSSS.<fmt>   data files (immutable once written)
    runs/<batch_id>/plan.json          a backfill in progress: its partitions
    runs/<batch_id>/parts/PPPP-SSSSSS.json   one record per finished data file of that run
    lock.json                          the lease of the run that writes this dataset

Readers trust only what `manifest.json` names. A batch's files are complete before the manifest
that names them is written; the watermark lives in the manifest, so both move in one atomic write.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .errors import DestinationBusy, StateError
from .sink.files import FileEntry
from .sink.storage import Storage

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
LOCK_TTL_SECONDS = 120.0


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_batch_id(kind: str) -> str:
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{kind}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Watermark:
    """The position of the last change landed: rows past (`updated_at`, `row_id`) are new.

    `row_id=None` means every row at `updated_at` is landed (strictly later rows are new).
    """

    updated_at: str
    row_id: str | None = None


@dataclass
class Batch:
    batch_id: str
    kind: str  # "snapshot" | "update" | "tombstones"
    format: str
    committed_at: str
    files: list[FileEntry]
    rows: int
    source_count: int | None = None
    watermark: Watermark | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Batch:
        wm = d.get("watermark")
        return cls(
            batch_id=d["batch_id"],
            kind=d["kind"],
            format=d["format"],
            committed_at=d["committed_at"],
            files=[FileEntry(**f) for f in d["files"]],
            rows=d["rows"],
            source_count=d.get("source_count"),
            watermark=Watermark(**wm) if wm else None,
            info=d.get("info", {}),
        )


@dataclass
class Manifest:
    dataset: str
    dataset_id: str
    key: str
    columns: list[dict[str, str]]
    batches: list[Batch] = field(default_factory=list)
    version: int = MANIFEST_VERSION
    updated: str = ""

    @property
    def watermark(self) -> Watermark | None:
        for batch in reversed(self.batches):
            if batch.watermark is not None:
                return batch.watermark
        return None

    def current_batches(self) -> list[Batch]:
        """The latest snapshot and every batch after it: what the current state is made of."""
        for i in range(len(self.batches) - 1, -1, -1):
            if self.batches[i].kind == "snapshot":
                return self.batches[i:]
        return []

    def to_bytes(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        folder = where.rsplit("/", 1)[0]
        way_out = (
            f"restore it from a copy (S3 versioning keeps earlier ones), or move {folder} "
            "aside and backfill again"
        )
        try:
            d = orjson.loads(data)
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, not an object")
            if d.get("version") != MANIFEST_VERSION:
                raise StateError(f"{where}: manifest version {d.get('version')} is not supported")
            return cls(
                dataset=d["dataset"],
                dataset_id=d["dataset_id"],
                key=d["key"],
                columns=d["columns"],
                batches=[Batch.from_dict(b) for b in d["batches"]],
                version=d["version"],
                updated=d.get("updated", ""),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateError(f"{where}: manifest unreadable ({exc}); {way_out}") from exc


class DatasetState:
    """The committed state of one dataset at a destination, and the keys of its objects."""

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage = storage
        self.folder = folder

    @property
    def manifest_key(self) -> str:
        return f"{self.folder}/manifest.json"

    def data_key(self, batch_id: str, partition: int, seq: int, fmt: str) -> str:
        return f"{self.folder}/data/{batch_id}/part-{partition:04d}-{seq:06d}.{fmt}"

    def run_prefix(self, batch_id: str) -> str:
        return f"{self.folder}/runs/{batch_id}"

    def load(self) -> Manifest | None:
        data = self.storage.get_bytes(self.manifest_key)
        if data is None:
            return None
        return Manifest.from_bytes(data, f"{self.storage.url}/{self.manifest_key}")

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest whole (atomic rename locally, one PUT on S3): the commit point."""
        manifest.updated = utc_now()
        self.storage.put_bytes(self.manifest_key, manifest.to_bytes())

    # -- runs in progress ------------------------------------------------------------------
    def unfinished_runs(self) -> list[str]:
        """Batch ids of runs with a plan that no manifest names (killed or interrupted runs)."""
        keys = self.storage.list_keys(f"{self.folder}/runs/")
        ids = sorted({k.split("/")[-2] for k in keys if k.endswith("/plan.json")})
        manifest = self.load()
        committed = {b.batch_id for b in manifest.batches} if manifest else set()
        return [i for i in ids if i not in committed]

    def put_json(self, key: str, doc: dict[str, Any]) -> None:
        self.storage.put_bytes(key, orjson.dumps(doc, option=orjson.OPT_INDENT_2))

    def get_json(self, key: str) -> dict[str, Any] | None:
        data = self.storage.get_bytes(key)
        if data is None:
            return None
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise StateError(f"{self.storage.url}/{key}: unreadable: {exc}") from exc
        if not isinstance(doc, dict):
            raise StateError(f"{self.storage.url}/{key}: not a JSON object")
        return doc

    def drop_run(self, batch_id: str) -> None:
        self.storage.delete(self.storage.list_keys(self.run_prefix(batch_id) + "/"))

    def uncommitted_data(self, manifest: Manifest | None, keep_runs: set[str]) -> list[str]:
        """Data files no manifest names and no live run owns: leftovers of killed runs."""
        named = {f.path for b in (manifest.batches if manifest else []) for f in b.files}
        out = []
        for key in self.storage.list_keys(f"{self.folder}/data/"):
            batch_id = key.split("/")[-2]
            if key not in named and batch_id not in keep_runs:
                out.append(key)
        return out

    # -- the lock ---------------------------------------------------------------------------
    @property
    def lock_key(self) -> str:
        return f"{self.folder}/lock.json"

    def lease(self, command: str) -> Lease:
        return Lease(self, command)

    def acquire(self, command: str) -> str:
        """Take the dataset's lease, or raise `DestinationBusy` while another run holds it.

        The lease is created with a conditional write (create-if-absent), so two runs cannot
        both take it. A lease whose holder is dead may be taken over: one past its expiry (its
        holder stopped renewing it), or one held by a process of this machine that is gone.
        """
        token = uuid.uuid4().hex
        body = orjson.dumps(self._lease_doc(token, command))
        if self.storage.put_bytes(self.lock_key, body, if_absent=True):
            return token
        held = self.get_json(self.lock_key) or {}
        if not _holder_is_dead(held):
            raise DestinationBusy(
                f"{self.storage.url}/{self.folder}: another run holds the lock "
                f"({held.get('command')} on {held.get('host')} pid {held.get('pid')} "
                f"since {held.get('since')}); wait for it to end"
            )
        logger.warning(
            "%s: taking over the lock of a dead run (%s pid %s)",
            self.folder,
            held.get("host"),
            held.get("pid"),
        )
        self.storage.delete([self.lock_key])
        if self.storage.put_bytes(self.lock_key, body, if_absent=True):
            return token
        raise DestinationBusy(f"{self.storage.url}/{self.folder}: another run took the lock")

    def _lease_doc(self, token: str, command: str) -> dict[str, Any]:
        return {
            "token": token,
            "command": command,
            "host": socket.gethostname(),
            "boot": _boot_id(),
            "pid": os.getpid(),
            "user": _user(),
            "since": utc_now(),
            "expires": time.time() + LOCK_TTL_SECONDS,
        }

    def renew(self, token: str) -> None:
        held = self.get_json(self.lock_key) or {}
        if held.get("token") != token:
            raise DestinationBusy(f"{self.storage.url}/{self.folder}: lost the lock")
        held["expires"] = time.time() + LOCK_TTL_SECONDS
        self.storage.put_bytes(self.lock_key, orjson.dumps(held))

    def release(self, token: str) -> None:
        held = self.get_json(self.lock_key) or {}
        if held.get("token") == token:
            self.storage.delete([self.lock_key])


class Lease:
    """Holds a dataset's lock for a `with` block, renewing it in the background."""

    def __init__(self, state: DatasetState, command: str) -> None:
        self.state = state
        self.command = command
        self.token = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Lease:
        self.token = self.state.acquire(self.command)
        self._thread = threading.Thread(target=self._renew, daemon=True, name="lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(LOCK_TTL_SECONDS / 4):
            try:
                self.state.renew(self.token)
            except Exception as exc:
                logger.warning("%s: could not renew the lock: %s", self.state.folder, exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.state.release(self.token)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _holder_is_dead(held: dict[str, Any]) -> bool:
    if float(held.get("expires", 0)) < time.time():
        return True
    if held.get("host") == socket.gethostname() and held.get("boot") == _boot_id():
        try:
            os.kill(int(held.get("pid", 0)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, OverflowError):
            return False
    return False


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "?"
