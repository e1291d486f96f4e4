"""Prometheus metrics (SPEC §11.6): what the election loop reports, served at ``/metrics``.

A thin sink. The loop, the Consul adapter and the hook runner call a handful
of methods (``role``, ``session_confirmed``, ``session_replaced``,
``consul_error``, ``hook_run``) that only set numbers; nothing here decides
anything, and nothing here can stop or slow the loop:

* every method is a few dictionary updates under prometheus_client's own
  short locks, and never raises (a bug here is logged once, not propagated);
* the HTTP server runs on daemon threads of its own: a blocking ``accept()``
  (no polling, so an idle daemon stays idle) and one short-lived thread per
  scrape, each with a socket timeout, so a slow or silent scraper ties up
  only its own thread;
* ages are computed when scraped, from a timestamp and the injected clock,
  so the loop never has to tick them.

Without ``--metrics-address`` the loop gets :class:`NullMetrics` and
prometheus_client is not even imported (it costs about 10 MB of RSS).

The metrics live in a private ``CollectorRegistry``: nothing global, so two
instances in one process (the tests) do not mix. Beside ours, the registry
carries ``process_*`` (RSS, CPU, open files, start time — a reload
re-executes, so the start time also shows reloads): a statm read, a listing
of /proc/self/fd and os.times() per scrape (see _ProcessCollector).

The listening socket is bound before READY=1 (an unusable address is a
configuration error, exit 78, naming the flag). It is created close-on-exec,
as Python creates every socket (PEP 446): the re-executed program of a reload
does not inherit it; ``close()`` also shuts it before the exec, and
SO_REUSEADDR lets the new program bind the same port at once.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .config import ConfigError

log = logging.getLogger("vip_elector")

FLAG = "--metrics-address"
#: The roles the loop reports (election.Role's values), initialised to 0 so every series exists.
ROLES = ("starting", "waiting", "follower", "leader", "cut-off", "stopping")
#: What consul_errors_total counts, by kind (see error_kind).
ERROR_KINDS = ("unreachable", "timeout", "denied", "server_error", "bad_answer")
HOOK_STATES = ("leader", "standby")
HOOK_RESULTS = ("ok", "failed", "killed", "not_run")
#: What vip_errors_total counts (--manage-vip): netlink changes of the VIP that failed.
VIP_ACTIONS = ("add", "remove")
#: A scraper that sends nothing for this long is dropped (its thread ends).
SCRAPE_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# The address


@dataclass(frozen=True)
class MetricsAddress:
    """``HOST:PORT`` or ``[V6]:PORT``, as given (the host is resolved when bound)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_metrics_address(text: str) -> MetricsAddress:
    """``127.0.0.1:9101``, ``[::1]:9101``, ``localhost:9101`` → MetricsAddress; else ConfigError."""
    text = text.strip()
    m = re.fullmatch(r"\[([^\]\s]+)\]:(\d+)", text) or re.fullmatch(r"([^:\[\]/\s]*):(\d+)", text)
    if not m:
        raise ConfigError(f"{FLAG} {text!r} is not HOST:PORT: write e.g. 127.0.0.1:9101, or "
                          "[::1]:9101 for an IPv6 address.")
    host, port = m.group(1), int(m.group(2))
    if not host:
        raise ConfigError(f"{FLAG} {text!r} names no host: write 127.0.0.1:{port} (this host only), "
                          f"or 0.0.0.0:{port} / [::]:{port} to listen on every address.")
    if not 0 < port < 65536:
        raise ConfigError(f"{FLAG} {text!r}: port {port} is out of range (1-65535).")
    return MetricsAddress(host, port)


