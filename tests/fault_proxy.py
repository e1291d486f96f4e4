"""A fault-injecting HTTP/1.1 proxy in front of a real Consul agent.

The daemon talks to the proxy as it would to its agent (keep-alive included);
the proxy forwards to the agent and, on cue, fails the way Consul and networks
fail: a 500 "rpc error making call", a 429, a body that is not JSON, an
X-Consul-Index that goes backwards / is 0 / is missing, an answer cut in the
middle, a connection that accepts and never answers, a delay, and an answer
dropped after Consul applied the request (REFERENCE §8: a timed-out acquire
may have succeeded).

    proxy = FaultProxy(agent.http_addr).start()         # proxy.addr: "127.0.0.1:PORT"
    rule = proxy.inject(Respond(500, RPC_ERROR), "PUT", KV + key, query={"acquire": True}, times=1)
    rule.wait_hits(1, 10)                               # it fired
    proxy.wait_request("PUT", r"/v1/session/renew/.*", since=t, timeout=5)
    proxy.fail_all()  /  proxy.fail_all("refuse")       # a cut-off node
    proxy.heal()                                        # clear every rule, release every hang
    proxy.close()

Rules are tried in the order they were added; the first that matches a request
and has firings left answers it; a request no rule matches is forwarded.
Every request is recorded (`proxy.log`: Request records with arrival time,
method, path, query, the rule that fired and the status sent, None if the
client got no answer), so tests synchronise on events rather than sleeps.

Nothing here imports vip_elector: the proxy plays Consul, it must not share
the daemon's code.
"""

import http.client
import re
import select
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Optional

from helpers import WaitTimeout

RPC_ERROR = "rpc error making call: rpc error making call: No cluster leader"
KV = r"/v1/kv/"
RENEW = r"/v1/session/renew/[^/]+"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "content-length", "host"}


@dataclass
class Request:
    """One request the proxy received. `status`: what the client was sent
    (None: no complete answer: hung, dropped, cut, or refused)."""

    t: float                    # time.monotonic() at arrival
    wall: float                 # time.time() at arrival (NotifySocket's clock)
    method: str
    path: str                   # unquoted, without the query
    query: dict
    rule: Optional["Rule"] = None
    status: Optional[int] = None
    answered: Optional[float] = None   # time.monotonic() when the answer was sent
    upstream_status: Optional[int] = None  # what Consul answered, when it was asked

    @property
    def fault(self) -> Optional[str]:
        return self.rule.action.name if self.rule else None

    def __repr__(self):
        q = "&".join("%s=%s" % kv for kv in self.query.items())
        return "<%.3f %s %s%s -> %s%s>" % (self.t, self.method, self.path, "?" + q if q else "",
                                           self.status, " [%s]" % self.fault if self.fault else "")


# Actions: what a rule does with a request ------------------------------------------------

class Action:
    """Base: `handle(ctx)` answers (or doesn't) the request in ctx."""

    name = "action"

    def handle(self, ctx: "Exchange") -> None:
        raise NotImplementedError


@dataclass
class Respond(Action):
    """Answer without asking Consul (nothing is applied)."""

    status: int = 500
    body: str = RPC_ERROR
    headers: dict = field(default_factory=lambda: {"Content-Type": "text/plain; charset=utf-8"})

    @property
    def name(self):
        return "respond %d" % self.status

    def handle(self, ctx):
        ctx.answer(self.status, self.headers, self.body.encode())


def status_500(body=RPC_ERROR):
    return Respond(500, body)


def too_many_requests():
    return Respond(429, "Your IP is issuing too many concurrent connections, please rate limit your calls\n")


def not_json():
    """200 with a body no JSON parser accepts (a captive portal, a load balancer page)."""
    return Respond(200, "<html><body>502 Bad Gateway</body></html>",
                   {"Content-Type": "text/html", "X-Consul-Index": "7"})


@dataclass
class Index(Action):
    """Forward, then lie in X-Consul-Index: "backwards" (each answer lower than
    the last one this rule gave), "zero", "missing", or a fixed integer."""

    mode: object = "backwards"
    _last: Optional[int] = None

    @property
    def name(self):
        return "index %s" % self.mode

    def handle(self, ctx):
        status, headers, body = ctx.forward()
        if status is None:
            return
        headers = {k: v for k, v in headers.items() if k.lower() != "x-consul-index"}
        if self.mode == "backwards":
            real = int(ctx.upstream_headers.get("X-Consul-Index") or 2)
            self._last = max(1, (self._last if self._last is not None else real) - 1)
            headers["X-Consul-Index"] = str(self._last)
        elif self.mode == "zero":
            headers["X-Consul-Index"] = "0"
        elif self.mode != "missing":
            headers["X-Consul-Index"] = str(self.mode)
        ctx.answer(status, headers, body)


