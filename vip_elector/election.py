"""The election loop: one session, one lock, one key (SPEC §4).

Contract, in the order SPEC §1 ranks the invariants:

1. The key is only ever written with ``?acquire=<our session>``, so Consul
   guarantees at most one holder.
2. The session carries ``serfHealth`` and ``--check-id``: no session is made
   while a check is critical or missing (§4.7), and Consul invalidates it,
   deleting the key (behaviour ``delete``), the moment a check fails.
3. We never write or delete a key we do not hold, nor one that is not a lock
   key (§4.6): the only delete is ``?cas=<ModifyIndex of our own write>``.
4. On a planned stop the leader deletes the key before destroying the session
   (§4.5), so a standby acquires at once, without lock-delay.

Shape: the main thread runs a loop that waits on one event queue and then
does whatever is due. A watcher thread keeps a blocking query open on the
key and posts every change; signal handlers post a stop. Only the main thread
decides anything, and it is the one that renews the session and pings the
systemd watchdog, so a stuck loop stops the pings. Every Consul call has a
timeout (see consul.py), so no step can block for long.

Timing-critical paths: key released → watcher wakes → acquire (one request);
SIGTERM → CAS delete → destroy (two requests, short timeouts).
"""

from __future__ import annotations

import collections
import enum
import logging
import random
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .config import ConfigError, Settings
from .consul import (CheckNotPassing, ConsulClient, ConsulError, InvalidSession, KeyState,
                     PermissionDenied)
from .systemd import (MESSAGE_ACQUIRED, MESSAGE_LOST, MESSAGE_RELEASED, MESSAGE_WAITING,
                      ElectionContext, Notifier)

log = logging.getLogger("vip_elector")


class Role(str, enum.Enum):
    STARTING = "starting"
    WAITING = "waiting"          # for Consul, or for our health checks
    FOLLOWER = "follower"
    LEADER = "leader"
    STOPPING = "stopping"


@dataclass(frozen=True)
class Timing:
    """The loop's clocks, in seconds; tests may shorten them."""

    backoff_min: float = 1.0        # Consul errors: jittered exponential backoff
    backoff_max: float = 30.0
    health_poll: float = 1.0        # waiting for a check to pass (§4.7: at least every 2 s)
    lock_delay_retry: float = 0.05  # an acquire refused by lock-delay is retried this often
    watch_wait: float = 60.0        # blocking-query wait: few requests while nothing happens
    renew_retry: float = 1.0        # a failed renewal is retried this often until the TTL runs out
    shutdown_timeout: float = 0.8   # per request on the way out; at most 5 of them: exit within 5 s (§4.5)


# Events the loop receives ---------------------------------------------------

@dataclass(frozen=True)
class KeyChanged:
    generation: int
    index: int                   # X-Consul-Index of the answer: orders it against our own reads
    state: Optional[KeyState]


@dataclass(frozen=True)
class WatchFailed:
    generation: int
    error: ConsulError


STOP = "stop"

# How long the watcher lets the loop act on a change (an acquire, when the key
# was freed) before it takes the CPU and the GIL for its next query.
HANDOFF_WAIT = 0.05


class Inbox:
    """The loop's events, from the watcher thread and from signal handlers.

    A socketpair wakes ``select()``; ``signal.set_wakeup_fd`` points at the
    same socket, so a signal that arrives just before the loop blocks still
    wakes it (a plain ``Queue.get(timeout)`` would sleep until the timeout).
    """

    def __init__(self):
        self._events: collections.deque = collections.deque()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    @property
    def wakeup_fd(self) -> int:
        return self._writer.fileno()

    def put(self, event) -> None:
        """Safe from any thread and from a signal handler."""
        self._events.append(event)
        try:
            self._writer.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already plenty of wake-ups pending

    def get(self, timeout: float):
        """The next event, or None when ``timeout`` passes first."""
        if not self._events:
            select.select([self._reader], [], [], timeout)
            try:
                while self._reader.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        return self._events.popleft() if self._events else None


