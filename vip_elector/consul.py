"""The Consul adapter: the only module that knows the ``consul`` library.

Works with any of the three libraries Debian has shipped under the module
name ``consul`` (python-consul2 0.1.5, python-consul 0.7.1, py-consul 1.5):
we keep to the calls they share and supply our own HTTP transport beneath
them, as Patroni does, because none of them does what a daemon needs:

* every request has a timeout (a blocking query gets ``wait`` plus Consul's
  jitter plus slack), so a silent Consul can never hang the election loop;
* the token travels only in the ``X-Consul-Token`` header (python-consul
  0.7.1 would put it in the URL, where error messages would show it);
* ``CONSUL_HTTP_ADDR`` and ``CONSUL_HTTP_TOKEN`` in the environment cannot
  override what SPEC §3's precedence chose (all three libraries let them);
* Consul's error answers become typed exceptions, so the election loop reacts
  to types, not to strings.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import json
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import consul as consul_lib
import consul.base as consul_base

from .config import SERF_HEALTH, ConfigError, Settings, format_duration, parse_duration

# Consul's protocol, as vip-elector uses it ------------------------------------

#: The flags HashiCorp's lock API puts on a lock key; ``consul lock`` and the
#: Go vip-elector use it too, so all three recognise each other's locks.
LOCK_FLAG = 0x2DDCCBC058A50C18
#: Session behaviour: when the session is invalidated Consul deletes the key it
#: holds, so vip-manager drops the VIP at once.
SESSION_BEHAVIOR = "delete"
CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 5.0


class ConsulError(Exception):
    """Consul answered with an error we did not expect; retry with backoff."""


class ConsulUnreachable(ConsulError):
    """No answer: connection refused, timed out, TLS failure, not Consul."""


class ConsulTimeout(ConsulUnreachable):
    """No answer in time (the request's timeout, or the step's time budget, ran out)."""


class RequestAbandoned(ConsulUnreachable):
    """Ended by us (a stop aborts what is in flight), not by Consul."""


class ConsulServerError(ConsulError):
    """Consul answered HTTP 5xx: no cluster leader, an RPC error, a server in trouble."""


class PermissionDenied(ConsulError):
    """The ACL token lacks a right (or is unknown); retrying won't help until it is fixed.

    ``call`` is the refused request ("PUT /v1/session/create"): Consul 1.8's
    answer says only "Permission denied", so the call is what tells which
    rule is missing (``check.rule_for``).
    """

    def __init__(self, reason: str, call: Optional[str] = None):
        super().__init__(f"{reason} on {call}" if call else reason)
        self.reason = reason
        self.call = call

    @property
    def unknown_token(self) -> bool:
        """Consul does not know the token at all (not a missing right)."""
        return "acl not found" in self.reason.lower()


class InvalidSession(ConsulError):
    """The session is gone: destroyed, expired, or its check failed."""


class CheckNotPassing(ConsulError):
    """Session create refused: a bound check is critical or not registered."""

    @property
    def check_id(self) -> Optional[str]:
        m = re.search(r"[Cc]heck '([^']+)'", str(self))
        return m.group(1) if m else None

    @property
    def state(self) -> Optional[str]:
        return None if "missing check" in str(self).lower() else "critical"


class InvalidSessionTTL(ConsulError):
    """Consul refused the TTL (outside 10s..24h)."""


@dataclass(frozen=True)
class KeyState:
    """The trigger-key as Consul has it."""

    value: str
    flags: int
    session: Optional[str]
    modify_index: int

    @property
    def is_lock(self) -> bool:
        return self.flags == LOCK_FLAG


def _short_reason(exc: BaseException, address: str = "") -> str:
    """Turn a socket, TLS or HTTP exception into words an operator reads."""
    text = f"{type(exc).__name__}: {exc}"
    refused = (f"connection refused by {address}: is the Consul agent running there (its "
               "client_addr and ports.http)?" if address else "connection refused")
    for needle, words in (
        ("Connection refused", refused),
        ("Name or service not known", "host name not found"),
        ("Temporary failure in name resolution", "host name not found"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted (set CONSUL_CACERT)"),
        ("SSL", "TLS handshake failed"),
        ("Read timed out", "no answer (timed out)"),
        ("timed out", "no answer (timed out)"),
        ("RemoteDisconnected", "connection closed by peer"),
        ("Remote end closed", "connection closed by peer"),
        ("BadStatusLine", "it does not speak HTTP (is it Consul?)"),
        ("Connection reset", "connection reset"),
        ("Connection aborted", "connection closed by peer"),
    ):
        if needle in text:
            return words
    return type(exc).__name__


class _Transport:
    """The HTTP client the consul library calls: http.client, keep-alive, timeouts.

    Has the interface of ``consul.base.HTTPClient`` for all three libraries.
    One persistent connection per thread (the watcher thread and the
    election loop talk to Consul at the same time). Plain ``http.client``
    rather than ``requests``: a request costs a fraction of a millisecond
    instead of one or two, and a planned handover is two requests long.

    Two controls the loop needs and no library offers: ``time_limit()`` caps
    every request of a step by one budget (a step never outlasts it, however
    slowly Consul answers), and ``abort(thread)`` ends whatever request that
    thread has in flight at once, from any thread (a stop signal must not wait
    for a renewal's timeout; an abandoned blocking query must not hold its
    connection for a minute).
    """

    def __init__(self, settings: Settings):
        self.scheme, self.host, self.port = settings.scheme, settings.host, settings.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.base_uri = f"{self.scheme}://{host}:{self.port}"
        self.address = settings.address
        self.token = settings.token
        self._ssl = _ssl_context(settings) if self.scheme == "https" else None
        self._threads: dict[int, _ThreadState] = {}
        self._lock = threading.Lock()
        self._response_fields = consul_base.Response._fields

    # The libraries' HTTPClient API --------------------------------------

    def uri(self, path: str, params: Any = None) -> str:
        return self.base_uri + self._target(path, params)

    def get(self, callback, path, params=None, headers=None):
        return self._call("GET", callback, path, params, None, headers)

    def put(self, callback, path, params=None, data="", headers=None):
        return self._call("PUT", callback, path, params, data, headers)

    def delete(self, callback, path, params=None, data="", headers=None):
        return self._call("DELETE", callback, path, params, data, headers)

    def post(self, callback, path, params=None, data="", headers=None):
        return self._call("POST", callback, path, params, data, headers)

    def close(self) -> None:
        """Close this thread's connection."""
        self._state().drop()

    # Ours -----------------------------------------------------------------

    @property
    def last_status(self) -> Optional[int]:
        return self._state().status

    @contextlib.contextmanager
    def time_limit(self, seconds: float) -> Iterator[None]:
        """Every request of this thread inside ends within ``seconds`` from now."""
        state = self._state()
        old = state.deadline
        new = time.monotonic() + max(0.0, seconds)
        state.deadline = new if old is None else min(old, new)
        try:
            yield
        finally:
            state.deadline = old

    def time_left(self) -> Optional[float]:
        """What remains of this thread's time limit (None: none is set)."""
        deadline = self._state().deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def abort(self, thread_id: int) -> None:
        """End the request that thread has in flight, and refuse its next ones, until
        that thread calls ``reset_abort()`` (safe from any thread)."""
        state = self._threads.get(thread_id)
        if state is not None:
            state.abort()

    def reset_abort(self) -> None:
        """This thread's requests may go out again (an aborted request dropped its connection)."""
        self._state().aborted = False

    def _state(self) -> "_ThreadState":
        ident = threading.get_ident()
        me = threading.current_thread()
        state = self._threads.get(ident)
        if state is None or state.owner is not me:
            # A thread that has ended leaves its ident to the next one (pthreads reuse them):
            # a restarted watcher must not inherit the abort meant for the thread it replaces,
            # or every request of its would be "abandoned" and it would stay deaf.
            with self._lock:
                # Forget the states of threads that have ended.
                alive = {t.ident for t in threading.enumerate()}
                for gone in [i for i in self._threads if i not in alive or i == ident]:
                    self._threads.pop(gone).drop()
                state = self._threads[ident] = _ThreadState(me)
        return state

    @staticmethod
    def _target(path: str, params: Any) -> str:
        target = urllib.parse.quote(path, safe="/:")
        return f"{target}?{urllib.parse.urlencode(params)}" if params else target

    def _connection(self, state: "_ThreadState", connect_timeout: float) -> http.client.HTTPConnection:
        if state.conn is None:
            if self._ssl is not None:
                state.conn = http.client.HTTPSConnection(self.host, self.port, context=self._ssl)
            else:
                state.conn = http.client.HTTPConnection(self.host, self.port)
        state.conn.timeout = connect_timeout
        return state.conn

    def _read_timeout(self, state: "_ThreadState", params: list) -> float:
        timeout = REQUEST_TIMEOUT
        wait, index = dict(params).get("wait"), dict(params).get("index")
        if wait is not None and index is not None:  # a blocking query: wait + Consul's jitter + slack
            seconds = parse_duration(str(wait))
            timeout = seconds + seconds / 16 + REQUEST_TIMEOUT
        if state.deadline is not None:
            left = state.deadline - time.monotonic()
            if left <= 0.001:
                raise ConsulTimeout("no answer in time (this step's time budget is spent)")
            timeout = min(timeout, left)
        return timeout

    def _call(self, method, callback, path, params, data, headers):
        params = list(params.items()) if isinstance(params, dict) else list(params or [])
        # The token goes in the header, never in the URL (python-consul 0.7.1).
        params = [(k, v) for k, v in params if k != "token"]
        headers = {k: v for k, v in (headers or {}).items() if k.lower() != "x-consul-token"}
        if self.token:
            headers["X-Consul-Token"] = self.token
        state = self._state()
        body = data.encode("utf-8") if isinstance(data, str) else data  # one segment with the headers
        target = self._target(path, params)
        for attempt in (1, 2):
            read_timeout = self._read_timeout(state, params)
            if state.aborted:
                raise RequestAbandoned("request abandoned")
            conn = self._connection(state, min(CONNECT_TIMEOUT, read_timeout))
            reused = conn.sock is not None
            try:
                if conn.sock is None:
                    conn.connect()
                state.in_flight = conn.sock
                if state.aborted:  # aborted between the check above and now
                    raise ConnectionAbortedError("aborted")
                conn.sock.settimeout(read_timeout)
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                content = response.read()
            except (OSError, http.client.HTTPException) as e:
                state.drop()  # a half-read connection is useless
                if state.aborted:
                    raise RequestAbandoned("request abandoned") from None
                # A kept-alive connection the agent had closed fails at once: one fresh try.
                if reused and attempt == 1 and not isinstance(e, (TimeoutError, socket.timeout)):
                    continue
                timeout = isinstance(e, (TimeoutError, socket.timeout))
                raise (ConsulTimeout if timeout else ConsulUnreachable)(
                    _short_reason(e, self.address)) from None
            finally:
                state.in_flight = None
            if response.will_close:
                state.drop()
            break
        status = response.status
        state.status = status
        text = content.decode("utf-8", "replace")
        if status >= 400 and status != 404:
            raise _error_for(status, text, f"{method} {path}")
        if 300 <= status < 400:
            raise ConsulError(f"unexpected redirect ({status}) for {path}")
        fields = {"code": status, "headers": response.headers, "body": text, "content": content}
        try:  # the library decodes the body here: Consul's JSON, or not
            return callback(consul_base.Response(**{f: fields[f] for f in self._response_fields}))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise ConsulError(f"unexpected answer (is {self.address} a Consul agent?): "
                              f"{type(e).__name__}") from None


