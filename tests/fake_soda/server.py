"""The fake SODA HTTP server: rows, metadata, app tokens, latency model, faults, admin endpoints.

Endpoints (HTTP/1.1 keep-alive, one thread per connection, 127.0.0.1 by default):

- `GET /resource/{id}.json|.csv` with SoQL parameters: chunked, gzip when accepted, headers
  `X-SODA2-Fields`, `X-SODA2-Types`, `X-SODA2-Data-Out-Of-Date: false`, `Last-Modified`, `ETag`,
  `X-Socrata-RequestId`. JSON is written `[{...}\\n,{...}\\n]`; CSV has a header row of field
  names and quotes every non-null value.
- `GET /api/views/{id}.json`: pretty metadata with `rowsUpdatedAt` and `columns`.
- `/__admin/...`: `POST insert|edit|delete {dataset, n}`, `POST replace {dataset}`,
  `POST faults {kind, times, match, ...} | {faults: [...]} | {random: {probability, kinds, seed}}`,
  `GET faults`, `DELETE faults`, `GET stats`, `POST reset_stats`, `GET requests`,
  `GET rows?dataset=ID` (NDJSON).

Latency model (off unless `latency` is given): a rows request holds one of `max_concurrent` slots
for `base + per_skipped * offset_rows` before its first byte, then streams its rows no faster than
one per `per_row`, as the real server streams rows while it reads them. The server's own work
(query, rendering, gzip) happens inside that time, so an answer takes the model's time whenever
the server is faster than the model (and longer only when it is not).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import orjson

from .api import AdminError, AdminMethods
from .engine import Page, Renderer, execute, parse_query
from .faults import CUTTING, IMMEDIATE, Fault, FaultPlan
from .schema import CRASHES, PERSONS, SCHEMAS, VEHICLES
from .soql import SoqlError
from .store import Registry

ROWS_PER_WRITE = 1000
LOG_SIZE = 10_000
GZIP_LEVEL = 1  # the client cannot tell the level; 1 keeps the server fast
_RESOURCE = re.compile(r"/resource/([a-z0-9]{4}-[a-z0-9]{4})\.(json|csv)")
_VIEW = re.compile(r"/api/views/([a-z0-9]{4}-[a-z0-9]{4})\.json")
_INVALID_TOKEN = {
    "code": "permission_denied",
    "error": True,
    "message": "Invalid app_token specified",
}
_THROTTLED = {
    "code": "throttled",
    "error": True,
    "message": "Too many requests: request throttled, use an app token or slow down",
}
_HTML = (
    "<html>\r\n<head><title>{code} {reason}</title></head>\r\n<body>\r\n"
    "<center><h1>{code} {reason}</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@dataclass(frozen=True)
class Latency:
    """Delays of the real service (seconds): per rows request, per row returned, per row skipped
    by $offset; at most max_concurrent rows requests are served at once; metadata is fixed."""

    base: float = 0.15
    per_row: float = 1e-4
    per_skipped: float = 1.7e-6
    max_concurrent: int = 3
    metadata: float = 0.02


def resolve_sizes(sizes: dict[str, int] | None, scale: float | None) -> dict[str, int]:
    """Row count per dataset: defaults (small), scaled real sizes, then explicit sizes."""
    out = {d: s.default_size for d, s in SCHEMAS.items()}
    if scale is not None:
        out.update({d: round(SCHEMAS[d].full_size * scale) for d in (CRASHES, PERSONS, VEHICLES)})
    for dataset_id, n in (sizes or {}).items():
        if dataset_id not in SCHEMAS:
            raise ValueError(f"unknown dataset {dataset_id!r}; known: {', '.join(SCHEMAS)}")
        if n < 0:
            raise ValueError(f"size of {dataset_id} must be >= 0")
        out[dataset_id] = n
    return out


class Stats:
    """Counters and the recent request log, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests: Counter[str] = Counter()
            self._status: Counter[str] = Counter()
            self._datasets: Counter[str] = Counter()
            self._faults: Counter[str] = Counter()
            self._rows = self._wire = self._raw = 0
            self._peak = self._in_flight
            self._log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    def begin(self, kind: str) -> None:
        if kind == "data":
            with self._lock:
                self._in_flight += 1
                self._peak = max(self._peak, self._in_flight)

    def fault(self, kind: str) -> None:
        with self._lock:
            self._faults[kind] += 1

    def end(self, entry: dict[str, Any], wire: int, raw: int) -> None:
        with self._lock:
            if entry["kind"] == "data":
                self._in_flight -= 1
            self._requests[entry["kind"]] += 1
            self._status[str(entry["status"])] += 1
            if entry["dataset"]:
                self._datasets[entry["dataset"]] += 1
            self._rows += entry["rows"]
            self._wire += wire
            self._raw += raw
            self._log.append(entry)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": dict(self._requests),
                "requests_total": sum(self._requests.values()),
                "by_status": dict(self._status),
                "by_dataset": dict(self._datasets),
                "faults": dict(self._faults),
                "rows_served": self._rows,
                "bytes_sent": self._wire,
                "bytes_uncompressed": self._raw,
                "in_flight": self._in_flight,
                "peak_in_flight": self._peak,
            }

    def log(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._log)


