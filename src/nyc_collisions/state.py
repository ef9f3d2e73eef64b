"""What is committed at a destination, read and written: the manifest (the commit point, its
records in `manifest.py`), runs in progress and their part records.

Layout below `<dest>/<dataset>/`::

    manifest.json                      the commit point: every committed batch and its files
    data/<batch_id>/part-PPPP-SSSSSS.<fmt>   data files (immutable once written)
    runs/<batch_id>/plan.json          a backfill in progress: its partitions
    runs/<batch_id>/parts/PPPP-SSSSSS.json   one record per finished data file of that run
    lock.json                          the lease of the run that writes this dataset

Readers trust only what `manifest.json` names. A batch's files are complete before the manifest
that names them is written; the watermark lives in the manifest, so both move in one atomic write.
A commit is optimistic: it replaces the very version of the manifest the run read (a conditional
write), and only while the run holds the dataset's lease (`lease.py`); otherwise it stops with
`LeaseLost` or `ManifestChanged` and commits nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .errors import LeaseLost, ManifestChanged, StateError
from .manifest import Manifest, utc_now
from .sink.storage import Storage

if TYPE_CHECKING:
    from .lease import Lease

logger = logging.getLogger(__name__)


class DatasetState:
    """The committed state of one dataset at a destination, and the keys of its objects.

    `lease` is set while a run holds the dataset's lease; only then may it `commit`.
    """

    def __init__(self, storage: Storage, folder: str) -> None:
        self.storage = storage
        self.folder = folder
        self.lease: Lease | None = None
        self._run_writes = threading.Condition()  # guards `lease` against `put_run_json`
        self._writing = 0  # run records being written now
        # in every data file's name: a killed run's write still in flight (an S3 upload the
        # store completes after the process died) can never replace a later run's file
        self.attempt = uuid.uuid4().hex[:6]

    @property
    def manifest_key(self) -> str:
        return f"{self.folder}/manifest.json"

    def data_key(self, batch_id: str, partition: int, seq: int, fmt: str) -> str:
        return f"{self.folder}/data/{batch_id}/part-{partition:04d}-{seq:06d}-{self.attempt}.{fmt}"

    def run_prefix(self, batch_id: str) -> str:
        return f"{self.folder}/runs/{batch_id}"

    def load(self) -> Manifest | None:
        got = self.storage.get_versioned(self.manifest_key)
        if got is None:
            return None
        manifest = Manifest.from_bytes(got.data, f"{self.storage.url}/{self.manifest_key}")
        manifest.base = got.version
        return manifest

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest whole, only over the version it was read from (`manifest.base`;
        only if there is none when it is new) and only while this run holds the lease."""
        if self.lease is None:
            raise RuntimeError(f"{self.folder}: a commit without the dataset's lease")
        manifest.revision += 1
        manifest.updated = utc_now()
        version = None
        try:
            version = self.storage.put_if(
                self.manifest_key, manifest.to_bytes(), expect=manifest.base, check=self.lease.check
            )
        finally:
            if version is None:  # not written: another run committed, the lease lost, ...
                manifest.revision -= 1
        if version is None:
            raise ManifestChanged(
                f"{self.storage.url}/{self.manifest_key}: the manifest changed since this run "
                "read it (another run committed); this run stopped before committing more, "
                "run it again"
            )
        manifest.base = version

    # -- runs in progress ------------------------------------------------------------------
    def unfinished_runs(self, manifest: Manifest | None) -> list[str]:
        """Batch ids of runs with a plan that `manifest` (the dataset's, as the caller read it)
        does not name: killed or interrupted runs."""
        keys = self.storage.list_keys(f"{self.folder}/runs/")
        ids = sorted({k.split("/")[-2] for k in keys if k.endswith("/plan.json")})
        committed = {b.batch_id for b in manifest.batches} if manifest else set()
        return [i for i in ids if i not in committed]

    def put_run_json(self, key: str, doc: dict[str, Any]) -> None:
        """Write a run's record (its plan, a part record) only while it holds the lease: a
        worker still alive after Ctrl-C never writes over the records of a newer run."""
        with self._run_writes:
            lease = self.lease
            if lease is None:
                raise LeaseLost(f"{self.storage.url}/{key}: not written, the run has ended")
            self._writing += 1  # `end_run` waits for it from here on
        try:
            # the lease checked before every attempt (outside the lock: a renewal must not hold
            # up the other writers), and no attempt sent again after it (see `put_if`)
            self.put_json(key, doc, check=lease.check)
        finally:
            with self._run_writes:
                self._writing -= 1
                self._run_writes.notify_all()

    def put_part_record(self, run_id: str, record: PartRecord) -> None:
        """A part record of run `run_id` (a backfill's or a key scan's), under the lease."""
        key = f"{self.run_prefix(run_id)}/parts/{record.partition:04d}-{record.seq:06d}.json"
        self.put_run_json(key, record.to_dict())

    def end_run(self) -> None:
        """Before the lease is given back: no run record is written from now on, and those
        being written are done."""
        with self._run_writes:
            self.lease = None
            self._run_writes.wait_for(lambda: self._writing == 0)

    def put_json(
        self, key: str, doc: dict[str, Any], check: Callable[[], None] | None = None
    ) -> None:
        self.storage.put_bytes(key, orjson.dumps(doc, option=orjson.OPT_INDENT_2), check=check)

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
        """Delete a run's records: only while the lease is surely ours (a run that lost it must
        not drop the records the new holder resumes from)."""
        check = None if self.lease is None else self.lease.check
        if check is not None:
            check()
        self.storage.delete(self.storage.list_keys(self.run_prefix(batch_id) + "/"), check=check)

    def part_records(self, batch_id: str) -> list[PartRecord]:
        """The finished files of backfill run `batch_id`, in (partition, seq) order."""
        prefix = f"{self.run_prefix(batch_id)}/parts/"
        records = []
        for key in self.storage.list_keys(prefix):
            doc = self.get_json(key)
            if doc is not None:
                records.append(PartRecord.from_dict(doc, f"{self.storage.url}/{key}"))
        return sorted(records, key=lambda r: (r.partition, r.seq))


@dataclass(frozen=True)
class PartRecord:
    """One finished data file of a backfill run (`runs/<batch>/parts/PPPP-SSSSSS.json`), or the
    end of a partition that needed no more file (`path` None)."""

    partition: int
    seq: int
    done: bool
    path: str | None
    rows: int
    bytes: int
    last_id: str | None
    # the latest `:updated_at` of the rows its partition landed up to it ("" none; None unknown:
    # a record of an older version)
    latest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str) -> PartRecord:
        kinds: dict[str, Any] = {
            "partition": int,
            "seq": int,
            "done": bool,
            "path": str | None,
            "rows": int,
            "bytes": int,
            "last_id": str | None,
        }
        try:
            for name, kind in kinds.items():
                value = doc[name]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise TypeError(f"{name} is {value!r}")
            latest = doc.get("latest")
            if latest is not None and not isinstance(latest, str):
                raise TypeError(f"latest is {latest!r}")
            return cls(**{name: doc[name] for name in kinds}, latest=latest)
        except (KeyError, TypeError) as exc:
            run = where.rsplit("/parts/", 1)[0]
            raise StateError(
                f"{where}: a corrupt part record ({type(exc).__name__}: {exc}); delete {run}/ "
                "to start that backfill over"
            ) from exc
