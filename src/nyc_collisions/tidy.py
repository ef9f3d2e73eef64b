"""After a run: remove what killed runs left behind, never what a manifest names.

Every command that writes (backfill, update, reconcile, compact) ends with `tidy` while it still
holds the dataset's lease, so no other run is writing the dataset. It removes:

- `runs/<batch>/` of batches the manifest names (a backfill's progress, kept until its commit;
  a reconcile's key scan, `runs/<scan>/scan.json`, is kept until the reconcile that ends it);
- data files no manifest names, unless their batch is an unfinished backfill that a rerun
  resumes (after a new snapshot is committed those go too: it supersedes them);
- temporary files and multipart uploads of killed runs (`Storage.cleanup_uploads`);
- files retired (by `compact --prune`, or by the fresh snapshot of an update or a reconcile)
  whose grace period has passed (dropped from the manifest by a commit first, so that a
  manifest never names a deleted file).

The lease is checked before each batch of deletions (`Lease.check`). A failure is only logged: the
run's commits stand, and the next run goes on with the cleanup.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime

from .lease import Lease
from .manifest import utc_now
from .state import DatasetState

logger = logging.getLogger(__name__)

CHUNK = 1000
# hours superseded files stay for readers still holding the manifest before (`retire_after`)
DEFAULT_GRACE_HOURS = 24.0


def tidy(state: DatasetState, lease: Lease, *, drop_unfinished: bool = False) -> int:
    """Remove leftovers of killed runs (see the module docstring); returns how many objects."""
    try:
        return _tidy(state, lease, drop_unfinished)
    except Exception as exc:  # the run has committed: never fail it here
        logger.warning(
            "%s/%s: cleanup stopped (%s); the next run goes on with it",
            state.storage.url,
            state.folder,
            exc,
        )
        return 0


def _batch(state: DatasetState, key: str, area: str) -> str:
    """The batch id of a key below `<dataset>/<area>/<batch>/`."""
    return key[len(state.folder) + len(area) + 2 :].split("/", 1)[0]


def _tidy(state: DatasetState, lease: Lease, drop_unfinished: bool) -> int:
    storage, folder = state.storage, state.folder
    doomed: list[str] = []
    manifest = state.load()
    if manifest is not None:
        now = utc_now()
        expired = [r for r in manifest.retired if r.delete_after <= now]
        if expired:
            manifest.retired = [r for r in manifest.retired if r.delete_after > now]
            state.commit(manifest)
            doomed += [r.path for r in expired]
    batches = {b.batch_id for b in manifest.batches} if manifest else set()
    named = {f.path for b in manifest.batches for f in b.files} if manifest else set()
    named |= {r.path for r in manifest.retired} if manifest else set()
    runs = storage.list_keys(f"{folder}/runs/")
    planned = {_batch(state, k, "runs") for k in runs if k.endswith("/plan.json")}
    resumable = set() if drop_unfinished else planned - batches
    # a reconcile's key scan (`runs/<scan>/scan.json`) stays until the reconcile that finishes
    # it: it records the source, which a new snapshot does not supersede
    resumable |= {_batch(state, k, "runs") for k in runs if k.endswith("/scan.json")}
    doomed += [k for k in runs if _batch(state, k, "runs") not in resumable]
    doomed += [
        k
        for k in storage.list_keys(f"{folder}/data/")
        if k not in named and _batch(state, k, "data") not in resumable
    ]
    for start in range(0, len(doomed), CHUNK):
        storage.delete(doomed[start : start + CHUNK], check=lease.check)
    n = len(doomed) + storage.cleanup_uploads(f"{folder}/", check=lease.check)
    if n:
        logger.info("%s/%s: removed %d leftovers of earlier runs", storage.url, folder, n)
    return n


def retire_after(hours: float) -> str:
    """The UTC time (as the manifest writes it) `hours` from now."""
    moment = math.ceil(datetime.now(UTC).timestamp() + hours * 3600)  # never a second early
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
