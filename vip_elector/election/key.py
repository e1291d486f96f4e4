"""The trigger-key (SPEC §4.2-§4.6): what it holds, and the only writes we make to it.

Every write is ``?acquire=<our session>`` (Consul guarantees one holder) and
the only delete is ``?cas=<ModifyIndex of our own write>``; a key that is not
a lock key belongs to someone else and is never touched (§4.6).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..config import ConfigError, Settings
from ..consul import ConsulClient, KeyState, describe_holder
from .timing import Timing

log = logging.getLogger("vip_elector")


# What an acquire answers ---------------------------------------------------

@dataclass(frozen=True)
class Won:
    sent: float                  # when the acquire went out: Consul confirmed the session then


@dataclass(frozen=True)
class RefusedByLockDelay:
    retry_at: float              # the key looked free: retry promptly, then more gently (§4.4)


@dataclass(frozen=True)
class HeldByOther:
    holder: KeyState


Acquired = Union[Won, RefusedByLockDelay, HeldByOther]


# What a release on a planned stop answers ----------------------------------

class Release(enum.Enum):
    RELEASED = "released"
    NOT_OURS = "no longer ours"          # the key was gone or another's already
    KEPT_CHANGING = "kept changing"      # two CAS deletes missed: someone writes it


class TriggerKey:
    """The key as last read or watched, and the acquire, the release and the pre-flight."""

    def __init__(self, consul: ConsulClient, settings: Settings, timing: Timing,
                 clock: Callable[[], float]):
        self.consul, self.settings, self.timing, self.clock = consul, settings, timing, clock
        self.state: Optional[KeyState] = None  # as last read or watched
        self.index = 0                         # Consul index of ``state``: older news is stale
        self.retry_at: Optional[float] = None  # an acquire refused by lock-delay, again
        self.entries: Optional[list] = None    # the keys under <trigger-key>/ as last read (SPEC §11)
        self._refused_since: Optional[float] = None

    # ------------------------------------------------------------------ what it holds

    def read(self) -> Optional[KeyState]:
        """Read the key now (not as the perhaps reconnecting watcher last saw it), and the
        keys under its name (candidates, a switchover request) in the same request."""
        self.index, self.state, self.entries = self.consul.read_tree()
        return self.state

    def observe(self, index: int, state: Optional[KeyState], entries: Optional[list] = None) -> bool:
        """Watch news; False when it is older than what we read ourselves (or Consul's index
        went back): then the key must be read afresh (§9.5)."""
        if index < self.index:
            return False
        self.index, self.state = index, state
        if entries is not None:
            self.entries = entries
        return True

    def seen(self, index: int, state: Optional[KeyState]) -> None:
        """What another request (a resume, a move) read of the key."""
        self.index, self.state = index, state

    def held_by(self, session: Optional[str]) -> bool:
        return session is not None and self.state is not None and self.state.session == session

    # ------------------------------------------------------------------ §4.6

    def foreign(self, key: Optional[KeyState]) -> Optional[str]:
        """Why ``key`` belongs to another program (not a lock key), or None when it may be ours."""
        if key is None or key.is_lock:
            return None
        k = self.settings.trigger_key
        if key.session:
            return (f"trigger-key {k} in Consul is held by another program ({describe_holder(self.consul, key)}) "
                    f"without vip-elector's lock flag (flags {key.flags}, value {key.value!r}); "
                    f"vip-elector never touches it: choose another trigger-key for both "
                    f"vip-manager and vip-elector")
        return (f"trigger-key {k} in Consul is not a lock key (flags {key.flags}, value "
                f"{key.value!r}); vip-elector will not overwrite it: if it is stale, "
                f"remove it with 'consul kv delete {k}'")

    def preflight(self) -> None:
        """At start: read the key; one that is not a lock key is a configuration error (§4.6, §5)."""
        foreign = self.foreign(self.read())
        if foreign is not None:
            raise ConfigError(foreign + ".")

    # ------------------------------------------------------------------ §4.2, §4.4

    def acquire(self, session: str) -> Acquired:
        """Take the lock with our value. Raises InvalidSession (the session is gone) and
        ConsulUnreachable (no answer is not "no": Consul may have applied it, read again)."""
        self.retry_at = None
        sent = self.clock()
        won = self.consul.acquire(session)
        now = self.clock()
        if won:
            self._refused_since = None
            self.state = KeyState(self.settings.value, self.state.flags if self.state else 0, session, 0)
            return Won(sent)
        if self.state is not None and self.state.session not in (None, session):
            return HeldByOther(self.state)
        # Refused while the key looked free: lock-delay after the last holder's session
        # ended (§4.4). Retry promptly until it has passed; later, more gently.
        if self._refused_since is None:
            self._refused_since = now
            log.debug("acquire of %s refused while it looked free (lock-delay, or another node "
                      "was faster); retrying every %gs", self.settings.trigger_key,
                      self.timing.lock_delay_retry)
        in_delay = now - self._refused_since < self.settings.lock_delay + 1.0
        self.retry_at = now + (self.timing.lock_delay_retry if in_delay else 1.0)
        return RefusedByLockDelay(self.retry_at)

    def stop_retrying(self) -> None:
        """Another session holds the key, or ours is gone: no acquire is due."""
        self.retry_at = self._refused_since = None

    # ------------------------------------------------------------------ §4.5

    def release(self, session: str) -> Release:
        """Delete our own write with CAS, so vip-manager drops the VIP and a standby takes
        over at once. Each request within ``shutdown_timeout``; raises ConsulError."""
        per_request = self.timing.shutdown_timeout
        key = self.state if self.state is not None and self.state.modify_index else None
        for _ in range(2):
            if key is None or key.session != session:
                with self.consul.time_limit(per_request):
                    _, key = self.consul.read_key()
                if key is None or key.session != session:
                    return Release.NOT_OURS
            with self.consul.time_limit(per_request):
                if self.consul.delete_if_unchanged(key.modify_index):
                    return Release.RELEASED
            key = None  # changed under us: read it again once
        return Release.KEPT_CHANGING


__all__ = ["TriggerKey", "Won", "RefusedByLockDelay", "HeldByOther", "Acquired", "Release"]
