"""The previous run's session (SPEC §8.2): resume it, or release it as that run would have.

A restart, a reload (re-execution) or an upgrade starts with the state file
naming the session the previous run had. If Consul still has it and it is
this daemon's own — on this node, named ``vip-elector-<value>``, made with
exactly the parameters this configuration would use — it is taken up, and a
key it holds stays untouched. A session of our own made for another
configuration is released as on a planned stop. Anything else is never
touched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import Settings
from ..consul import SESSION_BEHAVIOR, ConsulClient, ConsulError, InvalidSession, SessionInfo
from ..state import SavedSession, StateStore
from .role import Reporter

log = logging.getLogger("vip_elector")


@dataclass(frozen=True)
class Resumed:
    session: str
    confirmed_at: float          # when the renewal that took it up went out
    node: str                    # the session's node, as Consul has it


class PreviousRun:
    """The session the state file named at start, until it is resumed or let go."""

    def __init__(self, consul: ConsulClient, settings: Settings, clock: Callable[[], float],
                 store: StateStore, reporter: Reporter, saved: Optional[SavedSession]):
        self.consul, self.settings, self.clock, self.store = consul, settings, clock, store
        self.reporter = reporter
        self.saved = saved

    @property
    def pending(self) -> bool:
        """A session of the previous run not yet resumed nor let go."""
        return self.saved is not None

    def resume(self, node: Optional[str]) -> Optional[Resumed]:
        """Take up the previous run's session, or None (then start afresh); raises ConsulError.

        ``node``: the local agent's node, when the token may read it.
        """
        saved = self.saved
        info = self.consul.session_info(saved.session)
        if info is None:
            log.info("session %s from the previous run is gone; starting afresh", saved.session)
            return self._forget()
        if not self._is_ours(saved, info, node, " and starting afresh"):
            return self._forget()
        if not self._made_for_this_configuration(saved, info):
            log.info("session %s was made for another configuration (key %s, value %s, checks "
                     "%s, ttl %gs, lock-delay %gs): releasing it and starting afresh",
                     saved.session, saved.key, saved.value, "+".join(saved.checks), saved.ttl,
                     saved.lock_delay)
            self._release(saved, "held by the session of the previous configuration")
            return self._forget()
        sent = self.clock()
        try:
            self.consul.renew_session(saved.session)
        except InvalidSession:
            log.info("session %s from the previous run has just ended; starting afresh",
                     saved.session)
            return self._forget()
        self.saved = None
        return Resumed(saved.session, sent, info.node)

    def release_on_stop(self, node: Optional[str]) -> None:
        """A stop before the previous run's session was taken up: release it as that run would have.

        Clearing the state alone would leave the key held by a session nobody
        renews: no handover until its TTL ends (SPEC §4.5).
        """
        saved = self.saved
        try:
            info = self.consul.session_info(saved.session)
            if info is None or not self._is_ours(saved, info, node):
                return
            self._release(saved, "held by the previous run's session (stopped before resuming it)")
        except ConsulError as e:
            log.warning("could not release session %s of the previous run: %s; Consul deletes "
                        "%s when that session's TTL (%gs) ends", saved.session, e,
                        saved.key, saved.ttl)

    def _made_for_this_configuration(self, saved: SavedSession, info: SessionInfo) -> bool:
        s = self.settings
        return (info.name == s.session_name and info.checks == frozenset(s.checks)
                and info.ttl == s.ttl and abs(info.lock_delay - s.lock_delay) < 1e-6
                and info.behavior == SESSION_BEHAVIOR and saved.key == s.trigger_key
                and saved.value == s.value)

    def _is_ours(self, saved: SavedSession, info: SessionInfo, node: Optional[str], then: str = "") -> bool:
        """The session the state file names is one this daemon made on this node; else say so."""
        node = node or saved.node
        # An unknown node (a state file of 0.2 under a token without agent:read) is not
        # compared: the session's name, ID and the private state file decide.
        if ((not node or info.node == node) and info.name == saved.name
                and info.id in ("", saved.session) and saved.name.startswith("vip-elector-")):
            return True
        log.warning("the saved state names session %s (%r on node %s), which is not this "
                    "daemon's: leaving it alone%s", saved.session, info.name, info.node or "?", then)
        return False

    def _release(self, saved: SavedSession, why: str) -> None:
        """A session of ours we will not take up: release it as a planned stop would (§8.2)."""
        _, key = self.consul.read_key(key=saved.key)
        if key is not None and key.session == saved.session:
            if self.consul.delete_if_unchanged(key.modify_index, key=saved.key):
                self.reporter.released_old(saved.key, why)
        self.consul.destroy_session(saved.session)

    def _forget(self) -> None:
        self.saved = None
        self.store.clear()
