"""How many rows an update adds to the current state, known when it commits, without reading it.

`status` reads the current state's row count from the manifest (`Manifest.current_rows`): every
commit records the count it produces. A snapshot's count is its rows; a reconcile counts what
it compares (it reads every landed key anyway); an update adds the rows whose key was not in
the current state, which it tells from each row's `:created_at` against the watermark it
started from (`mark`):

- created before the mark: the row existed when the rows up to the mark were fetched, so an
  earlier batch landed it (it is not new), unless it was created after the mark the last
  finished update started from and edited while that update ran (its new `:updated_at` past
  where that update ended, so it skipped the row): those are looked up in the files of the few
  updates that can hold them (`recent_window`, a small read), or, when the snapshot may hold
  them too (created up to its `ahead_until`, or compacted), as uncertain below. A row edited
  while each of two updates ran, skipped by both, is not caught;
- created after the mark: no earlier update can have landed it, nor a reconcile (which leaves
  rows past the watermark to updates); only a snapshot can hold a row past its own watermark (a
  row inserted while the backfill ran), and it records the latest `:updated_at` of the rows it
  holds (`ahead_until`, from its part records; the source's at its commit for a run resumed
  from an older version's records): rows created after that are new for sure;
- created at the mark's very time (after a run that stopped within one `:updated_at`): new when
  never changed since, unless the snapshot's `ahead_until` reaches the mark (it may hold them);
- created at the mark and changed since: landed by an update that ended at the mark or not,
  so looked up in those updates' files with the rows above;
- created between the mark and `ahead_until`, or without `:created_at`, or at the mark the
  snapshot reached: uncertain. Those few are looked up in the current state itself when the
  file that holds them is committed (a read of the landed keys, which only these rare cases
  pay).

This holds while a key names one row at the source (what `verify` checks).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .current import Landed, current_keys, read_batch_file
from .manifest import Batch, Manifest, Watermark

logger = logging.getLogger(__name__)


class NewRows:
    """Counts an update's new rows as its tables go to files (`add`, then `current` at a commit)."""

    def __init__(self, landed: Landed, mark: Watermark) -> None:
        self.landed = landed
        self.mark = mark
        self.base = landed.manifest.current_rows()
        snapshot = landed.manifest.current_batches()[0]
        ahead = snapshot.info.get("ahead_until")
        ahead = ahead if isinstance(ahead, str) else None
        self.ahead = ahead if ahead is not None and ahead > mark.updated_at else None
        # the snapshot may hold rows created at the mark itself (inserted while it ran, with the
        # latest :updated_at it recorded): those are not new for sure
        self.ahead_at_mark = ahead is not None and ahead >= mark.updated_at
        self.new = 0
        self._uncertain: list[pa.Array] = []
        self.since, self.lookup = recent_window(landed.manifest)
        # rows the snapshot may hold: created up to its mark, or its `ahead_until`
        bound = snapshot.watermark.updated_at if snapshot.watermark is not None else ""
        self.snapshot_bound = max(bound, ahead or "")
        self._recent: list[pa.Array] = []
        self._held: pa.Array | None = None  # the keys of `lookup`'s files, once read

    def add(self, table: pa.Table) -> None:
        """Count the rows of `table` (about to be written) that add a key; keep the uncertain."""
        if self.base is None or not table.num_rows:
            return
        created = table.column("socrata_created_at")
        mark = pa.scalar(self.mark.updated_at, pa.string())
        after = pc.fill_null(pc.greater(created, mark), False)
        at = pc.fill_null(pc.equal(created, mark), False)
        unknown = pc.is_null(created)
        if self.ahead is not None:
            within = pc.and_(after, pc.less_equal(created, pa.scalar(self.ahead, pa.string())))
            unknown = pc.or_(unknown, within)
            after = pc.and_(after, pc.invert(within))
        if self.mark.row_id is not None and self.ahead_at_mark:
            unknown = pc.or_(unknown, at)  # created at the mark: the snapshot may hold them
        looked_up = pa.array(np.zeros(len(created), dtype=bool))
        if self.mark.row_id is not None and not self.ahead_at_mark:
            # created at the mark: new when never changed since (its only version is past it);
            # if changed, the updates that ended at the mark hold it or not
            unchanged = pc.equal(created, table.column("socrata_updated_at"))
            after = pc.or_(after, pc.and_(at, unchanged))
            changed = pc.fill_null(pc.and_(at, pc.invert(unchanged)), False)
            if self.since is not None and self.lookup:
                looked_up = changed
            else:
                unknown = pc.or_(unknown, changed)
        self.new += int(pc.sum(after).as_py() or 0)
        if pc.any(unknown).as_py():
            key = table.column(self.landed.key_column).filter(unknown)
            self._uncertain.append(key.combine_chunks())
        if self.since is None:
            return
        recent = pc.fill_null(
            pc.and_(
                pc.greater_equal(created, pa.scalar(self.since, pa.string())),
                pc.less(created, mark),
            ),
            False,
        )
        recent = pc.or_(recent, looked_up)
        # those the snapshot may hold too (all of them when no update can): uncertain
        held = (
            pc.fill_null(pc.less_equal(created, pa.scalar(self.snapshot_bound, pa.string())), False)
            if self.lookup
            else pa.array(np.ones(len(created), dtype=bool))
        )
        held = pc.and_(recent, held)
        if pc.any(held).as_py():
            self._uncertain.append(
                table.column(self.landed.key_column).filter(held).combine_chunks()
            )
        recent = pc.and_(recent, pc.invert(held))
        if pc.any(recent).as_py():
            self._recent.append(
                table.column(self.landed.key_column).filter(recent).combine_chunks()
            )

    def current(self) -> int | None:
        """The current state's rows once what was added so far is committed (None: unknown)."""
        if self.base is None:
            return None
        if self._uncertain:
            self.new += self._resolve(pa.concat_arrays(self._uncertain))
            self._uncertain = []
        if self._recent:
            self.new += self._missing_from(pa.concat_arrays(self._recent), self.lookup)
            self._recent = []
        return self.base + self.new

    def _missing_from(self, keys: pa.Array, batches: list[Batch]) -> int:
        """How many of `keys` the files of `batches` do not hold (their keys read once, at the
        first commit that asks: an update commits file by file)."""
        if self._held is None:
            column = self.landed.key_column
            held = [
                table.column(column).combine_chunks()
                for batch in batches
                for entry in batch.files
                for table in read_batch_file(self.landed, batch, entry, [column])
            ]
            self._held = pc.unique(pa.concat_arrays(held)) if held else pa.array([], pa.string())
        keys = pc.unique(keys)
        found = pc.is_in(keys, value_set=self._held)
        return len(keys) - int(pc.sum(found).as_py() or 0)

    def _resolve(self, keys: pa.Array) -> int:
        """How many of `keys` the current state (as committed so far) does not hold."""
        logger.info(
            "%s: reading the landed keys to count %d rows changed near the watermark",
            self.landed.dataset.name,
            len(keys),
        )
        keys = pc.unique(keys)
        found = pa.array([False] * len(keys))
        for table in current_keys(self.landed):
            found = pc.or_(found, pc.is_in(keys, value_set=table.column(self.landed.key_column)))
        return len(keys) - int(pc.sum(found).as_py() or 0)


