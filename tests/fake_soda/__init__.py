"""The project's fake Socrata SODA server: real HTTP on loopback, realistic NYC collisions data,
a SoQL subset, app tokens, a latency model, fault injection and admin controls.

    with FakeSoda(sizes={"h9gi-nx95": 1000}, seed=1) as srv:
        httpx.get(f"{srv.url}/resource/h9gi-nx95.json", params={"$limit": 5})

`python -m tests.fake_soda --port 0 --scale 0.01` runs one in the foreground and prints
`READY http://127.0.0.1:PORT`; `FakeSodaClient(url)` controls it from another process.
"""

from __future__ import annotations

from .api import AdminError
from .client import FakeSodaClient
from .schema import CRASHES, GENERIC, PERSONS, SCHEMAS, VEHICLES
from .server import FakeSoda, Latency

__all__ = [
    "CRASHES",
    "GENERIC",
    "PERSONS",
    "SCHEMAS",
    "VEHICLES",
    "AdminError",
    "FakeSoda",
    "FakeSodaClient",
    "Latency",
]
