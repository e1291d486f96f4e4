"""A tiny in-process HTTP/1.1 server on 127.0.0.1 that plays whatever a test says.

    def answer(req):                      # req: Seen(method, path, query, headers, body)
        return 500, {}, "rpc error making call: No cluster leader"
    with TinyServer(answer) as server:    # server.addr "127.0.0.1:PORT", server.seen [Seen]
        ...

`answer` returns (status, headers, body) or None to never answer (the
connection stays open until the server closes). Keep-alive as Consul does.
"""

import http.server
import threading
import urllib.parse
from dataclasses import dataclass


@dataclass
class Seen:
    method: str
    target: str        # as sent: path and query
    path: str
    query: dict
    headers: dict
    body: bytes


class TinyServer:
    def __init__(self, answer):
        self.answer = answer
        self.seen: list[Seen] = []
        self.release = threading.Event()     # wakes handlers that never answer, at close
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urllib.parse.urlsplit(self.path)
                seen = Seen(self.command, self.path, urllib.parse.unquote(url.path),
                            dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True)),
                            dict(self.headers.items()), body)
                outer.seen.append(seen)
                result = outer.answer(seen)
                if result is None:
                    outer.release.wait(60)
                    self.close_connection = True
                    return
                status, headers, payload = result
                payload = payload.encode() if isinstance(payload, str) else payload
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_DELETE = do_POST = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.addr = "127.0.0.1:%d" % self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