class Backoff:
    """Exponential, jittered: 1 s, 2 s, 4 s … 30 s, each ±20 %, within [min, max]."""

    def __init__(self, low: float, high: float, rng: Callable[[], float]):
        self.low, self.high, self.rng = low, high, rng
        self.attempt = 0

    def next(self) -> float:
        base = min(self.high, self.low * (2 ** min(self.attempt, 16)))
        self.attempt += 1
        return max(self.low, min(self.high, base * (0.8 + 0.4 * self.rng())))

    def reset(self) -> None:
        self.attempt = 0


class KeyWatcher:
    """A thread that keeps a blocking query open on the key and posts changes.

    It decides nothing. ``restart()`` abandons the query in flight (after a
    Consul outage it may sit on a dead connection for a whole ``wait``) and
    starts afresh; the abandoned thread's events carry an old generation and
    are ignored.
    """

    def __init__(self, consul: ConsulClient, events: Inbox, timing: Timing,
                 rng: Callable[[], float]):
        self.consul, self.events, self.timing, self.rng = consul, events, timing, rng
        self.generation = 0
        self._kick = threading.Event()
        self.handled = threading.Event()  # set by the loop once it has acted on our news

    def restart(self) -> None:
        self.generation += 1
        self._kick.set()
        self._kick = threading.Event()
        threading.Thread(target=self._run, args=(self.generation, self._kick),
                         name=f"watch-{self.generation}", daemon=True).start()

    def _run(self, generation: int, kicked: threading.Event) -> None:
        index = 0
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max, self.rng)
        while generation == self.generation:
            try:
                new_index, state = self.consul.read_key(index, self.timing.watch_wait)
            except ConsulError as e:
                self.events.put(WatchFailed(generation, e))
                index = 0
                if kicked.wait(backoff.next()):
                    return
                continue
            backoff.reset()
            if new_index != index:
                self.handled.clear()
                self.events.put(KeyChanged(generation, new_index, state))
                self.handled.wait(HANDOFF_WAIT)
            # Consul's index only grows; if it went back (a restarted agent), start from 0.
            index = new_index if new_index >= index else 0