def _resolve(address: MetricsAddress) -> tuple[int, tuple]:
    """(family, sockaddr) to bind; ConfigError when the host is not an address of this host's."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as e:
        raise ConfigError(f"{FLAG} {address}: cannot resolve {address.host!r} ({e.strerror}); "
                          "give an IP address, e.g. 127.0.0.1.") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


_BIND_ADVICE = {
    errno.EADDRINUSE: "another program listens on this port: choose another port "
                      "(each vip-elector instance needs its own)",
    errno.EADDRNOTAVAIL: "this host has no such address: give one of its own, e.g. 127.0.0.1",
    errno.EACCES: "not permitted (ports below 1024 need privileges vip-elector does not have): "
                  "choose a port above 1024, e.g. 9101",
    errno.EPERM: "not permitted (the unit's sandbox, or a security policy): choose another "
                 "address or port",
    errno.EAFNOSUPPORT: "this host has no IPv6 (or IPv4): give an address of the other family",
}


def bind(address: MetricsAddress) -> socket.socket:
    """A listening socket on the address (SO_REUSEADDR, close-on-exec); ConfigError if unusable."""
    family, sockaddr = _resolve(address)
    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address.host == "::" else 1)
        sock.bind(sockaddr)
        sock.listen(16)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        advice = _BIND_ADVICE.get(e.errno, "choose another address or port")
        raise ConfigError(f"{FLAG} {address}: cannot listen there: "
                          f"{(e.strerror or str(e)).lower()}; {advice}.") from None


def same_address(a: MetricsAddress, b: Optional[MetricsAddress]) -> bool:
    """Whether the two name the same socket (``localhost:9101`` and ``127.0.0.1:9101`` may)."""
    if b is None or a == b:
        return a == b
    try:
        return _resolve(a) == _resolve(b)
    except ConfigError:
        return False


def check_address(address: MetricsAddress, key: Optional[str] = None) -> tuple[bool, str]:
    """For --check: (ok, words) — can the address be bound, or is it our running daemon's?"""
    try:
        bind(address).close()
        return True, f"metrics: {address} can be listened on ({FLAG})"
    except ConfigError as e:
        problem = str(e)
    if key is not None and _served_by_elector(address, key):
        return True, f"metrics: {address} is served by the running vip-elector for {key}"
    return False, f"metrics: {problem}"


def _served_by_elector(address: MetricsAddress, key: str) -> bool:
    """Whether a vip-elector for ``key`` answers at the address (it holds the port, rightly)."""
    import urllib.request
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never $http_proxy
    try:
        with direct.open(f"http://{address}/metrics", timeout=2) as r:
            text = r.read(1 << 20).decode("utf-8", "replace")
    except (OSError, ValueError):
        return False
    quoted = key.replace("\\", r"\\").replace('"', r"\"")
    return any(line.startswith("vip_elector_info{") and f'key="{quoted}"' in line
               for line in text.splitlines())


# --------------------------------------------------------------------------
# What the loop reports


def error_kind(error: BaseException) -> Optional[str]:
    """The consul_errors_total kind of a ConsulError; None for answers that are not faults.

    A refused session create (a check not passing) and a session Consul no
    longer has are Consul's answers, acted on by the loop and seen in the
    role and transitions; a request abandoned for a stop is ours.
    """
    from .consul import (CheckNotPassing, ConsulServerError, ConsulTimeout, ConsulUnreachable,
                         InvalidSession, PermissionDenied, RequestAbandoned)
    if isinstance(error, (CheckNotPassing, InvalidSession, RequestAbandoned)):
        return None
    if isinstance(error, ConsulTimeout):
        return "timeout"
    if isinstance(error, ConsulUnreachable):
        return "unreachable"
    if isinstance(error, PermissionDenied):
        return "denied"
    if isinstance(error, ConsulServerError):
        return "server_error"
    return "bad_answer"


class NullMetrics:
    """What the loop calls when ``--metrics-address`` is not given: nothing happens."""

    def role(self, role: str) -> None:
        """The node's role now (called on every role change, repeats allowed)."""

    def session_confirmed(self, at: Optional[float]) -> None:
        """Consul last confirmed the session at ``at`` (the loop's clock); None: no session."""

    def session_replaced(self) -> None:
        """The session was replaced in place after Consul trouble (SPEC §9.4)."""

    def consul_error(self, error: BaseException) -> None:
        """A request to Consul failed (any thread)."""

    def hook_run(self, state: str, result: str) -> None:
        """A hook call ended: state leader|standby, result ok|failed|killed|not_run."""

    def vip_error(self, action: str) -> None:
        """--manage-vip: adding or removing the VIP failed (the keeper retries): add|remove."""

    def close(self) -> None:
        """Stop serving; the socket is closed (before a reload's exec, or at exit)."""