@dataclass
class Cut(Action):
    """Headers that promise a body, part of it, then the connection closes.
    forward=True applies the request first (the answer is lost halfway)."""

    forward: bool = False
    name = "cut"

    def handle(self, ctx):
        body = b'{"Key": "cut", "Value": "dGhpcyBhbnN3ZXIgd2FzIGN1dA==", "Flags": 0, "Session": "x"}'
        status, headers = 200, {"Content-Type": "application/json", "X-Consul-Index": "99"}
        if self.forward:
            status, headers, body = ctx.forward()
            if status is None:
                return
        ctx.send_head(status, headers, len(body) + 100)
        ctx.send_raw(body[: max(1, len(body) // 2)])
        ctx.close()


@dataclass
class Hang(Action):
    """Accept the request and never answer: until the rule is released or
    cleared, the proxy heals, or the client gives up (closes)."""

    name = "hang"

    def handle(self, ctx):
        ctx.hang()


@dataclass
class Delay(Action):
    """Forward after `seconds` (before=True) or answer `seconds` after Consul did."""

    seconds: float = 3.0
    before: bool = True

    @property
    def name(self):
        return "delay %gs" % self.seconds

    def handle(self, ctx):
        if self.before and not ctx.wait_released(self.seconds):
            return
        status, headers, body = ctx.forward()
        if status is None:
            return
        if not self.before and not ctx.wait_released(self.seconds):
            return
        ctx.answer(status, headers, body)


@dataclass
class DropAnswer(Action):
    """Forward (Consul applies it), then never answer: the client times out."""

    name = "drop answer"

    def handle(self, ctx):
        status, _, _ = ctx.forward()
        if status is not None:
            ctx.hang()


# Rules ---------------------------------------------------------------------------------

class Rule:
    """method (None: any) + path regex (full match on the unquoted path) + query.

    query: {name: True (present) | False (absent) | "value" | predicate(value or None)}
    or a predicate on the whole query dict. times: fire this often (None: until
    cleared); skip: let this many matching requests through first.
    """

    def __init__(self, action: Action, method=None, path=".*", query=None, times=1, skip=0):
        self.action, self.method, self.times, self.skip = action, method, times, skip
        self.path = re.compile(path)
        self.query = query
        self.hits: list[Request] = []
        self.seen = 0
        self.cleared = False
        self.released = threading.Event()   # wakes the hangs and delays of this rule
        self._cond = threading.Condition()

    def matches(self, method: str, path: str, query: dict) -> bool:
        if self.method and self.method != method:
            return False
        if not self.path.fullmatch(path):
            return False
        if callable(self.query):
            return bool(self.query(query))
        for name, want in (self.query or {}).items():
            have = query.get(name)
            if want is True and have is None or want is False and have is not None:
                return False
            if isinstance(want, str) and have != want:
                return False
            if callable(want) and not want(have):
                return False
        return True

    def take(self, request: Request) -> bool:
        """Called under the proxy's lock: does this rule fire for this request?"""
        if self.cleared or not self.matches(request.method, request.path, request.query):
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and len(self.hits) >= self.times:
            return False
        with self._cond:
            self.hits.append(request)
            self._cond.notify_all()
        return True

    def clear(self) -> None:
        """No more firings; requests hanging on this rule are cut loose (closed)."""
        self.cleared = True
        self.released.set()

    def wait_hits(self, n: int, timeout: float) -> list:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.hits) >= n, timeout):
                raise WaitTimeout("rule %s %s fired %d of %d times in %.1fs"
                                  % (self.action.name, self.path.pattern, len(self.hits), n, timeout))
            return list(self.hits)

    def __repr__(self):
        return "<Rule %s %s %s hits=%d>" % (self.action.name, self.method or "*", self.path.pattern,
                                             len(self.hits))


# One exchange: a request and its answer ------------------------------------------------

class Exchange:
    """What an action may do with a request: forward it, answer it, cut it, hang."""

    def __init__(self, proxy: "FaultProxy", client: "ClientConnection", request: Request,
                 target: str, headers: dict, body: bytes):
        self.proxy, self.client, self.request = proxy, client, request
        self.target, self.headers, self.body = target, headers, body
        self.upstream_headers: dict = {}
        self.generation = proxy.generation     # heal() releases what hangs from before it
        self.closed = False

    def forward(self):
        """(status, headers, body) from Consul, or (None, None, None) if it failed
        (the client connection is closed then)."""
        try:
            status, headers, body = self.client.upstream_request(
                self.request.method, self.target, self.headers, self.body)
        except (OSError, http.client.HTTPException):
            self.close()
            return None, None, None
        self.request.upstream_status = status
        self.upstream_headers = headers
        return status, headers, body

    def send_head(self, status: int, headers: dict, length: int) -> None:
        reason = http.client.responses.get(status, "Unknown")
        lines = ["HTTP/1.1 %d %s" % (status, reason)]
        lines += ["%s: %s" % (k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]
        lines += ["Content-Length: %d" % length, "Date: %s" % time.strftime(
            "%a, %d %b %Y %H:%M:%S GMT", time.gmtime()), "", ""]
        self.send_raw("\r\n".join(lines).encode("latin-1"))

    def send_raw(self, data: bytes) -> None:
        try:
            self.client.sock.sendall(data)
        except OSError:
            self.close()

    def answer(self, status: int, headers: dict, body: bytes) -> None:
        if self.proxy.failing == "hang":     # cut off while Consul was answering
            self.hang()
            return
        # Recorded before the bytes go out, so a client that has read its answer
        # always finds it in the log; taken back if the client was gone.
        self.request.status, self.request.answered = status, time.monotonic()
        self.send_head(status, headers, len(body))
        self.send_raw(body)
        if self.closed:
            self.request.status, self.request.answered = None, None

    def wait_released(self, seconds: float) -> bool:
        """Sleep; False (and the connection closed) if released or the client left first."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._released() or self.client.peer_closed(min(0.1, end - time.monotonic())):
                self.close()
                return False
        return True

    def hang(self) -> None:
        """Never answer; close once released or when the client gives up."""
        while not self._released():
            if self.client.peer_closed(0.1):
                break
        self.close()

    def _released(self) -> bool:
        rule = self.request.rule
        return (self.proxy.closing or self.proxy.generation != self.generation
                or (rule is not None and rule.released.is_set()))

    def close(self) -> None:
        self.closed = True
        self.client.close()


class ClientConnection:
    """One client connection (keep-alive: many requests), with its own upstream connection."""

    def __init__(self, proxy: "FaultProxy", sock: socket.socket):
        self.proxy, self.sock = proxy, sock
        self.rfile = sock.makefile("rb")
        self.upstream: Optional[http.client.HTTPConnection] = None
        self.closed = False

    def upstream_request(self, method, target, headers, body):
        if self.upstream is None:
            host, port = self.proxy.upstream
            self.upstream = http.client.HTTPConnection(host, port, timeout=self.proxy.upstream_timeout)
        try:
            self.upstream.request(method, target, body=body, headers=headers)
            response = self.upstream.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.upstream.close()
            self.upstream = None
            raise
        if response.will_close:
            self.upstream.close()
            self.upstream = None
        return response.status, dict(response.getheaders()), data

    def peer_closed(self, timeout: float) -> bool:
        """True if the client closed (or reset) its end within `timeout`."""
        if self.closed:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if readable:
                return self.sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        return False

    def read_request(self):
        line = self.rfile.readline(65537)
        if not line:
            return None
        method, target, _version = line.decode("latin-1").split(" ", 2)
        headers = {}
        while True:
            h = self.rfile.readline(65537).decode("latin-1")
            if h in ("\r\n", "\n", ""):
                break
            name, _, value = h.partition(":")
            headers[name.strip()] = value.strip()
        length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), 0) or 0)
        body = self.rfile.read(length) if length else b""
        return method, target, headers, body

    def serve(self) -> None:
        try:
            while not self.closed and not self.proxy.closing:
                try:
                    parsed = self.read_request()
                except (OSError, ValueError):
                    break
                if parsed is None:
                    break
                method, target, headers, body = parsed
                url = urllib.parse.urlsplit(target)
                request = Request(time.monotonic(), time.time(), method,
                                  urllib.parse.unquote(url.path),
                                  dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True)))
                forward_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
                ctx = Exchange(self.proxy, self, request, target, forward_headers, body)
                self.proxy.dispatch(ctx)
                if ctx.closed or any(k.lower() == "connection" and v.lower() == "close"
                                     for k, v in headers.items()):
                    break
        finally:
            self.close()
            self.proxy._forget(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for closer in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.rfile.close, self.sock.close):
            try:
                closer()
            except OSError:
                pass
        if self.upstream is not None:
            self.upstream.close()


class FaultProxy:
    """See the module docstring. `upstream`: "host:port" of the Consul agent."""

    def __init__(self, upstream: str, upstream_timeout: float = 700.0):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.upstream_timeout = upstream_timeout   # blocking queries wait up to 10 min
        self.log: list[Request] = []
        self.rules: list[Rule] = []
        self.failing: Optional[str] = None        # None, "hang" or "refuse"
        self.generation = 0                        # bumped by heal(): old hangs are closed
        self.closing = False
        self._lock = threading.Condition(threading.RLock())
        self._clients: set = set()
        self._listener: Optional[socket.socket] = None
        self.port = 0

    @property
    def addr(self) -> str:
        return "127.0.0.1:%d" % self.port

    # life cycle --------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._listen()
        return self

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True, name="proxy-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client = ClientConnection(self, sock)
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=client.serve, daemon=True, name="proxy-client").start()

    def _forget(self, client: ClientConnection) -> None:
        with self._lock:
            self._clients.discard(client)

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        self.closing = True
        self._close_listener()
        for rule in list(self.rules):
            rule.clear()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            client.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # faults ------------------------------------------------------------------------

    def inject(self, action: Action, method=None, path=".*", query=None, times=1, skip=0) -> Rule:
        """Add a rule (see Rule); returns it (rule.hits, rule.wait_hits, rule.clear)."""
        rule = Rule(action, method, path, query, times, skip)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self, rule: Optional[Rule] = None) -> None:
        """Clear one rule, or all of them (their hanging requests are closed)."""
        with self._lock:
            rules = [rule] if rule else list(self.rules)
            self.rules = [r for r in self.rules if r not in rules]
        for r in rules:
            r.clear()

    def fail_all(self, mode: str = "hang") -> None:
        """A cut-off node. "hang": every request, and every answer still on its
        way from Consul, hangs until heal(); "refuse": open connections are
        closed and new ones refused (nothing listens on the port)."""
        assert mode in ("hang", "refuse")
        self.failing = mode
        if mode == "refuse":
            self._close_listener()
            with self._lock:
                clients = list(self._clients)
            for client in clients:
                client.close()

    def heal(self) -> None:
        """Clear every rule and fail_all; what was hanging is closed (the
        client sees a dropped connection and retries)."""
        was = self.failing
        self.clear()
        with self._lock:
            self.failing = None
            self.generation += 1
        if was == "refuse":
            self._listen()

    def dispatch(self, ctx: Exchange) -> None:
        with self._lock:
            self.log.append(ctx.request)
            self._lock.notify_all()
            rule = None
            if self.failing is None:
                rule = next((r for r in self.rules if r.take(ctx.request)), None)
            ctx.request.rule = rule
        if self.failing is not None:
            ctx.hang()
        elif rule is not None:
            rule.action.handle(ctx)
        else:
            status, headers, body = ctx.forward()
            if status is not None:
                ctx.answer(status, headers, body)
        with self._lock:
            self._lock.notify_all()

    # observation -------------------------------------------------------------------

    def requests(self, method=None, path=".*", query=None, since: float = 0.0,
                 answered: Optional[bool] = None) -> list:
        """Recorded requests matching (like a Rule) that arrived at or after
        `since` (time.monotonic()); answered=True/False: with or without an answer."""
        probe = Rule(Action(), method, path, query)
        with self._lock:
            found = [r for r in self.log if r.t >= since and probe.matches(r.method, r.path, r.query)]
        if answered is not None:
            found = [r for r in found if (r.status is not None) == answered]
        return found

    def wait_request(self, method=None, path=".*", query=None, since: float = 0.0,
                     timeout: float = 10.0, answered: Optional[bool] = None,
                     where: Callable[[Request], bool] = lambda r: True) -> Request:
        """The first recorded request matching (see requests()) and `where`, waiting for it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self.requests(method, path, query, since, answered) if where(r)]
                if found:
                    return found[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout("no %s %s %s since %.3f within %.1fs; last requests: %s"
                                      % (method or "*", path, query or "", since, timeout,
                                         self.log[-8:]))
                self._lock.wait(min(remaining, 0.2))