def recent_window(manifest: Manifest) -> tuple[str | None, list[Batch]]:
    """Where the rows an update may have skipped begin (`:created_at`, inclusive) and the update
    batches that may hold them: an update skips a row created after the mark it started from
    when the row is edited while it runs (its new `:updated_at` is past where the update ends),
    and so may every later update that stops before the row; the next one to get past it lands
    it. So the window starts where the last finished update started (or, while none since a
    compaction has finished, where it began before the compaction: `recent_since`), and only
    the updates that end at or after that start can hold those rows (several stopped within one
    `:updated_at` end at the same one). The snapshot holds the rows created up to its mark and
    its `ahead_until`: those are looked up with the whole current state (`NewRows`)."""
    marked = [b for b in manifest.current_batches() if b.watermark is not None]
    if not marked:
        return None, []
    recent = marked[0].info.get("recent_since")
    recent = recent if isinstance(recent, str) else None
    updates = [i for i, b in enumerate(marked) if b.kind == "update"]
    if not updates:
        return recent, []
    finished = [i for i in updates if marked[i].info.get("done", True)]
    first = finished[-1] if finished else updates[0]
    since = _end(marked[first - 1])
    if not finished and recent is not None:
        since = min(since, recent)
    while first > 1 and _end(marked[first - 1]) >= since:
        first -= 1
    return since, [b for b in marked[first:] if b.kind == "update"]


def _end(batch: Batch) -> str:
    assert batch.watermark is not None
    return batch.watermark.updated_at
