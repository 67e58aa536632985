"""A fault-injecting HTTP proxy in front of a real S3 server, on loopback (tests only).

Requests are forwarded byte for byte to the server; a declared plan makes chosen requests
fail the way S3 does under load: ``503 SlowDown``, ``500 InternalError``, or a connection
dropped before any response; or the way a full or over-quota store does (``507
XMinioStorageFull``, ``403 QuotaExceeded``, ``400 EntityTooLarge``); or hang: ``stall`` reads
the request and never answers, ``stall-body`` answers with the headers and half the body and
then sends nothing, ``stall-upload`` stops reading the request body after 64 KiB.  A stalled
connection is held open until ``close()``.  Thread-per-connection; stop it with ``close()``.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Kind = Literal["503", "500", "drop", "507", "quota", "too-large", "stall", "stall-body", "stall-upload"]


@dataclass
class ProxyFault:
    method: str  # "PUT", "GET", ...
    path_contains: str
    kind: Kind
    times: int  # how many matching requests fail
    seen: int = 0


@dataclass
class ProxyPlan:
    faults: list[ProxyFault] = field(default_factory=list)
    fired: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def match(self, method: str, path: str) -> Kind | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.path_contains in path and f.seen < f.times:
                    f.seen += 1
                    self.fired += 1
                    return f.kind
        return None


_ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "507": (507, "XMinioStorageFull", "Storage backend has reached its minimum free drive threshold."),
    "quota": (403, "QuotaExceeded", "The bucket quota has been exceeded."),
    "too-large": (400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size."),
}
_STALL_S = 300.0  # upper bound of a stall; close() ends every stall at once


class FaultProxy:
    def __init__(self, upstream: str, plan: ProxyPlan) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _stall(self) -> None:
                proxy._stop.wait(_STALL_S)
                self.close_connection = True

            def _handle(self) -> None:
                kind = plan.match(self.command, self.path)
                if kind == "stall-upload":
                    self.rfile.read(min(64 << 10, int(self.headers.get("Content-Length") or 0)))
                    return self._stall()
                body = self._body()
                if kind == "stall":
                    return self._stall()
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if kind in _ERRORS:
                    status, code, msg = _ERRORS[kind]
                    xml = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{msg}</Message></Error>"
                    data = xml.encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",)}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(k, v)
                    # a HEAD answer has no body but the object's length
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if kind == "stall-body":
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        return self._stall()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.plan = plan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