class App:
    """Everything the handler threads share: data, configuration, faults, stats."""

    def __init__(
        self,
        registry: Registry,
        tokens: Iterable[str],
        require_token: bool,
        no_token_status: int,
        latency: Latency | None,
        gzip: bool,
        seed: int,
    ) -> None:
        self.registry = registry
        self.tokens = frozenset(tokens)
        self.require_token = require_token
        self.no_token_status = no_token_status
        self.latency = latency
        self.gzip = gzip
        self.faults = FaultPlan()
        self.stats = Stats()
        self._slots = threading.BoundedSemaphore(latency.max_concurrent) if latency else None
        self._rnd = random.Random(seed)
        self._rnd_lock = threading.Lock()

    def rng(self) -> random.Random:
        """A per-request generator (for arbitrary tie orders)."""
        with self._rnd_lock:
            return random.Random(self._rnd.getrandbits(64))

    def serving(self) -> contextlib.AbstractContextManager[object]:
        return self._slots if self._slots is not None else contextlib.nullcontext()

    def data_delay(self, start: float, skipped: int) -> Callable[[int], None]:
        """Wait out the time to the first byte of an answer whose slot was taken at `start`;
        return the pacer that holds the stream to `per_row` seconds a row after that."""
        if self.latency is None:
            return lambda sent: None
        lat = self.latency
        first = start + lat.base + lat.per_skipped * skipped
        _sleep_until(first)
        return lambda sent: _sleep_until(first + lat.per_row * sent)

    def dataset(self, payload: dict[str, Any]) -> str:
        dataset_id = payload.get("dataset")
        if dataset_id not in self.registry:
            raise AdminError(f"unknown dataset {dataset_id!r}", 404)
        return str(dataset_id)

    def admin(self, method: str, op: str, payload: dict[str, Any]) -> Any:
        """Run one admin operation; raises AdminError (with an HTTP status) when refused."""
        try:
            return self._admin(method, op, payload)
        except (ValueError, TypeError, KeyError) as exc:
            raise AdminError(f"{method} /__admin/{op}: {exc}", 400) from exc

    def _admin(self, method: str, op: str, payload: dict[str, Any]) -> Any:
        reg = self.registry
        match method, op:
            case "POST", "insert" | "edit" | "delete":
                n = payload.get("n")
                if not isinstance(n, int) or n < 0:
                    raise AdminError("n must be a non-negative integer", 400)
                action = {"insert": reg.insert, "edit": reg.edit, "delete": reg.delete}[op]
                return action(self.dataset(payload), n)
            case "POST", "replace":
                return reg.replace(self.dataset(payload))
            case "POST", "add_column":
                ds, field = self.dataset(payload), payload["field"]
                return reg.add_column(ds, field, payload["type"], payload.get("position"))
            case "POST", "drop_column":
                return reg.drop_column(self.dataset(payload), payload["field"])
            case "POST", "retype_column":
                return reg.retype_column(self.dataset(payload), payload["field"], payload["type"])
            case "POST", "move_column":
                ds, field = self.dataset(payload), payload["field"]
                return reg.move_column(ds, field, payload["position"])
            case "POST", "faults":
                if "random" in payload:
                    spec = payload["random"]
                    self.faults.set_random(spec["probability"], spec["kinds"], spec.get("seed", 0))
                    return {"random": True}
                specs = payload.get("faults", [payload])
                faults = [Fault.from_dict(s) for s in specs]
                for f in faults:
                    self.faults.add(f)
                return {"queued": len(faults)}
            case "GET", "faults":
                return self.faults.pending()
            case "DELETE", "faults":
                self.faults.clear()
                return {}
            case "GET", "stats":
                return self.stats.snapshot()
            case "GET", "requests":
                return self.stats.log()
            case "POST", "reset_stats":
                self.stats.reset()
                return {}
        raise AdminError(f"no admin endpoint {method} /__admin/{op}", 404)


