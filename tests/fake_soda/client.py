"""`FakeSodaClient`: control a fake SODA server running in another process, over `/__admin/`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson

from .api import AdminError, AdminMethods


class FakeSodaClient(AdminMethods):
    """The same mutation/fault/rows/stats methods as FakeSoda, spoken over HTTP."""

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FakeSodaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _admin(self, method: str, op: str, payload: dict[str, Any] | None = None) -> Any:
        body = orjson.dumps(payload) if payload is not None else None
        resp = self._http.request(
            method, f"/__admin/{op}", content=body, headers={"Content-Type": "application/json"}
        )
        if resp.status_code >= 400:
            raise AdminError(resp.json().get("message", resp.text), resp.status_code)
        return resp.json()

    def iter_rows(self, dataset_id: str) -> Iterator[dict[str, Any]]:
        """Current rows in :id order, streamed as NDJSON."""
        with self._http.stream("GET", "/__admin/rows", params={"dataset": dataset_id}) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise AdminError(resp.json().get("message", resp.text), resp.status_code)
            for line in resp.iter_lines():
                if line:
                    yield orjson.loads(line)

    def rows(self, dataset_id: str) -> list[dict[str, Any]]:
        return list(self.iter_rows(dataset_id))
