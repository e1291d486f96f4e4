"""An in-memory stand-in for vip_elector.consul.ConsulClient, for the state machine's unit tests.

It models only what a real agent cannot be made to do on demand: refuse an
acquire for a chosen number of attempts, fail renewals for exactly as long as
a test wants, or answer a blocking query at a chosen moment. Everything the
product claims about Consul itself is proven against a real agent elsewhere.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

from vip_elector.consul import (LOCK_FLAG, CheckNotPassing, ConsulError, ConsulUnreachable, InvalidSession, KeyState,
                                SessionInfo)


class FakeConsul:
    def __init__(self, value: str = "node-a"):
        self.value = value
        self.cond = threading.Condition()
        self.index = 1
        self.key: Optional[KeyState] = None
        self.sessions: set[str] = set()
        self.checks: dict[str, Optional[str]] = {"serfHealth": "passing"}
        self.check_output: dict[str, str] = {}
        self.agent_node: Optional[str] = "node1"  # None: the token may not read /v1/agent/self
        self.reachable = True
        self.renew_fails = False
        self.refuse_acquires = 0
        self.calls: list[str] = []
        self.time_limits: list[float] = []
        self.hang = False                 # calls of the election's thread wait for their time limit
        self.main_thread: Optional[int] = None
        self._aborted: set[int] = set()
        self._local = threading.local()
        self.aborts = 0
        self.key_name = "service/pg/leader"
        self.session_names: dict[str, str] = {}
        self._next_session = 0
        self.checks_of: dict[str, tuple] = {}
        self.params_of: dict[str, tuple] = {}
        self.ttl, self.lock_delay = 0.6, 0.2
        self.leader = "10.0.0.1:8300"     # the raft leader
        # Other nodes' checks in the catalog (/v1/health/node); a node not named: all passing.
        self.node_checks: dict[str, dict[str, str]] = {}
        self.catalog_fails = False

    # helpers for tests
    def _call(self, name: str) -> None:
        self.calls.append(name)
        if threading.get_ident() == self.main_thread:
            self._hang_if_asked()
        if not self.reachable:
            raise ConsulUnreachable("connection refused")

    def _bump(self) -> None:
        self.index += 1
        self.cond.notify_all()

    def set_key(self, key: Optional[KeyState]) -> None:
        with self.cond:
            self._bump()
            self.key = None if key is None else KeyState(key.value, key.flags, key.session, self.index)

    def invalidate(self, session: str) -> None:
        """What Consul does when a bound check fails (behaviour delete)."""
        with self.cond:
            self.sessions.discard(session)
            self._drop_entries_of(session)
            if self.key and self.key.session == session:
                self.key = None
                self._bump()

    def count(self, name: str) -> int:
        return self.calls.count(name)

    # the ConsulClient API
    def node_name(self) -> str:
        self._call("node_name")
        return self.agent_node

    def check_states(self, check_ids):
        self._call("check_states")
        return {c: self.checks.get(c) for c in check_ids}

    def catalog_checks(self, node: str) -> dict:
        self._call("catalog_checks")
        if self.catalog_fails:
            raise ConsulError("Unexpected response code: 500 (rpc error making call: timed out)")
        return dict(self.node_checks.get(node, {"serfHealth": "passing", "vip-haproxy": "passing"}))

    def check_details(self, check_ids):
        self._call("check_details")
        return {c: (self.checks.get(c), self.check_output.get(c, "")) for c in check_ids}

    @contextlib.contextmanager
    def time_limit(self, seconds: float):
        """Like the adapter's: calls of this thread inside end within `seconds` (see `hang`)."""
        self.time_limits.append(seconds)
        old = getattr(self._local, "deadline", None)
        new = time.monotonic() + seconds
        self._local.deadline = new if old is None else min(old, new)
        try:
            yield
        finally:
            self._local.deadline = old

    def time_left(self):
        deadline = getattr(self._local, "deadline", None)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def abort(self, thread_id: int) -> None:
        self.aborts += 1
        self._aborted.add(thread_id)
        with self.cond:
            self.cond.notify_all()

    def reset_abort(self) -> None:
        self._aborted.discard(threading.get_ident())

    def _hang_if_asked(self) -> None:
        """hang=True: a call waits (as a silent agent would) until its time limit or an abort."""
        if not self.hang:
            return
        me = threading.get_ident()
        deadline = getattr(self._local, "deadline", None) or time.monotonic() + 30
        with self.cond:
            self.cond.wait_for(lambda: me in self._aborted or not self.hang
                               or time.monotonic() >= deadline, max(0.0, deadline - time.monotonic()))
        if me in self._aborted:
            raise ConsulUnreachable("request abandoned")
        if self.hang:
            raise ConsulUnreachable("no answer (timed out)")

    def session_info(self, sid: str) -> Optional[SessionInfo]:
        self._call("session_info")
        if sid not in self.sessions:
            return None
        return SessionInfo(id=sid, name=self.session_names.get(sid, f"vip-elector-{self.value}"),
                           node="node1", checks=frozenset(self.checks_of.get(sid, ("serfHealth",))),
                           ttl=self.params_of.get(sid, (self.ttl, self.lock_delay))[0],
                           lock_delay=self.params_of.get(sid, (self.ttl, self.lock_delay))[1],
                           behavior="delete")

    def create_session(self, checks, ttl=None, lock_delay=None) -> str:
        self._call("create_session")
        for c in checks:
            if self.checks.get(c) is None:
                raise CheckNotPassing(f"Missing check '{c}' registration")
            if self.checks[c] == "critical":
                raise CheckNotPassing(f"Check '{c}' is in critical state")
        with self.cond:
            self._next_session += 1
            sid = f"session-{self._next_session}"
            self.sessions.add(sid)
            self.checks_of[sid] = tuple(checks)
            self.params_of[sid] = (self.ttl if ttl is None else ttl,
                                   self.lock_delay if lock_delay is None else lock_delay)
        return sid

    def renew_session(self, sid: str) -> None:
        self._call("renew_session")
        if self.renew_fails:
            raise ConsulUnreachable("connection refused")
        if sid not in self.sessions:
            raise InvalidSession(f"session {sid} not found")

    def destroy_session(self, sid: str) -> None:
        self._call("destroy_session")
        self.invalidate(sid)

    def read_key(self, index: Optional[int] = None, wait: Optional[float] = None, key=None):
        self._call("read_key")
        with self.cond:
            if index:
                self.cond.wait_for(lambda: self.index != index or not self.reachable, timeout=wait)
                if not self.reachable:
                    raise ConsulUnreachable("connection refused")
            return self.index, self.key

    def acquire(self, sid: str) -> bool:
        self._call("acquire")
        with self.cond:
            if sid not in self.sessions:
                raise InvalidSession("invalid session")
            if self.refuse_acquires > 0:
                self.refuse_acquires -= 1
                return False
            if self.key is not None and self.key.session not in (None, sid):
                return False
            self._bump()
            self.key = KeyState(self.value, LOCK_FLAG, sid, self.index)
            return True

    def raft_leader(self) -> str:
        self._call("raft_leader")
        return self.leader

    def move_lock(self, old: str, new: str) -> bool:
        self._call("move_lock")
        with self.cond:
            if self.key is None or self.key.session != old or new not in self.sessions:
                return False
            self._bump()
            self.key = KeyState(self.key.value, self.key.flags, new, self.index)
            return True

    def delete_candidate(self, modify_index: int) -> bool:
        self._call("delete_candidate")
        name = "%s/candidates/%s" % (self.key_name, self.value)
        with self.cond:
            entry = self.entries.get(name)
            if entry is None or entry.modify_index != modify_index:
                return False
            del self.entries[name]
            self._bump()
            return True

    def delete_if_unchanged(self, modify_index: int, key=None) -> bool:
        self._call("delete_if_unchanged")
        with self.cond:
            if self.key is None or self.key.modify_index != modify_index:
                return False
            self.key = None
            self._bump()
            return True

    def close(self) -> None:
        pass

    # SPEC §11: the keys under the trigger-key's name (candidates, a switchover request)
    @property
    def entries(self) -> dict:
        if not hasattr(self, "_entries"):
            self._entries: dict = {}
            self.txns: list = []
        return self._entries

    def _drop_entries_of(self, session: str) -> None:
        for k in [k for k, e in self.entries.items() if e.session == session]:
            del self.entries[k]
            self._bump()

    def put_entry(self, key: str, value: str, session: Optional[str] = None) -> None:
        """A test writes under the trigger-key's name (e.g. another node's candidate key)."""
        from vip_elector.cluster import Entry
        with self.cond:
            self._bump()
            self.entries[key] = Entry(key, value, session, self.index)

    def read_tree(self, index: Optional[int] = None, wait: Optional[float] = None):
        _, key = self.read_key(index, wait)  # counted as a key read: it is one request
        with self.cond:
            return self.index, key, list(self.entries.values())

    def put_candidate(self, sid: str, record: str) -> bool:
        self._call("put_candidate")
        from vip_elector.cluster import Entry, candidate_key
        name = candidate_key(self.key_name, self.value)
        with self.cond:
            if sid not in self.sessions:
                raise InvalidSession("invalid session")
            held = self.entries.get(name)
            if held is not None and held.session not in (None, sid):
                return False
            self._bump()
            self.entries[name] = Entry(name, record, sid, self.index)
            return True

    def put_request(self, record: str, cas: int) -> bool:
        self._call("put_request")
        from vip_elector.cluster import Entry, request_key
        name = request_key(self.key_name)
        with self.cond:
            held = self.entries.get(name)
            if (held.modify_index if held else 0) != cas:
                return False
            self._bump()
            self.entries[name] = Entry(name, record, None, self.index)
            return True

    def delete_request(self, modify_index: int) -> bool:
        self._call("delete_request")
        from vip_elector.cluster import request_key
        name = request_key(self.key_name)
        with self.cond:
            held = self.entries.get(name)
            if held is None or held.modify_index != modify_index:
                return False
            del self.entries[name]
            self._bump()
            return True

    def hand_over(self, old: str, new: str, value: str) -> bool:
        self._call("hand_over")
        with self.cond:
            self.entries  # noqa: B018 (makes txns)
            self.txns.append((old, new, value))
            if self.key is None or self.key.session != old or new not in self.sessions:
                return False
            self._bump()
            self.key = KeyState(value, self.key.flags, new, self.index)
            return True