class _ThreadState:
    """One thread's connection, its deadline and whether its request was aborted."""

    def __init__(self, owner: Optional[threading.Thread] = None):
        self.owner = owner                      # the thread this state is for (idents are reused)
        self.conn: Optional[http.client.HTTPConnection] = None
        self.in_flight: Optional[socket.socket] = None
        self.deadline: Optional[float] = None
        self.status: Optional[int] = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        sock = self.in_flight  # an idle kept-alive connection stays: the stop's release uses it
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() at once
            except OSError:
                pass

    def drop(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS as CONSUL_CACERT, CONSUL_CLIENT_CERT/KEY and CONSUL_HTTP_SSL_VERIFY ask."""
    tls = settings.tls
    try:
        context = ssl.create_default_context(cafile=tls.verify if isinstance(tls.verify, str) else None)
        if tls.verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.cert:
            context.load_cert_chain(*tls.cert)
    except (ssl.SSLError, OSError) as e:
        which = "CONSUL_CLIENT_CERT/CONSUL_CLIENT_KEY" if tls.cert else "CONSUL_CACERT"
        raise ConfigError(f"{which}: cannot load the certificate or key: "
                          f"{getattr(e, 'reason', None) or e.strerror or e}.") from None
    return context


def _error_for(code: int, body: str, call: Optional[str] = None) -> ConsulError:
    text = " ".join(body.split())[:200]
    lowered = text.lower()
    if code == 403 or "permission denied" in lowered or "acl not found" in lowered:
        return PermissionDenied(text or "permission denied", call)
    if "invalid session ttl" in lowered:
        return InvalidSessionTTL(text)
    if "in critical state" in lowered or "missing check" in lowered:
        return CheckNotPassing(text)
    if "invalid session" in lowered or "session" in lowered and "not found" in lowered:
        return InvalidSession(text)
    error = ConsulServerError if code >= 500 else ConsulError
    return error(f"HTTP {code}: {text}" if text else f"HTTP {code}")


@contextlib.contextmanager
def _without_consul_environment() -> Iterator[None]:
    """The libraries read CONSUL_HTTP_* while constructing; hide them for that moment."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("CONSUL_HTTP")}
    try:
        yield
    finally:
        os.environ.update(saved)


def _translated(method):
    """Library exceptions (they differ between the three) become our ConsulError.

    Anything else is a bug of ours and goes up as it is (the loop logs it as
    an internal error): an answer that is not Consul's is caught where it is
    decoded, in the transport's callback and in the parsers below.
    """
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except consul_base.ConsulException as e:
            raise ConsulError(f"unexpected answer from Consul: {type(e).__name__}: {e}"[:300]) from None

    @functools.wraps(method)
    def reported(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        except ConsulError as e:
            self.on_error(e)  # the metrics' error counter (SPEC §11.6); never raises
            raise
    return reported


class _Library(consul_lib.Consul):
    """The library's client, on our transport."""

    def __init__(self, transport: _Transport):
        self._vip_transport = transport
        with _without_consul_environment(), warnings.catch_warnings():
            # python-consul2 warns about Consul APIs we never call (legacy ACLs, discovery chain).
            warnings.simplefilter("ignore", DeprecationWarning)
            super().__init__()
        self.http = transport
        self.token = None  # the transport adds the token header itself

    def http_connect(self, *args, **kwargs):
        return self._vip_transport


class ConsulClient:
    """What the election loop needs from Consul, in its own words."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.transport = _Transport(settings)
        self._lib = _Library(self.transport)
        self.key = settings.trigger_key
        #: Told of every error a call raises, from whichever thread made it (metrics.py).
        self.on_error: Callable[[ConsulError], None] = lambda error: None

    # Agent and health ---------------------------------------------------

    @_translated
    def node_name(self) -> Optional[str]:
        """The local agent's node name, for messages; None if the token may not read the agent.

        Nothing depends on it: the session is created on the agent's own node
        by default, and the checks are read from the agent.
        """
        try:
            data = self._lib.agent.self()
        except PermissionDenied:  # agent:read is not part of the least-privilege policy
            return None
        try:
            name = data["Config"]["NodeName"]
        except (TypeError, KeyError):
            name = None
        if not isinstance(name, str):
            raise ConsulError("the address does not answer like a Consul agent")
        return name

    @_translated
    def check_states(self, check_ids: list[str]) -> dict[str, Optional[str]]:
        """Status of each check on the local agent (None: not registered there).

        ``serfHealth`` is not a check of the agent's own; Consul itself judges
        it when the session is created (CheckNotPassing names it then).
        """
        return {cid: status for cid, (status, _) in self.check_details(check_ids).items()}

    @_translated
    def check_details(self, check_ids: list[str]) -> dict[str, tuple[Optional[str], str]]:
        """Status and last output of each check on the local agent ((None, "") if not there).

        The output is what the check's script or HTTP probe said: the reason
        a person needs when the node waits for a critical check.
        """
        checks = self._lib.agent.checks()
        if not isinstance(checks, dict):
            raise ConsulError("the address does not answer like a Consul agent")
        details = {}
        for cid in check_ids:
            check = checks.get(cid)
            if not isinstance(check, dict):
                details[cid] = (None, "")
                continue
            output = check.get("Output")
            details[cid] = (check.get("Status"), " ".join(output.split())[:200]
                            if isinstance(output, str) else "")
        return details

    @_translated
    def raft_leader(self) -> str:
        """The Consul servers' raft leader ("address:port"; "" while there is none).

        Needs no ACL. A change means a server lost its leadership: one that did
        while holding expired session timers retries their destroys for minutes.
        """
        leader = self._lib.status.leader()
        if not isinstance(leader, str):
            raise ConsulError("unexpected answer to a raft leader query (is this a Consul agent?)")
        return leader

    # Sessions -----------------------------------------------------------

    @_translated
    def create_session(self, checks: list[str], ttl: Optional[float] = None,
                       lock_delay: Optional[float] = None) -> str:
        """A session on the agent's node; ``ttl``/``lock_delay`` default to the settings'
        (a reload passes the new configuration's, §8.3)."""
        s = self.settings
        session = self._lib.session.create(
            name=s.session_name, checks=checks, behavior=SESSION_BEHAVIOR,
            ttl=_whole(s.ttl if ttl is None else ttl),
            lock_delay=_whole(s.lock_delay if lock_delay is None else lock_delay))
        if not isinstance(session, str) or not session:
            raise _malformed("a session create", self.settings)
        return session

    @_translated
    def session_info(self, session_id: str) -> Optional["SessionInfo"]:
        """What Consul knows of a session, or None when it has no such session."""
        _, data = self._lib.session.info(session_id)
        if self.transport.last_status == 404 or not data:
            return None
        if not isinstance(data, dict):
            raise ConsulError("unexpected answer to a session query (is this a Consul agent?)")
        return _session_info(data)

    @_translated
    def renew_session(self, session_id: str) -> None:
        """Renew, or raise InvalidSession when Consul no longer knows it."""
        try:
            result = self._lib.session.renew(session_id)
        except consul_base.ConsulException:  # python-consul2 raises NotFound on a 404 here
            if self.transport.last_status != 404:
                raise  # (py-consul: a body that is not JSON) not proof the session is gone
            result = None
        if self.transport.last_status == 404 or not result or result == (None, None):
            raise InvalidSession(f"session {session_id} no longer exists")

    @_translated
    def destroy_session(self, session_id: str) -> None:
        self._lib.session.destroy(session_id)

    # The trigger-key ----------------------------------------------------

    @_translated
    def read_key(self, index: Optional[int] = None, wait: Optional[float] = None,
                 key: Optional[str] = None) -> tuple[int, Optional[KeyState]]:
        """Read the key (ours, or ``key``); with ``index`` and ``wait``, a blocking query.

        The index is Consul's ``X-Consul-Index``, 0 when the answer had none.
        """
        kwargs: dict[str, Any] = {}
        if index:
            kwargs = {"index": index, "wait": format_duration(round(wait or 60, 3))}
        new_index, data = self._lib.kv.get(key or self.key, **kwargs)
        if data is not None and not isinstance(data, dict):
            raise _malformed("a key read", self.settings)
        return _index(new_index), _key_state(data)

    @_translated
    def acquire(self, session_id: str) -> bool:
        """Take the lock and write our name in one step; False if someone holds it."""
        return bool(self._lib.kv.put(self.key, self.settings.value, acquire=session_id, flags=LOCK_FLAG))

    @_translated
    def move_lock(self, old_session: str, new_session: str) -> bool:
        """Hand our lock from one of our sessions to another in one transaction.

        The key keeps its value and flags (vip-manager sees no change) and is
        never free in between (no other node can take it); Consul applies the
        unlock and the lock together or not at all. False, with nothing
        changed, when ``old_session`` no longer holds the key or
        ``new_session`` is not valid.
        """
        value = base64.b64encode(self.settings.value.encode("utf-8")).decode("ascii")

        def op(verb: str, session: str) -> dict:
            return {"KV": {"Verb": verb, "Key": self.key, "Value": value, "Flags": LOCK_FLAG,
                           "Session": session}}
        try:
            self.transport.put(lambda response: response, "/v1/txn",
                               data=json.dumps([op("unlock", old_session), op("lock", new_session)]))
        except ConsulError:
            if self.transport.last_status == 409:  # rolled back: one of the operations failed
                return False
            raise
        return True

    # Under the trigger-key's name (SPEC §11) ------------------------------

    @_translated
    def read_tree(self, index: Optional[int] = None,
                  wait: Optional[float] = None) -> tuple[int, Optional[KeyState], list]:
        """The trigger-key and every key under ``<trigger-key>/`` in one read (a blocking
        query with ``index`` and ``wait``): what the watcher keeps open, so a follower
        knows the candidates the moment the key is freed without another request."""
        from .cluster import Entry
        kwargs: dict[str, Any] = {"recurse": True}
        if index:
            kwargs.update(index=index, wait=format_duration(round(wait or 60, 3)))
        new_index, data = self._lib.kv.get(self.key, **kwargs)
        if data is not None and not isinstance(data, list):
            raise _malformed("a key read", self.settings)
        key: Optional[KeyState] = None
        entries = []
        for item in data or []:
            if not isinstance(item, dict) or not isinstance(item.get("Key"), str):
                raise _malformed("a key read", self.settings)
            state = _key_state(item)
            if item["Key"] == self.key:
                key = state
            elif item["Key"].startswith(self.key + "/") and state is not None:
                entries.append(Entry(item["Key"], state.value, state.session, state.modify_index,
                                     state.flags))
        return _index(new_index), key, entries

    @_translated
    def put_candidate(self, session_id: str, record: str) -> bool:
        """Our candidate key, acquired with our session (it vanishes with it); False while
        another session (our replaced one, on its way out) still holds it."""
        from .cluster import candidate_key
        return self._kv_put(candidate_key(self.key, self.settings.value), record, acquire=session_id)

    @_translated
    def delete_candidate(self, modify_index: int) -> bool:
        """Our candidate key, deleted if unchanged since ``modify_index`` (a planned stop)."""
        from .cluster import candidate_key
        return bool(self._lib.kv.delete(candidate_key(self.key, self.settings.value), cas=modify_index))

    @_translated
    def put_request(self, record: str, cas: int) -> bool:
        """Write the switchover request only if unchanged since ``cas`` (0: only if absent)."""
        from .cluster import request_key
        return self._kv_put(request_key(self.key), record, cas=cas)

    @_translated
    def delete_request(self, modify_index: int) -> bool:
        """Delete the switchover request only if nobody changed it since ``modify_index``."""
        from .cluster import request_key
        return bool(self._lib.kv.delete(request_key(self.key), cas=modify_index))

    @_translated
    def hand_over(self, old_session: str, new_session: str, new_value: str) -> bool:
        """Move the lock from our session to another node's, with its name as the value,
        in one transaction: the key is never free, no third session can take it. False,
        with nothing changed, when ``old_session`` no longer holds it or ``new_session``
        is not valid (Consul rolls the transaction back)."""
        def op(verb: str, session: str, value: str) -> dict:
            return {"KV": {"Verb": verb, "Key": self.key, "Flags": LOCK_FLAG, "Session": session,
                           "Value": base64.b64encode(value.encode("utf-8")).decode("ascii")}}
        body = [op("unlock", old_session, self.settings.value), op("lock", new_session, new_value)]
        try:
            self.transport.put(lambda response: response, "/v1/txn", data=json.dumps(body))
        except ConsulError:
            if self.transport.last_status == 409:
                return False
            raise
        return True

    def _kv_put(self, key: str, value: str, **params: Any) -> bool:
        def decode(response) -> bool:
            return response.body.strip() == "true"
        return self.transport.put(decode, f"/v1/kv/{key}", params=params, data=value)

    @_translated
    def delete_if_unchanged(self, modify_index: int, key: Optional[str] = None) -> bool:
        """Delete the key only if nobody changed it since ``modify_index`` (our own write)."""
        return bool(self._lib.kv.delete(key or self.key, cas=modify_index))

    @_translated
    def can_write_key(self) -> None:
        """Probe the write right without writing: a CAS no index can match.

        Consul checks the ACL before the CAS, so a missing right answers 403
        and a present one answers ``false``; nothing is written either way.
        """
        self._lib.kv.put(self.key, "", cas=2 ** 63 - 1)

    @_translated
    def can_write_candidate(self) -> None:
        """The same probe on our candidate key (SPEC §11: key_prefix "<trigger-key>/")."""
        from .cluster import candidate_key
        self._kv_put(candidate_key(self.key, self.settings.value), "", cas=2 ** 63 - 1)

    # Time --------------------------------------------------------------

    def time_limit(self, seconds: float):
        """A context in which every request of this thread ends within ``seconds``."""
        return self.transport.time_limit(seconds)

    def time_left(self) -> Optional[float]:
        """What remains of this thread's time limit, or None without one."""
        return self.transport.time_left()

    def abort(self, thread_id: int) -> None:
        """End at once the request ``thread_id`` has in flight, and refuse its next
        ones until it calls ``reset_abort()`` (from any thread)."""
        self.transport.abort(thread_id)

    def reset_abort(self) -> None:
        """After an abort: this thread's requests may go out again."""
        self.transport.reset_abort()

    def close(self) -> None:
        self.transport.close()

    # --check's explanations --------------------------------------------

    @_translated
    def visible_checks(self) -> dict[str, str]:
        """Every check on the local agent this token may see: {check ID: status}.

        Consul silently leaves out what the token may not read (node:read,
        service:read), so a missing ID is not proof that the check is absent.
        """
        checks = self._lib.agent.checks()
        if not isinstance(checks, dict):
            raise ConsulError("the address does not answer like a Consul agent")
        return {cid: str(c.get("Status") if isinstance(c, dict) else None) for cid, c in checks.items()}

    @_translated
    def catalog_checks(self, node: str) -> dict[str, str]:
        """The node's checks in the catalog (what sessions are judged by): {check ID: status}.
        Empty when the token lacks node:read on it (serfHealth is always there otherwise)."""
        _, checks = self._lib.health.node(node)
        return {c.get("CheckID"): str(c.get("Status")) for c in (checks or []) if isinstance(c, dict)}


@dataclass(frozen=True)
class SessionInfo:
    """A session as Consul describes it; enough to tell whether it is ours (SPEC §8.2)."""

    id: str
    name: str
    node: str
    checks: frozenset[str]
    ttl: Optional[float]
    lock_delay: float
    behavior: str


def _session_info(data: dict) -> SessionInfo:
    checks = set(_strings(data.get("Checks")))
    checks.update(_strings(data.get("NodeChecks")))
    service_checks = data.get("ServiceChecks")
    checks.update(str(c.get("ID", "")) for c in (service_checks if isinstance(service_checks, list) else [])
                  if isinstance(c, dict))
    try:
        ttl = parse_duration(data["TTL"]) if isinstance(data.get("TTL"), str) and data["TTL"] else None
    except ValueError:
        ttl = None
    try:
        lock_delay = int(data.get("LockDelay") or 0) / 1e9  # nanoseconds
    except (TypeError, ValueError):
        lock_delay = -1.0
    return SessionInfo(id=str(data.get("ID") or ""), name=str(data.get("Name") or ""),
                       node=str(data.get("Node") or ""), checks=frozenset(checks), ttl=ttl,
                       lock_delay=lock_delay, behavior=str(data.get("Behavior") or ""))


def _strings(value: Any) -> list[str]:
    """A JSON list of strings, or nothing (a malformed answer names no check)."""
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _malformed(what: str, settings: Settings) -> ConsulError:
    return ConsulError(f"unexpected answer to {what} (is {settings.address} a Consul agent?)")


def _whole(seconds: float):
    return int(seconds) if float(seconds).is_integer() else seconds


def _index(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _key_state(data: Optional[dict]) -> Optional[KeyState]:
    """The key from Consul's JSON; fields of the wrong type read as absent."""
    if not data:
        return None
    raw = data.get("Value")
    if isinstance(raw, str):  # some libraries leave it base64-encoded
        try:
            raw = base64.b64decode(raw)
        except ValueError:
            raw = raw.encode()
    value = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else ""
    session = data.get("Session")
    return KeyState(value=value, flags=_index(data.get("Flags")),
                    session=session if isinstance(session, str) and session else None,
                    modify_index=_index(data.get("ModifyIndex")))


def describe_holder(consul: ConsulClient, key: KeyState) -> str:
    """'session NAME (ID) on node NODE' for the session holding the key, in words."""
    try:
        info = consul.session_info(key.session) if key.session else None
    except ConsulError:
        info = None
    if not info:
        return f"session {key.session} (the token may not read it: session:read on its node)"
    name, node = info.name or "(no name)", info.node or "?"
    return f"session '{name}' ({key.session}) on node {node}"


def library_name() -> str:
    """Which Consul library is in use (distribution, version, path), for ``--version``."""
    from .library import installed
    return installed()


def untested_library() -> Optional[str]:
    """A warning when the Consul library is not one the tests run, else None."""
    from .library import untested_warning
    return untested_warning(consul_lib)


__all__ = [
    "ConsulClient", "ConsulError", "ConsulUnreachable", "PermissionDenied", "InvalidSession",
    "CheckNotPassing", "InvalidSessionTTL", "KeyState", "SessionInfo", "library_name", "describe_holder",
    "LOCK_FLAG", "SESSION_BEHAVIOR", "SERF_HEALTH",
]
