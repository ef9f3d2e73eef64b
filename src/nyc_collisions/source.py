"""One dataset on the source, above the HTTP client: its schema, counts, boundary probes and
pages parsed into rows, and the one loop that pages a range until a count confirms its end."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor, wait
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from .datasets import Dataset
from .errors import BadResponse, RetriesStopped, SchemaError, SourceUnavailable, UsageError
from .manifest import Watermark
from .pages import CsvPageStream, CsvRows, PageStream, parse_page
from .schema import CSV_EXACT_TYPES, Schema
from .socrata import soql
from .socrata.answers import clip
from .socrata.client import PageCancelled, SodaClient, parse_json_document

STOP_TICK = 0.1  # seconds between looks at `stopped()` while a count is awaited


@dataclass
class SourceInfo:
    """What the source said about a dataset when a run started."""

    count: int
    max_updated_at: str | None
    rows_updated_at: int | None
    name: str


class DatasetSource:
    def __init__(self, client: SodaClient, dataset: Dataset) -> None:
        self.client = client
        self.dataset = dataset
        self.path = client.resource_path(dataset.dataset_id)
        self._metadata: dict[str, Any] | None = None

    def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            self._metadata = self.client.metadata(self.dataset.dataset_id)
        return self._metadata

    def schema(self) -> Schema:
        schema = Schema.from_metadata(self.dataset, self.metadata())
        self.reads_csv(schema)  # a --wire the dataset cannot take fails now, before any write
        return schema

    def check_key(self) -> None:
        """A key the user chose must name every row once: the current state keeps one row a
        key, so rows without one, or with the same one, would be merged into one. Two small
        requests (a count, a grouped query), before anything is landed."""
        if self.dataset.key_is_the_sources:
            return
        key = self.dataset.key
        self.schema()  # a key that is no column is said so first
        without = self.count(f"{key} IS NULL")
        repeated = self.client.first_row(self.dataset.dataset_id, soql.repeated_key_params(key))
        if without or repeated:
            what = (
                f"is empty in {without} rows"
                if without
                else f"is {(repeated or {}).get(key)!r} in {(repeated or {}).get('n')} rows"
            )
            raise SchemaError(
                f"{self.dataset.name}: the key {key} {what} at the source; a key must name "
                "every row once: land it with another --key (in another --dest)"
            )

    def count(self, where: str | None = None) -> int:
        return self._as_count(
            self.client.scalar(self.dataset.dataset_id, soql.count_params(where), "n")
        )

    def _as_count(self, value: str | None) -> int:
        try:
            count = int(value or 0)
        except ValueError:
            count = -1
        if not 0 <= count < 2**63:  # what a count can be, and what files and records hold
            shown = clip(self.client.mask(str(value)), 60)
            raise BadResponse(
                f"{self.dataset.dataset_id}: the source's count is {shown}, not a count"
            )
        return count

    def has_rows_past(self, mark: Watermark) -> bool:
        """Whether the source has a row past the watermark `mark` (one small request)."""
        params = soql.past_params(mark.updated_at, mark.row_id)
        return self.client.first_row(self.dataset.dataset_id, params) is not None

    def max_updated_at(self) -> str | None:
        return self.client.scalar(self.dataset.dataset_id, soql.max_updated_params(), "m")

    def count_and_latest(self) -> tuple[int, str | None]:
        """The count and the latest `:updated_at`, in one request."""
        both = self.client.aggregates(
            self.dataset.dataset_id, soql.count_and_max_params(), ("n", "m")
        )
        return self._as_count(both["n"]), both["m"]

    def info(self, counted: tuple[int, str | None]) -> SourceInfo:
        """The count and the latest `:updated_at` (`count_and_latest`) with the metadata's
        facts: what a new plan starts from."""
        count, latest = counted
        meta = self.metadata()
        rows_updated = meta.get("rowsUpdatedAt")
        return SourceInfo(
            count=count,
            max_updated_at=latest,
            rows_updated_at=int(rows_updated) if isinstance(rows_updated, int | float) else None,
            name=str(meta.get("name", self.dataset.dataset_id)),
        )

    def confirm_empty(self, where: str | None, pages_seen_empty: int, left: int) -> bool:
        """Whether the source has no rows left where an empty page said so (`left`: the count
        of `where`).

        A body cut short can still be a well-formed page, even an empty one: the end of a range
        is taken only when a count agrees. If the count keeps disagreeing with empty pages, the
        source is inconsistent and the run fails rather than guess.
        """
        if left == 0:
            return True
        retry = self.client.retry
        if pages_seen_empty >= retry.attempts:
            raise SourceUnavailable(
                f"{self.dataset.dataset_id}: the source counts {left} rows "
                f"{'where ' + where if where else 'in the dataset'} but keeps returning "
                "empty pages"
            )
        self.client.wait_to_retry(retry.delay(pages_seen_empty - 1, None))  # (cut short by a stop)
        return False

    def page_until_empty(
        self,
        page: Callable[[], int | None],
        where: Callable[[], str | None],
        *,
        asked: Callable[[], int],
        stopped: Callable[[], bool],
        ended: Callable[[], bool] | None = None,
        counts: Executor | None = None,
    ) -> bool:
        """Ask `page()` until the range is exhausted: True at its end, False when `stopped()`.

        The end is taken only where a count of `where()` (the rows left after the last one
        landed) finds none, never on a short page alone: a body cut short can be well formed.
        After a short page (some rows, fewer than `asked()`, the rows it asked for) that count
        is asked before any other page, so a range ends one round trip after its last rows;
        after an empty page, `confirm_empty` decides. `page` returns the rows it landed, or None
        when it was dropped (for a split, say). `ended()` may say the range is done without a
        count (its upper row is landed). With `counts`, counts run there and are waited on in
        turns with `stopped()`.
        """
        empty = 0
        short = False
        while True:
            if stopped():
                return False
            if ended is not None and ended():
                return True
            if short:
                left = self._count_until_stopped(where(), counts, stopped)
                if left is None:
                    return False
                if left == 0:
                    return True
            got = page()
            short = got is not None and 0 < got < asked()
            if got is None:
                continue
            if got > 0:
                empty = 0
                continue
            empty += 1
            left = self._count_until_stopped(where(), counts, stopped)
            if left is None:
                return False
            if self.confirm_empty(where(), empty, left):
                return True

    def _count_until_stopped(
        self, where: str | None, counts: Executor | None, stopped: Callable[[], bool]
    ) -> int | None:
        """The count of `where`; None when `stopped()` turned true while it was awaited (or
        its retries were given up for it)."""
        try:
            if counts is None:
                return self.count(where)
            left = counts.submit(self.count, where)
            # a count the source holds must not hold up a stop (Ctrl-C): looked at in turns
            while not wait([left], timeout=STOP_TICK).done:
                if stopped():
                    return None
            return left.result()
        except RetriesStopped:
            return None

    def probe(self, after: str | None, offset: int, upper: str | None = None) -> str | None:
        """The `:id` `offset` rows past `after` (up to `upper`), or None when there are not
        that many."""
        return self._boundary(soql.boundary_params(after, offset, upper=upper))

    def probe_below(self, before: str | None, offset: int, lower: str | None) -> str | None:
        """The `:id` `offset` rows below `before` (`before` itself is 0; from the top when
        None), above `lower`; or None when there are not that many."""
        return self._boundary(soql.boundary_below_params(before, offset, lower))

    def _boundary(self, params: dict[str, str]) -> str | None:
        rows = self.client.fetch(self.path, params, _json_rows)
        if not rows:
            return None
        value = rows[0].get(":id")
        if not isinstance(value, str):
            row = clip(str(rows[0]), 200)
            raise BadResponse(
                self.client.mask(f"{self.dataset.dataset_id}: boundary probe without :id: {row}")
            )
        return value

    def stream_rows(
        self,
        schema: Schema,
        params: Callable[[], dict[str, str]],
        emit: Callable[[pa.Table], None],
        emit_rows: Callable[[CsvRows], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> int:
        """One page of full rows, handed to `emit` a few MiB at a time as it arrives.

        Returns the rows of the attempt that completed. `params` is asked again before a retry,
        so it can go on after the rows already emitted (keyset paging makes that exact). A caller
        that lands CSV may pass `emit_rows`: CSV pages whose rows the landed file can take as they
        are then come to it as `CsvRows`, unparsed (see `CsvPageStream`), and so do JSON rows
        converted to CSV in native code (see `JsonRowsToCsv`). When `cancelled()` turns true,
        the page is dropped where it is (`PageCancelled`): the rows emitted so far are whole, and
        the caller can go on after the last of them.
        """

        csv = self.reads_csv(schema)
        path = self.client.resource_path(self.dataset.dataset_id, "csv") if csv else self.path

        def consume(chunks: Iterator[bytes]) -> int:
            page = (
                CsvPageStream(schema, emit, emit_rows)
                if csv
                else PageStream(schema, emit, emit_rows)
            )
            for chunk in chunks:
                if cancelled is not None and cancelled():
                    raise PageCancelled
                page.feed(chunk)
            return page.finish()

        if cancelled is not None and cancelled():
            raise PageCancelled
        return self.client.stream(path, params, consume, sample=True)

    def page(
        self,
        schema: Schema,
        params: Callable[[], dict[str, str]],
        emit: Callable[[pa.Table], None],
        emit_rows: Callable[[CsvRows], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> int | None:
        """`stream_rows` as `page_until_empty` asks it: None when the page was dropped
        (`cancelled`) or not tried again because the run is stopping (the rows emitted so far
        are whole: the caller commits them and goes on after the last)."""
        try:
            return self.stream_rows(schema, params, emit, emit_rows, cancelled)
        except (PageCancelled, RetriesStopped):
            return None

    def reads_csv(self, schema: Schema) -> bool:
        """Whether pages of rows come as CSV (see `SodaClient.wire`): half the bytes of JSON and
        several times cheaper to parse, used where CSV carries every column exactly."""
        wire = self.client.wire
        if wire == "csv" and not schema.csv_exact:
            inexact = sorted({c.data_type for c in schema.columns} - CSV_EXACT_TYPES)
            raise UsageError(
                f"{self.dataset.name}: --wire csv would not carry its "
                f"{', '.join(inexact)} columns exactly; use --wire auto or json"
            )
        return wire == "csv" or (wire == "auto" and schema.csv_exact)

    def page_params(self, *, after: str | None, upper: str | None, limit: int) -> dict[str, str]:
        return soql.page_params(after=after, upper=upper, limit=limit)

    def changes_params(
        self, *, after: Watermark, limit: int, until: str | None = None
    ) -> dict[str, str]:
        return soql.incremental_params(
            updated_at=after.updated_at, row_id=after.row_id, limit=limit, until=until
        )

    def rows_by_id(self, schema: Schema, ids: list[str]) -> pa.Table:
        """The full rows with these `:id`s (at most a few hundred per call).

        An id the answer lacks is asked for once more (the body may have been cut short at a
        row boundary); one still missing then was deleted meanwhile, which reconcile sees next.
        """
        tables = []
        wanted = list(ids)
        for _ in range(2):
            if not wanted:
                break
            where = " OR ".join(f":id = {soql.quote(i)}" for i in wanted)
            params = soql.page_params(after=None, upper=None, limit=len(wanted), where=where)
            table = self.client.fetch(
                self.path, params, lambda body: parse_page(body, schema), most=None
            )
            tables.append(table)
            got = set(table.column("socrata_id").to_pylist())
            wanted = [i for i in wanted if i not in got]
        return pa.concat_tables(tables)


def _json_rows(body: bytes) -> list[dict[str, Any]]:
    rows = parse_json_document(body)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadResponse(f"expected a JSON array of objects, got {orjson.dumps(rows)[:200]!r}")
    return rows