def _guarded(method):
    """A metrics method never raises into its caller: a bug is logged once."""
    def call(self, *args):
        try:
            method(self, *args)
        except Exception:
            if not self._failed:
                self._failed = True
                log.exception("internal error in the metrics (%s); the election is unaffected",
                              method.__name__)
    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class Metrics(NullMetrics):
    """The numbers, in a private registry; ``serve()`` puts them on the address."""

    def __init__(self, version: str, key: str, value: str, hooks: bool = False,
                 clock: Callable[[], float] = time.monotonic, process: bool = True,
                 priority: int = 100, vip: bool = False):
        from prometheus_client import CollectorRegistry, Counter, Gauge
        self.clock = clock
        self._failed = False
        self._role: Optional[str] = None
        self._confirmed_at: Optional[float] = None
        self._server: Optional[_Server] = None
        self.registry = r = CollectorRegistry(auto_describe=True)
        if process:
            r.register(_ProcessCollector())
        info = Gauge("vip_elector_info", "This daemon: its version, the trigger-key it competes "
                     "for and the value it writes there (always 1).",
                     ["version", "key", "value"], registry=r)
        info.labels(version, key, value).set(1)
        Gauge("vip_elector_priority", "This node's --priority (0-255, default 100): a free key "
              "goes to the highest priority present (SPEC §11.4).", registry=r).set(priority)
        self.leader = Gauge("vip_elector_leader", "1 while this node claims leadership (holds the "
                            "trigger-key with a session Consul confirmed recently), else 0.",
                            registry=r)
        self.roles = Gauge("vip_elector_role", "1 for the role this node is in now (leader, "
                           "follower, waiting: no session, cut-off: Consul has not confirmed the "
                           "session lately, starting, stopping), 0 for the others.",
                           ["role"], registry=r)
        self.transitions = Counter("vip_elector_transitions", "Role changes of this node since "
                                   "it started, by the role it changed to.", ["to"], registry=r)
        for role in ROLES:
            self.roles.labels(role).set(0)
            self.transitions.labels(role)
        age = Gauge("vip_elector_session_confirmed_age_seconds", "Seconds since Consul last "
                    "confirmed a session of this node (a renewal, acquire or creation it "
                    "answered); +Inf before the first. Grows while the node has no session.",
                    registry=r)
        age.set_function(self._confirmed_age)
        self.errors = Counter("vip_elector_consul_errors", "Requests to Consul that failed, by "
                              "kind: unreachable (no connection, reset, TLS), timeout (no answer "
                              "in time), denied (ACL), server_error (HTTP 5xx), bad_answer "
                              "(anything else unexpected).", ["kind"], registry=r)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)
        self.replacements = Counter("vip_elector_session_replacements", "Sessions replaced in "
                                    "place after Consul trouble (the lock moved to a new "
                                    "session, the key's value unchanged).", registry=r)
        self.hooks = Counter("vip_elector_hook_runs", "Calls of the --hook that ended, by state "
                             "(leader, standby) and result: ok (exit 0), failed (non-zero exit), "
                             "killed (by a signal: over --hook-timeout, or a stop's deadline), "
                             "not_run (it could not be started).", ["state", "result"], registry=r)
        if hooks:
            for state in HOOK_STATES:
                for result in HOOK_RESULTS:
                    self.hooks.labels(state, result)
        self.vip_errors = None
        if vip:
            self.vip_errors = Counter("vip_elector_vip_errors", "--manage-vip: changes of the "
                                      "VIP that failed, by action (add, remove); each is retried "
                                      "every 0.5 s, and the address's lifetime ends a stuck one.",
                                      ["action"], registry=r)
            for action in VIP_ACTIONS:
                self.vip_errors.labels(action)

    # ---------------------------------------------------------- the sink

    @_guarded
    def role(self, role: str) -> None:
        if role == self._role:
            return
        previous, self._role = self._role, role
        if previous is not None:  # the first role is where the daemon starts, not a change
            self.roles.labels(previous).set(0)
            self.transitions.labels(role).inc()
        self.roles.labels(role).set(1)
        self.leader.set(1 if role == "leader" else 0)

    @_guarded
    def session_confirmed(self, at: Optional[float]) -> None:
        if at is not None:
            self._confirmed_at = at

    @_guarded
    def session_replaced(self) -> None:
        self.replacements.inc()

    @_guarded
    def consul_error(self, error: BaseException) -> None:
        kind = error_kind(error)
        if kind is not None:
            self.errors.labels(kind).inc()

    @_guarded
    def hook_run(self, state: str, result: str) -> None:
        self.hooks.labels(state, result).inc()

    @_guarded
    def vip_error(self, action: str) -> None:
        if self.vip_errors is not None:
            self.vip_errors.labels(action).inc()

    def _confirmed_age(self) -> float:
        at = self._confirmed_at
        return math.inf if at is None else max(0.0, self.clock() - at)

    # ---------------------------------------------------------- serving

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)

    def serve(self, sock: socket.socket) -> None:
        """Serve /metrics on the bound socket, from daemon threads of its own."""
        self._server = _Server(sock, self.registry)
        self._server.start()

    def serve_later(self, address: MetricsAddress, every: float = 5.0) -> None:
        """After a reload whose address was free when checked but is not now: keep trying."""
        def retry() -> None:
            _block_signals()
            while self._server is None:
                time.sleep(every)
                try:
                    sock = bind(address)
                except ConfigError:
                    continue
                self.serve(sock)
                log.info("metrics: serving on %s now", address)
        threading.Thread(target=retry, name="metrics-bind", daemon=True).start()

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()


