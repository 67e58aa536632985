"""A fault-injecting HTTP proxy in front of a real S3 server, on loopback (tests only).

Requests are forwarded byte for byte to the server; a declared plan makes chosen requests
fail the way S3 does under load: ``503 SlowDown``, ``500 InternalError``, or a connection
dropped before any response.  Thread-per-connection; stop it with ``close()``.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

Kind = Literal["503", "500", "drop"]


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
}


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

            def _handle(self) -> None:
                body = self._body()
                kind = plan.match(self.command, self.path)
                if kind == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if kind is not None:
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
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.plan = plan
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        del proxy

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()