class Election:
    """The state machine of SPEC §4. ``run()`` returns the exit status."""

    def __init__(self, settings: Settings, consul: ConsulClient, notifier: Notifier,
                 context: ElectionContext, timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random):
        self.settings, self.consul, self.notifier, self.context = settings, consul, notifier, context
        self.timing, self.clock = timing, clock
        self.events = Inbox()
        self.watcher = KeyWatcher(consul, self.events, timing, rng)
        self.backoff = Backoff(timing.backoff_min, timing.backoff_max, rng)

        self.connected = False                   # Consul answered at least once
        self.session: Optional[str] = None
        self.key: Optional[KeyState] = None      # last seen by the watcher
        self.key_index = 0                       # Consul index of self.key: older news is stale
        self.leader = False
        self.retry_at = 0.0                      # next connect / health look
        self.renew_at = 0.0
        self.renewed_at = 0.0
        self.acquire_retry_at: Optional[float] = None
        self.acquire_refused_since: Optional[float] = None
        self.decide_at: Optional[float] = None   # re-read the key and act on it (after trouble)
        self.trouble: Optional[str] = None       # what went wrong last, for logs
        self.notifier_status: Optional[str] = None

    # ------------------------------------------------------------------
    # The loop

    def request_stop(self, *_args) -> None:
        """Ask the loop to stop (from a signal handler or another thread)."""
        self.events.put(STOP)

    def handle_signals(self, *signals: int) -> None:
        """Stop on these signals; the wakeup fd makes sure the loop notices at once."""
        signal.set_wakeup_fd(self.events.wakeup_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self.request_stop)

    def run(self) -> int:
        """Connect once, tell systemd we are ready, then follow events until asked to stop."""
        self._set_role(Role.STARTING, f"starting: connecting to Consul at {self.settings.address}")
        self._advance()                          # the first attempt to reach Consul (§6: then READY)
        self.notifier.ready()
        while True:
            event = self._wait(self._next_deadline())
            self.notifier.watchdog()
            if event == STOP:
                return self._shutdown()
            if isinstance(event, (KeyChanged, WatchFailed)):
                self._on_watch(event)
            self._advance()

    def _wait(self, deadline: float):
        return self.events.get(timeout=max(0.0, deadline - self.clock()))

    def _next_deadline(self) -> float:
        now = self.clock()
        due = [self.retry_at if self.session is None else self.renew_at]
        due += [t for t in (self.acquire_retry_at, self.decide_at) if t is not None]
        ping = self.notifier.next_ping()
        if ping is not None:
            due.append(ping)
        return max(now, min(due))

    def _advance(self) -> None:
        """Do whatever is due in the current state."""
        now = self.clock()
        try:
            if not self.connected:
                if now >= self.retry_at:
                    self._connect()
            elif self.session is None:
                if now >= self.retry_at:
                    self._create_session_when_healthy()
            else:
                if now >= self.renew_at:
                    self._renew()
                if self.session and self.decide_at is not None and now >= self.decide_at:
                    self.decide_at = None
                    self._decide()
                if self.session and self.acquire_retry_at is not None and now >= self.acquire_retry_at:
                    self._try_acquire()
        except ConfigError:
            raise
        except ConsulError as e:
            self._consul_trouble(e)
        except Exception:  # a bug must not kill the node's election: log it and retry
            log.exception("unexpected error in the election loop; retrying")
            self._consul_trouble(ConsulError("internal error (see the log)"))

    # ------------------------------------------------------------------
    # §4.6, §4.8: reaching Consul

    def _connect(self) -> None:
        index, key = self.consul.read_key()
        self._preflight(key, fatal=True)
        self.key, self.key_index = key, index
        self.connected = True
        node = self.consul.node_name()
        log.info("connected to Consul at %s%s", self.settings.address, f" (node {node})" if node else "")
        if self.watcher.generation == 0:
            self.watcher.restart()
        self._recovered()
        self._create_session_when_healthy()

    def _preflight(self, key: Optional[KeyState], fatal: bool) -> bool:
        """A key that is not a lock key belongs to someone else: never touch it (§4.6)."""
        if key is None or key.is_lock:
            return True
        message = (f"trigger-key {self.settings.trigger_key} in Consul is not a lock key "
                   f"(flags {key.flags}, value {key.value!r}); vip-elector will not overwrite it: "
                   f"if it is stale, remove it with 'consul kv delete {self.settings.trigger_key}'")
        if fatal:
            raise ConfigError(message + ".")
        self._set_role(Role.WAITING, f"waiting: {self.settings.trigger_key} is not a lock key")
        log.error("%s.", message)
        return False

    def _consul_trouble(self, error: ConsulError) -> None:
        """§4.8: log it (once per distinct reason), say it in the status, back off."""
        delay = self.backoff.next()
        self.retry_at = self.clock() + delay
        if isinstance(error, PermissionDenied):
            status = f"waiting: Consul refused the ACL token ({self.settings.token_source}): {error}"
            text = (f"Consul at {self.settings.address} refused the ACL token from "
                    f"{self.settings.token_source}: {error}; give a token with key write on "
                    f"{self.settings.trigger_key}, session write and node read (see examples/"
                    f"consul-acl-policy.hcl); retrying in {delay:.0f}s")
        else:
            status = f"waiting for Consul at {self.settings.address}: {error}"
            text = f"cannot use Consul at {self.settings.address}: {error}; retrying in {delay:.0f}s"
        if self.session is not None:  # keep renewing on its own clock, decide again later
            self.decide_at = self.retry_at
            self.acquire_retry_at = None
            self.renew_at = max(self.renew_at, self.clock() + self.timing.renew_retry)
        if self.leader:  # still ours until the session goes: say both
            self._set_role(Role.LEADER, f"leader: holding {self.settings.trigger_key} as "
                                        f"{self.settings.value}; {status}")
        else:
            self._set_role(Role.WAITING, status)
        if str(error) != self.trouble:
            log.warning("%s", text)
        self.trouble = str(error)

    def _recovered(self) -> None:
        if self.trouble is not None:
            log.info("Consul at %s answers again", self.settings.address)
            self.watcher.restart()  # its query in flight may sit on a dead connection
        self.trouble = None
        self.backoff.reset()

    # ------------------------------------------------------------------
    # §4.1, §4.7: a session bound to our health

    def _create_session_when_healthy(self) -> None:
        own = [self.settings.check_id] if self.settings.check_id else []
        states = self.consul.check_states(own)
        unhealthy = [(cid, st) for cid, st in states.items() if st is None or st == "critical"]
        if not unhealthy:
            try:
                self.session = self.consul.create_session(self.settings.checks)
            except CheckNotPassing as e:  # serfHealth, or the catalog has not caught up yet
                unhealthy = [(e.check_id or self.settings.checks[-1], e.state)]
                log.debug("session refused: %s", e)
        if unhealthy:
            self._wait_for_health(*unhealthy[-1])
            return
        self._recovered()
        self.context.session = self.session
        now = self.clock()
        self.renewed_at, self.renew_at = now, now + self._renew_interval()
        log.info("session %s created (checks %s, ttl %gs, lock-delay %gs)", self.session,
                 ", ".join(self.settings.checks), self.settings.ttl, self.settings.lock_delay)
        self._decide()

    def _decide(self) -> None:
        """Act on the key as it is now, not as the (perhaps reconnecting) watcher last saw it."""
        self.key_index, self.key = self.consul.read_key()
        self._on_key(self.key)

    def _wait_for_health(self, check_id: str, state: Optional[str]) -> None:
        why = "is not registered on the local agent" if state is None else f"is {state}"
        status = f"waiting: check '{check_id}' {why}"
        changed = self.context.role != Role.WAITING.value or self.notifier_status != status
        self._set_role(Role.WAITING, status)  # first, so the line carries VIP_ELECTOR_ROLE=waiting
        if changed:
            log.warning("not competing for %s: check '%s' %s; looking again every %gs",
                        self.settings.trigger_key, check_id, why, self.timing.health_poll,
                        extra={"MESSAGE_ID": MESSAGE_WAITING})
        self.retry_at = self.clock() + self.timing.health_poll

    def _renew_interval(self) -> float:
        """Renew well before half the TTL has passed (§4.3)."""
        half = self.settings.ttl / 2
        return max(half / 2, half - 1.0)

    def _renew(self) -> None:
        now = self.clock()
        try:
            self.consul.renew_session(self.session)
        except InvalidSession:
            self._session_gone("Consul invalidated our session (a bound check failed, or the "
                               "agent lost it)")
            return
        except ConsulError as e:
            if now - self.renewed_at >= self.settings.ttl:
                self._session_gone(f"renewals have failed for a whole TTL ({e})")
                raise
            log.warning("cannot renew session %s: %s; retrying", self.session, e)
            self.renew_at = now + self.timing.renew_retry
            return
        self.renewed_at, self.renew_at = now, now + self._renew_interval()
        self._recovered()

    def _session_gone(self, why: str) -> None:
        log.warning("session %s is gone: %s", self.session, why)
        self.session = None
        self.context.session = ""
        self.acquire_retry_at = self.acquire_refused_since = None
        if self.leader:
            self._lost(why)
        self.retry_at = self.clock()

    # ------------------------------------------------------------------
    # §4.2-§4.4: the key

    def _on_watch(self, event) -> None:
        try:
            self._act_on_watch(event)
        finally:
            self.watcher.handled.set()

    def _act_on_watch(self, event) -> None:
        if event.generation != self.watcher.generation:
            return
        if isinstance(event, WatchFailed):
            log.debug("watch on %s failed: %s", self.settings.trigger_key, event.error)
            return
        if event.index < self.key_index:
            return  # older than what we read ourselves (e.g. from before our acquire)
        self.key, self.key_index = event.state, event.index
        if self.session is not None:
            self._on_key(event.state)

    def _on_key(self, key: Optional[KeyState]) -> None:
        if not self._preflight(key, fatal=False):
            if self.leader:
                self._lost("the key was overwritten by a plain write")
            return
        if key is None or key.session is None:
            if self.leader:
                if not self._session_still_valid():
                    return
                self._lost("the key was deleted or released by someone else")
            self._try_acquire()
        elif key.session == self.session:
            if not self.leader:
                self._became_leader()
        else:
            if self.leader:
                self._lost(f"{key.value or 'another session'} holds it now")
            self._follow(key)

    def _session_still_valid(self) -> bool:
        """The key vanished under us: find out whether Consul invalidated our session."""
        try:
            self.consul.renew_session(self.session)
        except InvalidSession:
            self._session_gone("Consul invalidated our session: a bound health check failed, "
                               "or the session expired")
            return False
        self.renewed_at = self.clock()
        return True

    def _try_acquire(self) -> None:
        if self.key is not None and not self.key.is_lock:
            self.acquire_retry_at = None
            return
        try:
            won = self.consul.acquire(self.session)
        except InvalidSession:
            self._session_gone("Consul says our session is invalid")
            return
        now = self.clock()
        if won:
            self.acquire_retry_at = self.acquire_refused_since = None
            self._became_leader()
            # Learn our write's ModifyIndex (for the CAS delete) and make older watch news stale.
            self.key_index, self.key = self.consul.read_key()
            self._on_key(self.key)
            return
        # Refused while the key looked free: lock-delay after the last holder's session
        # ended (§4.4). Retry promptly until it has passed; later, more gently.
        if self.key is not None and self.key.session is not None:
            self.acquire_retry_at = None
            self._follow(self.key)
            return
        if self.acquire_refused_since is None:
            self.acquire_refused_since = now
            log.debug("acquire of %s refused while it looked free (lock-delay, or another node "
                      "was faster); retrying every %gs", self.settings.trigger_key,
                      self.timing.lock_delay_retry)
        in_delay = now - self.acquire_refused_since < self.settings.lock_delay + 1.0
        self.acquire_retry_at = now + (self.timing.lock_delay_retry if in_delay else 1.0)
        self._set_role(Role.FOLLOWER, "follower: key is free, waiting for lock-delay to pass")

    def _became_leader(self) -> None:
        self.leader = True
        self._set_role(Role.LEADER, f"leader: holding {self.settings.trigger_key} as {self.settings.value}")
        log.info("LOCK ACQUIRED: this node (%s) now holds %s", self.settings.value,
                 self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_ACQUIRED})

    def _lost(self, why: str) -> None:
        self.leader = False
        self.context.role = Role.FOLLOWER.value
        log.warning("LOCK LOST: this node (%s) no longer holds %s: %s", self.settings.value,
                    self.settings.trigger_key, why, extra={"MESSAGE_ID": MESSAGE_LOST})

    def _follow(self, key: KeyState) -> None:
        self.acquire_retry_at = self.acquire_refused_since = None
        status = f"follower: leader is {key.value}" if key.value else "follower: no leader yet"
        if self.notifier_status != status:
            log.info("following: %s holds %s", key.value or "a session", self.settings.trigger_key)
        self._set_role(Role.FOLLOWER, status)

    # ------------------------------------------------------------------
    # §4.5: a planned stop

    def _shutdown(self) -> int:
        self._set_role(Role.STOPPING, "stopping")
        self.notifier.stopping()
        with self.consul.transport.timeout(self.timing.shutdown_timeout):
            if self.leader:
                self._release()
            if self.session is not None:
                try:
                    self.consul.destroy_session(self.session)
                except ConsulError as e:
                    log.warning("could not destroy session %s: %s (Consul will expire it)", self.session, e)
        log.info("stopped")
        return 0

    def _release(self) -> None:
        """Delete our own write with CAS: vip-manager drops the VIP, a standby takes over at once."""
        try:
            key = self.key
            for _ in range(2):
                if key is None or key.session != self.session:
                    _, key = self.consul.read_key()
                    if key is None or key.session != self.session:
                        log.warning("LOCK LOST: %s was no longer ours at shutdown",
                                    self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_LOST})
                        return
                if self.consul.delete_if_unchanged(key.modify_index):
                    log.info("LOCK RELEASED: this node (%s) gave up %s on shutdown", self.settings.value,
                             self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_RELEASED})
                    return
                key = None  # changed under us: read it again once
            log.warning("could not release %s: it kept changing", self.settings.trigger_key)
        except ConsulError as e:
            log.warning("could not release %s: %s; Consul deletes it when our session ends",
                        self.settings.trigger_key, e)

    # ------------------------------------------------------------------

    def _set_role(self, role: Role, status: str) -> None:
        self.context.role = role.value
        self.notifier_status = status
        self.notifier.status(status)


__all__ = ["Election", "Role", "Timing", "Backoff", "KeyWatcher", "Inbox"]