class _ProcessCollector:
    """``process_*`` as Prometheus names them, read in ways the unit's sandbox allows.

    prometheus_client's own ProcessCollector needs ``/proc/stat`` (the boot
    time), which ``ProcSubset=pid`` hides: it then reports nothing. Here: RSS
    from ``/proc/self/statm``, CPU from ``os.times()`` (every thread, ended
    scrape threads included), open files from ``/proc/self/fd``, and the start
    time of this program (a reload's exec starts a new one).
    """

    def __init__(self):
        self.started = time.time()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        times = os.times()
        yield CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time "
                                  "spent in seconds.", value=times.user + times.system)
        yield GaugeMetricFamily("process_start_time_seconds", "Start time of the process since "
                                "unix epoch in seconds (a reload re-executes: a new start).",
                                value=self.started)
        try:
            with open("/proc/self/statm", "rb") as f:
                rss = int(f.read().split()[1]) * self.page
            yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in "
                                    "bytes.", value=rss)
            yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.",
                                    value=len(os.listdir("/proc/self/fd")))
        except (OSError, ValueError, IndexError):
            pass


def _block_signals() -> None:
    """Process-directed signals are the main thread's (its wakeup fd, the re-exec's mask)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP})


class _Server:
    """A blocking accept() loop on the bound socket; each scrape on a thread of its own."""

    def __init__(self, sock: socket.socket, registry):
        import http.server
        from prometheus_client.exposition import choose_encoder

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = SCRAPE_TIMEOUT
            server_version = "vip-elector"

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
                    self.send_error(404, "vip-elector serves /metrics only")
                    return
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                body = encoder(registry)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
                pass

        self.handler = Handler
        self.sock = sock
        self.closed = False
        self.server_address = sock.getsockname()
        self.thread = threading.Thread(target=self._accept, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _accept(self) -> None:
        _block_signals()  # inherited by every scrape's thread
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError as e:
                if self.closed:
                    return
                log.warning("metrics: cannot accept a connection: %s", e.strerror or e)
                time.sleep(1.0)  # e.g. out of file descriptors: do not spin
                continue
            try:
                threading.Thread(target=self._scrape, args=(conn, peer), name="metrics-scrape",
                                 daemon=True).start()
            except RuntimeError:  # cannot start a thread: drop this scrape, not the server
                conn.close()

    def _scrape(self, conn: socket.socket, peer) -> None:
        try:
            self.handler(conn, peer, self)
        except Exception as e:  # a scraper that went away, a bug: never more than this scrape
            log.debug("metrics: scrape from %s failed: %s", peer, e)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close the listening socket; a blocked accept() returns at once (shutdown wakes it)."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


__all__ = ["Metrics", "NullMetrics", "MetricsAddress", "parse_metrics_address", "bind",
           "check_address", "error_kind", "FLAG"]
