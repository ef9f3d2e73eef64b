"""A small HTTP proxy in front of an S3 server (moto) that injects S3 faults.

Seeded: each request is answered by a fault with `probability`, else forwarded as is. Faults are
the ones S3 really sends under load: 503 SlowDown, 500 InternalError, and a connection dropped
before the answer. Counts of requests and faults by kind are kept for the test's report.
`strip` names request headers dropped on the way (e.g. `if-none-match`: a store that ignores
conditional writes). `cut_gets`: that many GETs of data files send half their body, then the
connection is shut (a body broken off mid-transfer). `hold_parts`: seconds each multipart part
upload is held before it is forwarded (S3 or the network stalling).
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

KINDS = ("503_slowdown", "500_internal", "drop")


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (the soak kills clients mid-request) is expected; anything
        else is still printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "proxy-authenticate",
    "proxy-authorization",
}
_ERRORS = {
    "503_slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "500_internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


class S3FaultProxy:
    def __init__(
        self,
        upstream: str,
        probability: float = 0.0,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        strip: tuple[str, ...] = (),
        cut_gets: int = 0,
        hold_parts: float = 0.0,
    ) -> None:
        self.upstream = urlparse(upstream)
        self.cut_gets = cut_gets
        self.hold_parts = hold_parts
        self.held = 0
        self.strip = {h.lower() for h in strip}
        self.probability = probability
        self.kinds = kinds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults: Counter[str] = Counter()
        self.requests = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _handle(self) -> None:
                body = self._body()
                if proxy.hold_parts and self.command == "PUT" and "partNumber=" in self.path:
                    with proxy.lock:
                        proxy.held += 1
                    time.sleep(proxy.hold_parts)
                fault = proxy.pick()
                if fault == "drop":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    status, code, message = _ERRORS[fault]
                    xml = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in _HOP and k.lower() not in proxy.strip
                }
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=60
                )
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # a HEAD answer carries the length of the body it does not send
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command == "GET" and "/data/" in self.path and proxy.take_cut():
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def pick(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.probability and self.rng.random() < self.probability:
                kind = self.rng.choice(self.kinds)
                self.faults[kind] += 1
                return kind
        return None

    def take_cut(self) -> bool:
        with self.lock:
            if self.cut_gets <= 0:
                return False
            self.cut_gets -= 1
            self.faults["cut_body"] += 1
            return True

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
