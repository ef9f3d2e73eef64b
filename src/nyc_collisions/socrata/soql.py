"""Pure SoQL query builders: every query the tool sends, as a dict of `$` parameters.

Paging is keyset paging on the opaque `:id` (or on (`:updated_at`, `:id`) for incremental runs),
never a deep `$offset` (slow and failing on the real server, see SODA.md). `$offset` is used only
to probe a few partition boundaries with one-column, one-row queries.
"""

from __future__ import annotations

# Every field and the system fields we land (`*` first: `:id,*` was reported to fail). Not `:*`,
# which also brings `:version` and any other system field: bytes on the wire for nothing.
SELECT_ALL = "*,:id,:created_at,:updated_at"


def quote(value: str) -> str:
    """A SoQL string literal: single quotes, a quote inside doubled."""
    return "'" + value.replace("'", "''") + "'"


def id_range(lower: str | None, upper: str | None) -> str | None:
    """`$where` for the `:id` range (lower, upper]; None for the whole dataset."""
    parts = []
    if lower is not None:
        parts.append(f":id > {quote(lower)}")
    if upper is not None:
        parts.append(f":id <= {quote(upper)}")
    return " AND ".join(parts) or None


def _and(*clauses: str | None) -> str | None:
    present = [c for c in clauses if c]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return " AND ".join(f"({c})" for c in present)


def rows_in(where: str | None, after: str | None, upper: str | None = None) -> str | None:
    """`$where` for the rows matching `where` in the `:id` range (after, upper]."""
    return _and(where, id_range(after, upper))


def page_params(
    *, after: str | None, upper: str | None, limit: int, where: str | None = None
) -> dict[str, str]:
    """One keyset page of full rows in the `:id` range (after, upper], ordered by `:id`."""
    params = {"$select": SELECT_ALL, "$order": ":id", "$limit": str(limit)}
    clause = rows_in(where, after, upper)
    if clause:
        params["$where"] = clause
    return params


def updated_after(updated_at: str, row_id: str | None) -> str:
    """`$where` for rows past the watermark (`updated_at`, `row_id`) in (`:updated_at`, `:id`)."""
    if row_id is None:
        return f":updated_at > {quote(updated_at)}"
    return (
        f":updated_at > {quote(updated_at)} OR "
        f"(:updated_at = {quote(updated_at)} AND :id > {quote(row_id)})"
    )


def incremental_params(
    *, updated_at: str, row_id: str | None, limit: int, until: str | None = None
) -> dict[str, str]:
    """One keyset page of rows changed after the watermark, ordered by (`:updated_at`, `:id`)."""
    until_clause = f":updated_at <= {quote(until)}" if until is not None else None
    return {
        "$select": SELECT_ALL,
        "$where": _and(updated_after(updated_at, row_id), until_clause) or "",
        "$order": ":updated_at,:id",
        "$limit": str(limit),
    }


def past_params(updated_at: str, row_id: str | None) -> dict[str, str]:
    """Any one row past the watermark (`updated_at`, `row_id`): whether there is one. No
    `$order`: after a full replace the source would sort every row to answer."""
    return {"$select": ":id", "$where": updated_after(updated_at, row_id), "$limit": "1"}


def count_params(where: str | None = None) -> dict[str, str]:
    """The number of rows (aliased so the key does not depend on the spelling)."""
    params = {"$select": "count(*) AS n"}
    if where:
        params["$where"] = where
    return params


def repeated_key_params(key: str) -> dict[str, str]:
    """A value of `key` that more than one row has (none: each row has its own)."""
    return {"$select": f"{key}, count(*) AS n", "$group": key, "$having": "n > 1", "$limit": "1"}


def max_updated_params() -> dict[str, str]:
    """The latest `:updated_at` of the dataset."""
    return {"$select": "max(:updated_at) AS m"}


def count_and_max_params() -> dict[str, str]:
    """The number of rows and the latest `:updated_at`, in one request."""
    return {"$select": "count(*) AS n, max(:updated_at) AS m"}


def boundary_params(after: str | None, offset: int, upper: str | None = None) -> dict[str, str]:
    """The `:id` `offset` rows past `after` (in the range up to `upper`) in `:id` order: one
    column, one row."""
    params = {"$select": ":id", "$order": ":id", "$limit": "1", "$offset": str(offset)}
    clause = id_range(after, upper)
    if clause:
        params["$where"] = clause
    return params


def boundary_below_params(before: str | None, offset: int, lower: str | None) -> dict[str, str]:
    """The `:id` `offset` rows below `before` (`before` itself the first; the top row when None)
    in the range above `lower`, in descending `:id` order: one column, one row."""
    params = {"$select": ":id", "$order": ":id DESC", "$limit": "1", "$offset": str(offset)}
    clause = id_range(lower, before)
    if clause:
        params["$where"] = clause
    return params


def keys_params(
    *,
    key: str,
    after: str | None,
    limit: int,
    extra: tuple[str, ...] = (),
    upper: str | None = None,
) -> dict[str, str]:
    """One keyset page of (`:id`, key, *extra) only in the `:id` range (after, upper], for
    verification and reconciliation."""
    select = ",".join(dict.fromkeys([":id", key, *extra]))
    params = {"$select": select, "$order": ":id", "$limit": str(limit)}
    clause = id_range(after, upper)
    if clause:
        params["$where"] = clause
    return params