# ----------------------------------------------------------------------------------------------
# HTTP


def _sleep_until(deadline: float) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        time.sleep(left)


def _accepts_gzip(header: str | None) -> bool:
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        if name.strip().lower() not in ("gzip", "*"):
            continue
        params = params.strip()
        if not params.startswith("q="):
            return True
        try:
            return float(params[2:]) > 0
        except ValueError:
            return True
    return False


class _ChunkWriter:
    """Chunked transfer coding, optionally through a streaming gzip compressor."""

    def __init__(
        self, wfile: Any, gzip: bool, before_end: Callable[[], None] = lambda: None
    ) -> None:
        self.wfile = wfile
        self.z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31) if gzip else None
        self.before_end = before_end
        self.raw = 0
        self.wire = 0

    def write(self, data: bytes) -> None:
        self.raw += len(data)
        self._chunk(self.z.compress(data) if self.z is not None else data)

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wire += len(data)
            self.wfile.write(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))

    def flush_partial(self) -> None:
        """Push what was written so far (a gzip sync flush) without ending the stream."""
        if self.z is not None:
            self._chunk(self.z.flush(zlib.Z_SYNC_FLUSH))

    def finish(self) -> None:
        """End the body; `before_end` runs before the last bytes leave (so that a client that
        has its answer also finds it in the stats)."""
        rest = self.z.flush() if self.z is not None else b""
        last = b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest) if rest else b"0\r\n\r\n"
        self.wire += len(rest)
        self.before_end()
        self.wfile.write(last)


class _Exchange:
    """One rows or metadata request: token check, faults, latency, query, streamed answer."""

    def __init__(self, handler: _Handler, path: str, params: list[tuple[str, str]]) -> None:
        self.h = handler
        self.app = handler.server.app
        self.params = params
        self.status = 0
        self.rows_sent = 0
        self.wire = self.raw = 0
        self.writer: _ChunkWriter | None = None
        self.recorded = False
        self.started = time.monotonic()
        self.path = path
        self.fault: Fault | None = None
        self.dataset: str | None = None
        self.format: str | None = None
        self.kind = "other"
        if m := _RESOURCE.fullmatch(path):
            self.kind, self.dataset, self.format = "data", m.group(1), m.group(2)
        elif m := _VIEW.fullmatch(path):
            self.kind, self.dataset, self.format = "metadata", m.group(1), "json"
        self.token = handler.headers.get("X-App-Token")
        for name, value in params:
            if name == "$$app_token":
                self.token = value

    def run(self) -> None:
        self.app.stats.begin(self.kind)
        try:
            self._serve()
        finally:
            self._record()

    def _record(self) -> None:
        """Count this request in the stats and the log (once, before its last bytes leave)."""
        if self.recorded:
            return
        self.recorded = True
        wire, raw = self.wire, self.raw
        if self.writer is not None:
            wire, raw = wire + self.writer.wire, raw + self.writer.raw
        entry = {
            "time": time.time(),
            "method": "GET",
            "path": self.path,
            "params": {k: v for k, v in self.params if k != "$$app_token"},
            "kind": self.kind,
            "dataset": self.dataset,
            "format": self.format,
            "status": self.status,
            "rows": self.rows_sent,
            "fault": self.fault.kind if self.fault else None,
            "has_token": self.token is not None,
            "seconds": round(time.monotonic() - self.started, 4),
        }
        self.app.stats.end(entry, wire, raw)

    def _serve(self) -> None:
        app = self.app
        if self.kind == "other":
            self._send_json(404, _not_found("No such endpoint"))
            return
        if self.token is not None and self.token not in app.tokens:
            self._send_json(403, _INVALID_TOKEN)
            return
        if self.token is None and app.require_token:
            self._send_json(app.no_token_status, _THROTTLED)
            return
        target = self.h.path
        self.fault = app.faults.pick(f"{target}\n{unquote_plus(target)}", self.kind == "data")
        if self.fault is not None:
            app.stats.fault(self.fault.kind)
            app.faults.gather(self.fault)
            if self.fault.kind in IMMEDIATE:
                self._fault_response(self.fault)
                return
            if self.fault.kind == "slow":
                time.sleep(2.0 if self.fault.seconds is None else self.fault.seconds)
        if self.kind == "metadata":
            self._metadata()
            return
        with app.serving():
            self._rows(time.monotonic())

    # answers
    def _rows(self, start: float) -> None:
        """Answer a rows request whose server slot was taken at `start` (monotonic)."""
        app = self.app
        assert self.dataset is not None
        if self.dataset not in app.registry:
            app.data_delay(start, 0)
            self._send_json(404, _not_found(f"Dataset {self.dataset} not found"))
            return
        snap = app.registry.snapshot(self.dataset)
        try:
            query = parse_query(self.params, snap.schema)
            page = execute(query, snap, app.rng())
        except SoqlError as exc:
            app.data_delay(start, 0)
            self._send_json(exc.status, exc.body())
            return
        pace = app.data_delay(start, page.skipped)
        renderer = Renderer(snap, query, page.columns)
        last_modified = formatdate(snap.changed_at / 1e6, usegmt=True)
        etag = hashlib.blake2b(
            f"{self.dataset}:{snap.generation}:{self.params}".encode(), digest_size=16
        ).hexdigest()
        headers = {
            "X-SODA2-Fields": orjson.dumps([c.key for c in page.columns]).decode(),
            "X-SODA2-Types": orjson.dumps([c.soda_type for c in page.columns]).decode(),
            "X-SODA2-Data-Out-Of-Date": "false",
            "X-SODA2-Truth-Last-Modified": last_modified,
            "Last-Modified": last_modified,
            "ETag": f'"{etag}"',
        }
        if self.format == "csv":
            head = renderer.csv_header()
            if self.fault is not None and self.fault.kind == "bad_header":
                head = head.replace(b",", (self.fault.text or "").encode() + b",", 1)
            self._stream(
                200,
                "text/csv; charset=UTF-8",
                headers,
                head,
                _lines(page, renderer.csv_rows, csv=True),
                lambda sent: b"",
                len(page),
                pace,
            )
        else:
            blocks = _lines(page, renderer.json_rows, csv=False)
            if self.fault is not None and self.fault.kind == "bad_row":
                blocks = _bad_row(blocks, self.fault, len(page))
            self._stream(
                200,
                "application/json;charset=utf-8",
                headers,
                b"",
                blocks,
                lambda sent: b"]" if sent else b"[]",
                len(page),
                pace,
            )

    def _metadata(self) -> None:
        app = self.app
        if app.latency is not None:
            time.sleep(app.latency.metadata)
        if self.dataset is None or self.dataset not in app.registry:
            self._send_json(404, _not_found(f"Cannot find view with id {self.dataset}"))
            return
        snap = app.registry.snapshot(self.dataset)
        doc = _metadata_doc(snap)
        if self.fault is not None and self.fault.kind == "duplicate_field":
            _duplicate_field(doc, self.fault.field)
        body = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
        lines = body.splitlines(keepends=True)
        headers = {
            "Last-Modified": formatdate(snap.changed_at / 1e6, usegmt=True),
            "ETag": f'"{snap.schema.dataset_id}-{snap.generation}"',
        }
        self._stream(
            200,
            "application/json; charset=utf-8",
            headers,
            b"",
            iter([lines]),
            lambda sent: b"",
            len(lines),
        )

    def _fault_response(self, fault: Fault) -> None:
        headers = {}
        if fault.retry_after is not None and fault.kind in ("429", "503"):
            ra = fault.retry_after
            if isinstance(ra, str):
                headers["Retry-After"] = ra  # as given, even when it is not a number or date
            else:
                headers["Retry-After"] = str(int(ra)) if float(ra).is_integer() else str(ra)
        match fault.kind:
            case "429":
                self._send_json(429, _THROTTLED, headers)
            case "403_throttle":
                self._send_json(
                    403,
                    {
                        "code": "throttled",
                        "error": True,
                        "message": "Rate limit exceeded: too many requests, please slow down",
                    },
                )
            case "500":
                self._send_json(
                    500, {"code": "internal_error", "error": True, "message": "Internal error"}
                )
            case "502":
                self._send_html(502, "Bad Gateway")
            case "503":
                self._send_json(
                    503,
                    {
                        "code": "service_unavailable",
                        "error": True,
                        "message": "Service unavailable, please retry later",
                    },
                    headers,
                )
            case "202":
                self._send_json(202, {"message": "processing"})
            case "redirect":
                assert fault.location is not None
                target = fault.location.rstrip("/") + self.h.path
                self._send(fault.status or 302, "text/plain", b"", {"Location": target})
            case "body":
                body = (fault.body or "").encode()
                self._send(fault.status or 200, "application/json; charset=utf-8", body)
            case _:
                status = fault.status or 503
                self._send_html(
                    status, "Service Temporarily Unavailable" if status >= 500 else "OK"
                )

    # transport
    def _send(
        self, status: int, ctype: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        h = self.h
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("X-Socrata-RequestId", uuid.uuid4().hex[:20])
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        self.wire += len(body)
        self.raw += len(body)
        self._record()
        h.wfile.write(body)

    def _send_json(
        self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._send(status, "application/json; charset=utf-8", orjson.dumps(obj), headers)

    def _send_html(self, status: int, reason: str) -> None:
        self._send(status, "text/html", _HTML.format(code=status, reason=reason).encode())

    def _stream(
        self,
        status: int,
        ctype: str,
        headers: dict[str, str],
        head: bytes,
        blocks: Iterator[list[bytes]],
        tail: Callable[[int], bytes],
        total: int,
        pace: Callable[[int], None] = lambda sent: None,
    ) -> None:
        """Send a chunked (maybe gzip) body of head, lines, tail, applying stall/cut faults;
        `pace(rows_sent)` holds each block of rows back to the latency model's rate."""
        gzip = self.app.gzip and _accepts_gzip(self.h.headers.get("Accept-Encoding"))
        h = self.h
        self.status = status
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Vary", "Accept-Encoding")
        h.send_header("X-Socrata-RequestId", uuid.uuid4().hex[:20])
        if gzip:
            h.send_header("Content-Encoding", "gzip")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        writer = self.writer = _ChunkWriter(h.wfile, gzip, self._record)
        fault = self.fault
        if fault is not None and fault.kind == "stall":
            time.sleep(10.0 if fault.seconds is None else fault.seconds)
        cut = None
        if fault is not None and fault.kind in CUTTING:
            cut = total // 2 if fault.after_rows is None else fault.after_rows
        writer.write(head)
        for lines in blocks:
            if cut is not None and self.rows_sent + len(lines) > cut:
                keep = cut - self.rows_sent
                writer.write(b"".join(lines[:keep]))
                self.rows_sent += keep
                self._cut(writer, lines[keep], tail(self.rows_sent))
                return
            writer.write(b"".join(lines))
            self.rows_sent += len(lines)
            pace(self.rows_sent)
        end = tail(self.rows_sent)
        if cut is not None:
            self._cut(writer, end, end)
            return
        writer.write(end)
        writer.finish()

    def _cut(self, writer: _ChunkWriter, partial: bytes, tail: bytes) -> None:
        assert self.fault is not None
        if self.fault.kind == "truncate_rows":
            writer.write(tail)
            writer.finish()
            return
        writer.write(partial[: len(partial) // 2])
        if self.fault.kind == "truncate_mid":
            writer.finish()
            return
        writer.flush_partial()
        self._record()
        self._abort()

    def _abort(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), without the terminating chunk."""
        sock = self.h.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.h.close_connection = True
        sock.close()
        self.h.rfile.close()


def _lines(
    page: Page, render: Callable[[Page, int, int], list[bytes]], csv: bool
) -> Iterator[list[bytes]]:
    """Rendered rows as body lines, ROWS_PER_WRITE at a time (JSON: `[` or `,` + row + LF)."""
    n = len(page)
    for a in range(0, n, ROWS_PER_WRITE):
        rows = render(page, a, min(n, a + ROWS_PER_WRITE))
        if csv:
            yield rows
        else:
            yield [(b"," if a or i else b"[") + r + b"\n" for i, r in enumerate(rows)]


def _bad_row(blocks: Iterator[list[bytes]], fault: Fault, total: int) -> Iterator[list[bytes]]:
    """JSON page lines with the row at `fault.after_rows` (half the page by default, negative
    from the end) replaced by `fault.text` (`null` by default) and `fault.pad` bytes of spaces and
    tabs (random, so that gzip cannot shrink them to nothing)."""
    at = total // 2 if fault.after_rows is None else fault.after_rows
    at = min(max(at if at >= 0 else total + at, 0), total - 1)
    pad = random.Random(at).choices(b" \t", k=fault.pad or 0)
    text = (fault.text if fault.text is not None else "null").encode() + bytes(pad) + b"\n"
    seen = 0
    for lines in blocks:
        if seen <= at < seen + len(lines):
            lines[at - seen] = lines[at - seen][:1] + text  # keeps its `[` or `,`
        seen += len(lines)
        yield lines


def _duplicate_field(doc: dict[str, Any], field: str | None) -> None:
    """Metadata naming a field twice: a copy of its column, at the next position."""
    columns = doc["columns"]
    column = next((c for c in columns if field in (None, c["fieldName"])), columns[0])
    columns.append({**column, "id": column["id"] + 1000, "position": len(columns) + 1})


def _not_found(message: str) -> dict[str, Any]:
    return {"code": "not_found", "error": True, "message": message}


def _metadata_doc(snap: Any) -> dict[str, Any]:
    schema = snap.schema
    updated = snap.changed_at // 1_000_000
    created = int(snap.created.min()) // 1_000_000 if len(snap.created) else updated
    return {
        "id": schema.dataset_id,
        "name": schema.name,
        "assetType": "dataset",
        "attribution": "Police Department (NYPD)",
        "category": "Public Safety",
        "createdAt": created,
        "description": f"Fake {schema.name} served by the project's fake SODA server.",
        "displayType": "table",
        "newBackend": True,
        "provenance": "official",
        "publicationDate": created,
        "publicationStage": "published",
        "rowsUpdatedAt": updated,
        "rowsUpdatedBy": "fake-user",
        "viewLastModified": updated,
        "viewType": "tabular",
        "columns": [
            {
                "id": 600_000_000 + i,
                "name": c.name,
                "dataTypeName": c.metadata_type,
                "description": "",
                "fieldName": c.field,
                "position": i + 1,
                "renderTypeName": c.metadata_type,
                "tableColumnId": 90_000_000 + i,
                "format": {},
            }
            for i, c in enumerate(schema.columns)
        ],
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeSODA/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is in the stats."""

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        params = parse_qsl(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            if url.path.startswith("/__admin/"):
                self._admin(method, url.path.removeprefix("/__admin/"), params, body)
            elif method == "GET":
                _Exchange(self, url.path, params).run()
            else:
                self._reply(405, {"error": True, "message": f"{method} not allowed"})
        except OSError:  # the client went away (or a fault reset the connection)
            self.close_connection = True

    def _reply(self, status: int, obj: Any) -> None:
        data = orjson.dumps(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _admin(self, method: str, op: str, params: list[tuple[str, str]], body: bytes) -> None:
        app = self.server.app
        if (method, op) == ("GET", "rows"):
            self._dump_rows(app, dict(params).get("dataset", ""))
            return
        try:
            payload = orjson.loads(body) if body else {}
            if not isinstance(payload, dict):
                raise AdminError("the body must be a JSON object", 400)
            self._reply(200, app.admin(method, op, payload))
        except orjson.JSONDecodeError as exc:
            self._reply(400, {"error": True, "message": f"bad JSON body: {exc}"})
        except AdminError as exc:
            self._reply(exc.status, {"error": True, "message": str(exc)})

    def _dump_rows(self, app: App, dataset_id: str) -> None:
        if dataset_id not in app.registry:
            self._reply(404, {"error": True, "message": f"unknown dataset {dataset_id!r}"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        writer = _ChunkWriter(self.wfile, gzip=False)
        batch: list[bytes] = []
        for row in app.registry.rows(dataset_id):
            batch.append(orjson.dumps(row) + b"\n")
            if len(batch) >= ROWS_PER_WRITE:
                writer.write(b"".join(batch))
                batch.clear()
        writer.write(b"".join(batch))
        writer.finish()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], app: App) -> None:
        super().__init__(address, _Handler)
        self.app = app
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End idle keep-alive connections, so that their threads (and the data) go away."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection errors are part of the game (faults, impatient clients): stay quiet."""


class FakeSoda(AdminMethods):
    """A fake SODA server on loopback, run in a background thread (`with FakeSoda() as srv`)."""

    def __init__(
        self,
        sizes: dict[str, int] | None = None,
        scale: float | None = None,
        seed: int = 0,
        tokens: Iterable[str] = ("good-token",),
        require_token: bool = False,
        latency: Latency | None = None,
        gzip: bool = True,
        *,
        no_token_status: int = 429,
        cache_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        hostile_text: bool = False,
    ) -> None:
        self.sizes = resolve_sizes(sizes, scale)
        self._registry = Registry(self.sizes, seed, cache_dir, hostile_text)
        self._app = App(self._registry, tokens, require_token, no_token_status, latency, gzip, seed)
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake SODA server is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeSoda:
        self._server = _Server(self._address, self._app)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name="fake-soda",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeSoda:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _admin(self, method: str, op: str, payload: dict[str, Any] | None = None) -> Any:
        return self._app.admin(method, op, payload or {})

    def iter_rows(self, dataset_id: str) -> Iterator[dict[str, Any]]:
        """Like rows(), one at a time (for full-scale datasets)."""
        if dataset_id not in self._registry:
            raise AdminError(f"unknown dataset {dataset_id!r}", 404)
        return self._registry.rows(dataset_id)

    def rows(self, dataset_id: str) -> list[dict[str, Any]]:
        return list(self.iter_rows(dataset_id))
