"""The election loop: one session, one lock, one key (SPEC §4, §8, §9).

Contract, in the order SPEC §1 ranks the invariants:

1. The key is only ever written with ``?acquire=<our session>``, so Consul
   guarantees at most one holder.
2. The session carries ``serfHealth`` and ``--check-id``: no session is made
   while a check is critical or missing (§4.7), and Consul invalidates it,
   deleting the key (behaviour ``delete``), the moment a check fails.
3. We never write or delete a key we do not hold, nor one that is not a lock
   key (§4.6): the only deletes are ``?cas=<ModifyIndex of our own write>``.
4. On a planned stop the leader deletes the key before destroying the session
   (§4.5), so a standby acquires at once, without lock-delay.

And the promises of §9 on top of Consul's:

* Honest claims (§9.3): the role is LEADER only while the session holds the
  key *and* Consul confirmed the session less than ``claim_window`` ago — a
  window that ends before Consul could give the key to another node
  (serfHealth detection plus lock-delay, or the TTL). A leader that cannot
  confirm becomes CUT_OFF: it stops claiming, keeps its session's ID and
  keeps renewing at its normal cadence; if Consul still has the session, it
  leads again without the key having been touched (§8.7).
* One session per daemon (§9.4): a session is abandoned only when Consul
  says it is gone, never because Consul is unreachable.
* A session that outlived Consul trouble is replaced (``_replace_session``).
  A Consul server that found the session expired while it could not commit
  (a quorum loss, a frozen raft leader) keeps retrying the destroy for
  minutes (10, 30, 70, 150, 310 s later) without looking at the session
  again, and applies it if it leads at that moment: the key is deleted
  out of the blue, any time, even while the leader node is cut off and
  cannot learn it — another node then holds the key one lock-delay later,
  sooner than our claim window allows. So once Consul confirms a session
  again after failed or slow renewals (or a gap of a TTL), or after the raft
  leader changed (a frozen raft leader may go unnoticed otherwise), we make
  a new session and move the lock to it in one transaction (the key's value
  never changes: vip-manager does not move the VIP), then destroy the old one.
* Nothing but a signal ends the loop (§9.1): every step runs under one guard
  (``_turn``); a Consul error is handled where it happens, an unexpected
  exception is logged as an internal error and retried with backoff.
* Time budgets (§9.2): every step's requests share one budget, well inside
  ``WatchdogSec``/2; a stop aborts whatever request is in flight.

Shape: the main thread waits on one inbox and then does whatever is due. A
watcher thread keeps a blocking query open on the key and posts every
change; the signal relay posts stops and reloads. Only the main thread
decides anything, and it is the one that renews the session and pings the
systemd watchdog, so a stuck loop stops the pings. Every role change goes
through ``_become``, which logs leadership changes and tells the hook.

Timing-critical paths: key released → watcher wakes → acquire (one request);
SIGTERM → hook ``standby`` → CAS delete → destroy (two requests).
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
from .consul import (CheckNotPassing, ConsulClient, ConsulError, ConsulUnreachable, InvalidSession,
                     KeyState, PermissionDenied, SESSION_BEHAVIOR, describe_holder)
from .hooks import LEADER, STANDBY, Hooks
from .state import SavedSession, StateStore
from .systemd import (MESSAGE_ACQUIRED, MESSAGE_CONFIG_ERROR, MESSAGE_LOST, MESSAGE_RELEASED,
                      MESSAGE_WAITING, ElectionContext, Notifier)

log = logging.getLogger("vip_elector")


class Role(str, enum.Enum):
    """What this node is, and the only place that says so."""

    STARTING = "starting"
    WAITING = "waiting"          # no session: Consul unreachable, or a check not passing
    FOLLOWER = "follower"        # a confirmed session; the key is another's, or free
    LEADER = "leader"            # the session holds the key and Consul confirmed it recently
    CUT_OFF = "cut-off"          # a session Consul has not confirmed lately: claims nothing
    STOPPING = "stopping"


class Outcome(enum.Enum):
    STOPPED = 0                  # a planned stop: exit 0
    REEXEC = 1                   # a reload with a valid configuration: re-execute


@dataclass(frozen=True)
class Timing:
    """The loop's clocks, in seconds; tests may shorten them."""

    backoff_min: float = 1.0        # Consul errors: jittered exponential backoff
    backoff_max: float = 30.0
    health_poll: float = 1.0        # waiting for a check to pass (§4.7: at least every 2 s)
    lock_delay_retry: float = 0.05  # an acquire refused by lock-delay is retried this often
    watch_wait: float = 60.0        # blocking-query wait: few requests while nothing happens
    renew_retry: float = 1.0        # a failed renewal is tried again this often (§8.7)
    leader_renew: float = 1.5       # a leader confirms at most this far apart, and 3 times a claim window (§9.3)
    claim_margin: float = 3.0       # claim window = min(TTL, lock-delay + this); see claim_window
    turn_budget: float = 6.0        # all requests of one step: well inside WatchdogSec/2 (15 s)
    stop_budget: float = 4.5        # signal to exit, whatever is in flight (§4.5: 5 s)
    release_reserve: float = 1.7    # of the stop budget, kept for the CAS delete and the destroy
    shutdown_timeout: float = 0.8   # per request on the way out
    reload_hook_wait: float = 5.0   # a reload lets a running hook finish for this long
    doubt_latency: float = 2.0      # a renewal this slow (Consul in trouble) replaces the session
    raft_poll: float = 5.0          # a leader reads the raft leader this often (with a renewal): a change replaces the session
    raft_poll_follower: float = 30.0  # a follower: before most of a woken server's retries, at 2 requests a minute


# Events the loop receives ---------------------------------------------------

@dataclass(frozen=True)
class KeyChanged:
    generation: int
    index: int                   # X-Consul-Index of the answer: orders it against our own reads
    state: Optional[KeyState]


@dataclass(frozen=True)
class WatchFailed:
    generation: int
    error: str


@dataclass(frozen=True)
class Stop:
    at: float                    # time.monotonic() of the request: the stop budget starts here


@dataclass(frozen=True)
class CheckCritical:
    check_id: str                # the bound check the local agent says is critical


RELOAD = "reload"

# How long the watcher lets the loop act on a change (an acquire, when the key
# was freed) before it takes the CPU and the GIL for its next query.
HANDOFF_WAIT = 0.05


class Inbox:
    """The loop's events, from the watcher thread and the signal relay.

    A socketpair wakes ``select()``, so an event posted just before the loop
    blocks still wakes it.
    """

    def __init__(self):
        self._events: collections.deque = collections.deque()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def put(self, event) -> None:
        """Safe from any thread."""
        self._events.append(event)
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # already plenty of wake-ups pending

    def get(self, timeout: float):
        """The next event, or None when ``timeout`` passes first."""
        if not self._events:
            select.select([self._reader], [], [], timeout)
            try:
                while self._reader.recv(4096):
                    pass
            except OSError:
                pass
        if not self._events:
            return None
        # A stop overtakes everything else waiting.
        for event in self._events:
            if isinstance(event, Stop):
                self._events.clear()
                return event
        return self._events.popleft()

    def drain(self) -> list:
        """Everything still waiting, oldest first; the inbox is empty afterwards."""
        events = []
        while self._events:
            events.append(self._events.popleft())
        return events


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


class HealthWatch:
    """While this node leads: the local agent's view of the bound check, every ``interval``.

    The agent tells the servers the moment the check turns critical, and they
    invalidate the session and free the key at once: another node may hold it
    one lock-delay later. The key's watch shows that within milliseconds —
    unless this node is cut off from the servers at the same moment, when only
    the local agent (which still answers) knows. So a critical check ends the
    claim here within ``interval`` (half the lock-delay at most), even while
    the loop waits on a request that hangs: ``on_critical`` aborts it.
    """

    def __init__(self, consul: ConsulClient, check_id: str, interval: float,
                 on_critical: Callable[[str], None]):
        self.consul, self.check_id, self.interval = consul, check_id, interval
        self.on_critical = on_critical
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="health", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                state = self.consul.check_states([self.check_id]).get(self.check_id)
            except ConsulError:
                continue  # the renewals judge Consul's health; this reads the check only
            except Exception:
                log.exception("internal error in the health watch; retrying")
                continue
            if state == "critical" and not self._stop.is_set():
                self.on_critical(self.check_id)
                return


class KeyWatcher:
    """A thread that keeps a blocking query open on the key and posts changes.

    It decides nothing and cannot die: every failure, expected or not, is
    posted (or logged) and retried with backoff. Consul's index rules (§9.5):
    an index that goes backwards or is not positive restarts the watch, after
    a pause so a broken answer cannot make it spin. ``restart()`` abandons the
    query in flight, closing its connection, and starts afresh; the abandoned
    thread's events carry an old generation and are ignored.
    """

    def __init__(self, consul: ConsulClient, events: Inbox, timing: Timing,
                 rng: Callable[[], float]):
        self.consul, self.events, self.timing, self.rng = consul, events, timing, rng
        self.generation = 0
        self._kick = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.handled = threading.Event()  # set by the loop once it has acted on our news

    def restart(self) -> None:
        self.stop()
        self._kick = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self.generation, self._kick),
                                        name=f"watch-{self.generation}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abandon the query in flight, if any, and close its connection."""
        self.generation += 1
        self._kick.set()
        if self._thread is not None and self._thread.ident is not None:
            self.consul.abort(self._thread.ident)
        self._thread = None

    def _run(self, generation: int, kicked: threading.Event) -> None:
        index = 0
        backoff = Backoff(self.timing.backoff_min, self.timing.backoff_max, self.rng)
        while generation == self.generation:
            started = time.monotonic()
            try:
                new_index, state = self.consul.read_key(index, self.timing.watch_wait)
            except ConsulError as e:
                failure = str(e)
            except Exception as e:  # a bug here must not leave a follower deaf
                log.exception("internal error in the key watcher; retrying")
                failure = f"internal error ({type(e).__name__})"
            else:
                failure = None
            if generation != self.generation:
                return
            if failure is not None:
                self.events.put(WatchFailed(generation, failure))
                index = 0
                if kicked.wait(backoff.next()):
                    return
                continue
            if new_index != index or index == 0:
                self.handled.clear()
                self.events.put(KeyChanged(generation, new_index, state))
                self.handled.wait(HANDOFF_WAIT)
            if new_index <= 0 or new_index < index:
                # Not Consul's rules: start again from 0, after a pause.
                log.debug("watch on %s: index went from %d to %d; starting the watch again",
                          self.consul.key, index, new_index)
                index = 0
                if kicked.wait(backoff.next()):
                    return
                continue
            if index and new_index == index and time.monotonic() - started < self.timing.backoff_min / 4:
                # A blocking query must block; one that returns at once would spin.
                if kicked.wait(backoff.next()):
                    return
                continue
            backoff.reset()
            index = new_index


class Election:
    """The state machine of SPEC §4. ``run()`` returns an Outcome."""

    vip = None  # h5-vip: the managed VIP (address.VirtualAddress), set by cli._run_daemon

    def __init__(self, settings: Settings, consul: ConsulClient, notifier: Notifier,
                 context: ElectionContext, timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 hooks: Optional[Hooks] = None,
                 state: Optional[StateStore] = None,
                 saved: Optional[SavedSession] = None,
                 reload_settings: Optional[Callable[[], Settings]] = None,
                 reload_verdict: Callable[[Optional[str]], None] = lambda error: None):
        self.settings, self.consul, self.notifier, self.context = settings, consul, notifier, context
        self.timing, self.clock = timing, clock
        self.hooks = hooks or Hooks(None, 0, settings.trigger_key, settings.value)
        self.state = state or StateStore(None)
        self.saved = saved                       # a session to resume (§8.2)
        self.stop_requested = False              # set once, from the signal thread
        self.reload_settings = reload_settings
        self.reload_verdict = reload_verdict     # told None (applied) or why a reload was refused
        self.resuming = False                    # taking up the previous run's session just now
        self.events = Inbox()
        self.watcher = KeyWatcher(consul, self.events, timing, rng)
        self.backoff = Backoff(timing.backoff_min, timing.backoff_max, rng)
        self.main_thread = threading.get_ident()

        # The facts. The role is the truth about what this node claims.
        self.role = Role.STARTING
        self.status_text = ""
        self.connected = False                   # the first read of the key passed pre-flight
        self.session: Optional[str] = None
        self.node: Optional[str] = None          # the local agent's node, when the token may read it
        self.key: Optional[KeyState] = None      # as last read or watched
        self.key_index = 0                       # Consul index of self.key: older news is stale
        self.confirmed_at: Optional[float] = None  # send time of the last request Consul confirmed the session by
        self.renew_failing: Optional[str] = None   # why the last renewal failed
        self.doubt: Optional[str] = None         # why the session is to be replaced (Consul trouble)
        self.replacement: Optional[str] = None   # the session replacing it, made but not yet ours
        self.raft_leader: Optional[str] = None   # the servers' raft leader when last read
        self.raft_read_at: Optional[float] = None
        self.trouble: Optional[str] = None       # the last Consul error, logged once
        self.note = ""                           # appended to the status (a failed reload)
        self.warned_unseen = False
        self.health: Optional[HealthWatch] = None  # runs while this node leads, with --check-id
        # Timers (clock times).
        self.retry_at = 0.0                      # no session: next attempt
        self.renew_at = 0.0
        self.acquire_at: Optional[float] = None  # an acquire refused by lock-delay, again
        self.acquire_refused_since: Optional[float] = None
        self.decide_at: Optional[float] = None   # read the key again and act on it (after trouble)

    # ------------------------------------------------------------------
    # The loop

    def request_stop(self) -> None:
        """Ask the loop to stop (from the signal relay or another thread)."""
        at = time.monotonic()
        self.stop_requested = True  # first: the loop then knows why its request ends
        # A request in flight would hold the stop for its whole timeout: end it,
        # and any the loop starts before it sees the stop; _shutdown lifts that.
        self.consul.abort(self.main_thread)
        self.events.put(Stop(at))

    def request_reload(self) -> None:
        self.events.put(RELOAD)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
        else:
            self.request_stop()

    def pending_signals(self) -> list[int]:
        """Stops and reloads asked for but not acted on, as signals (re-raised across an exec)."""
        return [signal.SIGTERM if isinstance(e, Stop) else signal.SIGHUP
                for e in self.events.drain() if isinstance(e, Stop) or e == RELOAD]

    def run(self) -> Outcome:
        """Start (resume, or connect), tell systemd we are ready, then follow events."""
        self.main_thread = threading.get_ident()
        self._become(Role.STARTING, f"starting: connecting to Consul at {self.settings.address}")
        self._turn(self._start)                  # the first attempt to reach Consul (§6: then READY)
        self.notifier.ready()
        while True:
            event = self.events.get(timeout=max(0.0, self._next_deadline() - self.clock()))
            self.notifier.watchdog()
            if isinstance(event, Stop):
                return self._shutdown(event.at)
            if event == RELOAD:
                if self.stop_requested:  # the stop is on its way: no point starting a new program
                    log.info("reload requested, but a stop was asked for too: stopping instead")
                    continue
                if self._reload():
                    return Outcome.REEXEC
                continue
            if isinstance(event, CheckCritical):
                self.consul.reset_abort()
                self._turn(self._on_check_critical, event)
            if isinstance(event, (KeyChanged, WatchFailed)):
                try:
                    self._turn(self._on_watch, event)
                finally:
                    self.watcher.handled.set()
            self._turn(self._advance)

    def _next_deadline(self) -> float:
        now = self.clock()
        due = [self.retry_at if self.session is None else self.renew_at]
        due += [t for t in (self.acquire_at, self.decide_at) if t is not None]
        if self.role == Role.LEADER and self._claim_until() is not None:
            due.append(self._claim_until())
        ping = self.notifier.next_ping()
        if ping is not None:
            due.append(ping)
        return max(now, min(due))

    def _turn(self, step: Callable, *args) -> None:
        """One step under the guard and within the time budget (§9.1, §9.2)."""
        self._check_claim()  # a claim that ran out while we slept (or were frozen) ends first
        try:
            with self.consul.time_limit(self._budget()):
                step(*args)
        except ConfigError:
            raise
        except ConsulError as e:
            if self.stop_requested:  # abandoned for the stop: not trouble to report
                log.debug("%s ended by the stop: %s", step.__name__, e)
                return
            self._consul_trouble(e)
        except Exception as e:  # a bug must not end the node's election: log it, retry
            log.exception("internal error in the election loop (%s); retrying", step.__name__)
            self._consul_trouble(ConsulError(f"internal error ({type(e).__name__}, see the log)"))
        self._check_claim()

    def _budget(self) -> float:
        """How long this step's requests may take: the turn budget, and a leader's claim window."""
        budget = self.timing.turn_budget
        until = self._claim_until()
        if until is not None and self.role == Role.LEADER:
            budget = min(budget, max(0.05, until - self.clock()))
        return budget

    def _advance(self) -> None:
        """Do whatever is due in the current state."""
        now = self.clock()
        if self.session is None:
            if now >= self.retry_at:
                self._start()
            return
        if now >= self.renew_at:
            self._renew()
        if self.session and self.decide_at is not None and now >= self.decide_at:
            self.decide_at = None
            self._decide()
        if self.session and self.acquire_at is not None and now >= self.acquire_at:
            self.acquire_at = None
            self._try_acquire()

    # ------------------------------------------------------------------
    # §4.6, §4.8: reaching Consul

    def _start(self) -> None:
        """Reach Consul; resume the session we had, else get one. Again after any failure."""
        if not self.connected:
            self._connect()
        if self.saved is not None and self._resume(self.saved):
            return
        self._get_session()

    def _connect(self) -> None:
        index, key = self.consul.read_key()
        self._preflight(key, fatal=True)
        self.key, self.key_index = key, index
        self.connected = True
        try:
            self.node = self.consul.node_name()
        except ConsulError as e:  # for messages only; the session is made on the agent's node anyway
            log.debug("cannot read the agent's node name: %s", e)
        log.info("connected to Consul at %s%s", self.settings.address,
                 f" (node {self.node})" if self.node else "")
        self.watcher.restart()
        self._recovered()

    def _preflight(self, key: Optional[KeyState], fatal: bool) -> bool:
        """A key that is not a lock key belongs to someone else: never touch it (§4.6)."""
        if key is None or key.is_lock:
            return True
        k = self.settings.trigger_key
        if key.session:
            message = (f"trigger-key {k} in Consul is held by another program ({describe_holder(self.consul, key)}) "
                       f"without vip-elector's lock flag (flags {key.flags}, value {key.value!r}); "
                       f"vip-elector never touches it: choose another trigger-key for both "
                       f"vip-manager and vip-elector")
        else:
            message = (f"trigger-key {k} in Consul is not a lock key (flags {key.flags}, value "
                       f"{key.value!r}); vip-elector will not overwrite it: if it is stale, "
                       f"remove it with 'consul kv delete {k}'")
        if fatal:
            raise ConfigError(message + ".")
        if self.role != Role.WAITING or "not a lock key" not in self.status_text:
            log.error("%s.", message)
        self._become(Role.WAITING, f"waiting: {k} is not a lock key ({key.value!r} written "
                                   f"by another program)", "the key was overwritten by a plain write")
        return False

    def _on_check_critical(self, event: CheckCritical) -> None:
        if self.role != Role.LEADER:
            return
        why = (f"check '{event.check_id}' is critical on this node: Consul invalidates the "
               f"session and frees the key")
        self._become(Role.CUT_OFF, f"cut off: check '{event.check_id}' is critical on this node; "
                                   f"not claiming {self.settings.trigger_key}", why)
        self.renew_at = self.clock()  # learn now whether Consul has the session still

    def _critical_seen(self, check_id: str) -> None:
        """From the health watch's thread: end the claim now, even mid-request."""
        self.events.put(CheckCritical(check_id))
        self.consul.abort(self.main_thread)

    def _consul_trouble(self, error: ConsulError) -> None:
        """§4.8: log it (once per distinct reason), say it in the status, back off."""
        delay = self.backoff.next()
        now = self.clock()
        self.retry_at = now + delay
        reason = str(error)
        if isinstance(error, PermissionDenied):
            status = f"waiting: Consul refused the ACL token ({self.settings.token_words}): {error}"
            text = (f"Consul at {self.settings.address} refused the ACL token "
                    f"({self.settings.token_words}): {error}; give a token with key write on "
                    f"{self.settings.trigger_key}, session write and node read (see examples/"
                    f"consul-acl-policy.hcl); retrying in {delay:.0f}s")
        else:
            status = f"waiting for Consul at {self.settings.address}: {error}"
            text = f"cannot use Consul at {self.settings.address}: {error}; retrying in {delay:.0f}s"
        if reason != self.trouble:
            log.warning("%s", text)
        self.trouble = reason
        if self.session is None:
            self._become(Role.WAITING, status, reason)
            return
        # With a session: keep renewing on its own clock; read the key again later.
        self.decide_at = self.retry_at
        self.acquire_at = None
        if self.role == Role.LEADER:  # still confirmed: the claim holds until its window ends
            self._show_status(f"{self._leader_status()}; {status}")
        elif self.role != Role.CUT_OFF:
            self._become(Role.FOLLOWER, f"follower: {status}")

    def _recovered(self) -> None:
        if self.trouble is not None:
            log.info("Consul at %s answers again", self.settings.address)
            self.watcher.restart()  # its query in flight may sit on a dead connection
        self.trouble = None
        self.backoff.reset()

    # ------------------------------------------------------------------
    # §4.1, §4.7: a session bound to our health; §8.2: or the one we had

    def _get_session(self) -> None:
        own = [self.settings.check_id] if self.settings.check_id else []
        details = self.consul.check_details(own)
        states = {cid: status for cid, (status, _) in details.items()}
        critical = [(cid, st, out) for cid, (st, out) in details.items() if st == "critical"]
        if critical:
            self._wait_for_health(*critical[-1])
            return
        # A check the agent does not list may be one this token cannot see (no
        # node:read): Consul itself decides, refusing the session when the
        # check is really missing ("Missing check … registration").
        unseen = [cid for cid, st in states.items() if st is None]
        sent = self.clock()
        try:
            session = self.consul.create_session(self.settings.checks)
        except CheckNotPassing as e:  # serfHealth, or the catalog has not caught up yet
            log.debug("session refused: %s", e)
            self._wait_for_health(e.check_id or self.settings.checks[-1], e.state)
            return
        if unseen and not self.warned_unseen:
            log.warning("check %s is not visible to the %s, but Consul accepts it: give the token "
                        "node:read (and service:read for a service check) so the status can say "
                        "when it fails (see examples/consul-acl-policy.hcl)", ", ".join(unseen),
                        self.settings.token_words)
            self.warned_unseen = True
        self._recovered()
        log.info("session %s created (checks %s, ttl %gs, lock-delay %gs)", session,
                 ", ".join(self.settings.checks), self.settings.ttl, self.settings.lock_delay)
        self._adopt(session, sent)
        if self.node is None:
            self._learn_node(session)
        self._decide()

    def _learn_node(self, session: str) -> None:
        """The agent's node, from Consul's record of the session it just made.

        A token without agent:read (the least-privilege policy) cannot ask the
        agent its name, but may read its own sessions; the state file keeps the
        node so that a restart can tell this node's session from another's
        (§8.2) instead of comparing it with an unknown.
        """
        try:
            info = self.consul.session_info(session)
        except ConsulError as e:
            log.debug("cannot read session %s to learn this node's name: %s", session, e)
            return
        if info is not None and info.node:
            self.node = info.node
            self._save_state()

    def _adopt(self, session: str, confirmed_at: float) -> None:
        self.session = session
        self.context.session = session
        self.confirmed_at = confirmed_at
        self.renew_failing = None
        self.renew_at = confirmed_at + self._renew_interval()
        self._save_state()

    def _save_state(self) -> None:
        self.state.save(self.saved_session())

    def saved_session(self) -> Optional[SavedSession]:
        """What a restart needs to resume our session, or None without one."""
        if self.session is None:
            return None
        s = self.settings
        return SavedSession(session=self.session, node=self.node or "", name=s.session_name,
                            key=s.trigger_key, value=s.value, checks=tuple(s.checks),
                            ttl=s.ttl, lock_delay=s.lock_delay)

    def _resume(self, saved: SavedSession) -> bool:
        """Take up the session a previous run of this daemon made (SPEC §8.2); True if resumed."""
        info = self.consul.session_info(saved.session)
        if info is None:
            log.info("session %s from the previous run is gone; starting afresh", saved.session)
            self._forget_saved()
            return False
        if not self._saved_is_ours(saved, info, " and starting afresh"):
            self._forget_saved()
            return False
        s = self.settings
        same = (info.name == s.session_name and info.checks == frozenset(s.checks)
                and info.ttl == s.ttl and abs(info.lock_delay - s.lock_delay) < 1e-6
                and info.behavior == SESSION_BEHAVIOR and saved.key == s.trigger_key
                and saved.value == s.value)
        if not same:
            log.info("session %s was made for another configuration (key %s, value %s, checks "
                     "%s, ttl %gs, lock-delay %gs): releasing it and starting afresh",
                     saved.session, saved.key, saved.value, "+".join(saved.checks), saved.ttl,
                     saved.lock_delay)
            self._release_old(saved, "held by the session of the previous configuration")
            self._forget_saved()
            return False
        sent = self.clock()
        try:
            self.consul.renew_session(saved.session)
        except InvalidSession:
            log.info("session %s from the previous run has just ended; starting afresh",
                     saved.session)
            self._forget_saved()
            return False
        self.node = self.node or info.node
        self.saved = None
        self._adopt(saved.session, sent)
        index, key = self.consul.read_key()
        holds = key is not None and key.session == saved.session
        log.info("resumed session %s%s", saved.session,
                 f": it still holds {s.trigger_key}, leading without touching the key"
                 if holds else "")
        self.key, self.key_index = key, index
        self.resuming = True
        try:
            self._on_key(key)
        finally:
            self.resuming = False
        return True

    def _saved_is_ours(self, saved: SavedSession, info, then: str = "") -> bool:
        """The session the state file names is one this daemon made on this node; else say so."""
        node = self.node or saved.node
        # An unknown node (a state file of 0.2 under a token without agent:read) is not
        # compared: the session's name, ID and the private state file decide.
        if ((not node or info.node == node) and info.name == saved.name
                and info.id in ("", saved.session) and saved.name.startswith("vip-elector-")):
            return True
        log.warning("the saved state names session %s (%r on node %s), which is not this "
                    "daemon's: leaving it alone%s", saved.session, info.name, info.node or "?", then)
        return False

    def _forget_saved(self) -> None:
        self.saved = None
        self.state.clear()

    def _release_old(self, saved: SavedSession, why: str) -> None:
        """A session of ours we will not take up: release it as a planned stop would (§8.2)."""
        _, key = self.consul.read_key(key=saved.key)
        if key is not None and key.session == saved.session:
            if self.consul.delete_if_unchanged(key.modify_index, key=saved.key):
                log.info("LOCK RELEASED: deleted %s, %s", saved.key, why,
                         extra={"MESSAGE_ID": MESSAGE_RELEASED})
        self.consul.destroy_session(saved.session)

    def _wait_for_health(self, check_id: str, state: Optional[str], output: str = "") -> None:
        why = "is not registered on the local agent" if state is None else f"is {state}"
        # Logged once per check and state; the output (which may change every run
        # of the check) rides along in the message and the status.
        changed = self.role != Role.WAITING or not self.status_text.startswith(
            f"waiting: check '{check_id}' {why}")
        if output:
            why += f": {output}"
        status = f"waiting: check '{check_id}' {why}"
        self._become(Role.WAITING, status, f"check '{check_id}' {why}")
        if changed:
            log.warning("not competing for %s: check '%s' %s; looking again every %gs",
                        self.settings.trigger_key, check_id, why, self.timing.health_poll,
                        extra={"MESSAGE_ID": MESSAGE_WAITING})
        self.retry_at = self.clock() + self.timing.health_poll

    # ------------------------------------------------------------------
    # §4.3, §8.7, §9.3: keeping the session, and knowing we still have it

    def claim_window(self) -> float:
        """How long after Consul last confirmed the session we may still claim the key.

        Another node can hold the key only after Consul has invalidated our
        session and lock-delay has passed. Invalidation needs either the TTL
        to run out (counted from a renewal Consul received no earlier than we
        sent it) or serfHealth to turn critical, which gossip takes more than
        4 s to decide after a node is cut off (memberlist's suspicion timeout
        alone is 4 s). So the window ends at lock-delay + 3 s, or the TTL if
        that is shorter: before anyone else can have the key.
        """
        return min(self.settings.ttl, self.settings.lock_delay + self.timing.claim_margin)

    def _claim_until(self) -> Optional[float]:
        if self.confirmed_at is None or self.session is None:
            return None
        return self.confirmed_at + self.claim_window()

    def _renew_interval(self) -> float:
        """A leader confirms often enough that a slow answer does not end its claim;
        a follower renews before half the TTL has passed (§4.3)."""
        half = self.settings.ttl / 2
        follower = max(half / 2, half - 1.0)
        if self._holds_key() or self.role in (Role.LEADER, Role.CUT_OFF):
            return min(follower, self.timing.leader_renew, self.claim_window() / 3)
        return follower

    def _confirmed_now(self) -> bool:
        until = self._claim_until()
        return until is not None and self.clock() < until - self._renew_interval()

    def _holds_key(self) -> bool:
        return self.session is not None and self.key is not None and self.key.session == self.session

    def _renew(self) -> None:
        sent = self.clock()
        try:
            self.consul.renew_session(self.session)
        except InvalidSession:
            self._session_gone("Consul no longer has it (a bound check failed, it expired, or "
                               "the agent's node left the cluster)")
            return
        except ConsulError as e:
            # Not the backoff of §4.8: the session may live, keep at it (§8.7).
            reason = str(e)
            if reason != self.renew_failing:
                log.warning("cannot renew session %s: %s; trying again every %gs", self.session,
                            reason, min(self.timing.renew_retry, self._renew_interval()))
            self.renew_failing = reason
            self.renew_at = self.clock() + min(self.timing.renew_retry, self._renew_interval())
            if self.role != Role.LEADER:  # a leader keeps its claim until the window ends
                self._cut_off(reason)
            return
        now = self.clock()
        was_failing = self.renew_failing is not None or self.role == Role.CUT_OFF
        doubt = self._doubt(was_failing, sent, now) or self._raft_leader_changed(now)
        self.confirmed_at = sent
        self.renew_failing = None
        self.renew_at = sent + self._renew_interval()
        self._recovered()
        if was_failing:
            log.info("Consul confirms session %s again", self.session)
        if doubt is not None or self.doubt is not None:
            self.doubt = self.doubt or doubt
            self._replace_session()
        elif was_failing:
            self._decide()

    def _doubt(self, was_failing: bool, sent: float, now: float) -> Optional[str]:
        """Why a server may hold a stray destroy of the session just confirmed, or None."""
        if was_failing:
            return f"renewals failed: {self.renew_failing or 'no answer in time'}"
        if self.confirmed_at is not None and now - self.confirmed_at >= self.settings.ttl:
            return f"not confirmed for {now - self.confirmed_at:.0f}s"
        if now - sent >= self.timing.doubt_latency:
            return f"a renewal took {now - sent:.1f}s"
        return None

    def _raft_leader_changed(self, now: float) -> Optional[str]:
        """Read the raft leader now and then; a change (since we last read it) is a doubt."""
        every = (self.timing.raft_poll if self.role in (Role.LEADER, Role.CUT_OFF)
                 else self.timing.raft_poll_follower)
        if self.raft_read_at is not None and now - self.raft_read_at < every:
            return None
        self.raft_read_at = now
        try:
            leader = self.consul.raft_leader()
        except ConsulError as e:  # only a precaution: the renewal decides about the session
            log.debug("cannot read the raft leader: %s", e)
            return None
        if not leader:
            return None
        before, self.raft_leader = self.raft_leader, leader
        if before is not None and leader != before:
            return f"the Consul servers' raft leader changed from {before} to {leader}"
        return None

    def _replace_session(self) -> None:
        """A new session for one that Consul had trouble with; the lock moves with it (see above).

        On a Consul error nothing is lost: the old session stays ours, the new
        one is kept in ``replacement`` and the move is tried again after the
        next good renewal (a move that went unanswered may have been applied:
        the key says).
        """
        old, why = self.session, self.doubt
        if self.replacement is None:
            try:
                self.replacement = self.consul.create_session(self.settings.checks)
            except CheckNotPassing as e:  # the old session is being invalidated too: let that happen
                log.debug("cannot replace session %s yet: %s", old, e)
                return
        new = self.replacement
        sent = self.clock()
        index, key = self.consul.read_key()
        if key is not None and key.session == old:
            try:
                self.consul.move_lock(old, new)
            except ConsulUnreachable:
                pass  # no answer is not "no": the key tells what Consul did
            index, key = self.consul.read_key()
            if key is not None and key.session == old:  # refused: the new session is not valid
                self.replacement = None
                self._destroy_quietly(new, "the replacement Consul would not give the lock to")
                return
        moved = key is not None and key.session == new
        self.replacement = self.doubt = None
        self.raft_leader = self.raft_read_at = None  # read afresh as the baseline for the new session
        self._adopt(new, sent)
        log.info("session %s replaced by %s: Consul had trouble (%s), and a Consul server may "
                 "still destroy a session it saw expire then%s", old, new, why,
                 f"; {self.settings.trigger_key} moved to the new session, its value unchanged"
                 if moved else "")
        self._destroy_quietly(old, "the replaced session (it holds nothing)")
        self.key_index, self.key = index, key
        self._on_key(key)

    def _drop_replacement(self) -> None:
        """A replacement made but never taken up (a stop, a reload, the old session gone)."""
        if self.replacement is not None:
            self._destroy_quietly(self.replacement, "the replacement session")
            self.replacement = None

    def _destroy_quietly(self, session: str, what: str) -> None:
        try:
            self.consul.destroy_session(session)
        except ConsulError as e:
            log.warning("could not destroy %s %s: %s (not renewed, Consul ends it within %gs)",
                        what, session, e, 2 * self.settings.ttl)

    def _check_claim(self) -> None:
        """End a claim Consul has not confirmed within the window (§9.3)."""
        until = self._claim_until()
        if self.role == Role.LEADER and until is not None and self.clock() >= until:
            self._cut_off(self.renew_failing or self.trouble or "no answer in time")

    def _cut_off(self, reason: str) -> None:
        since = self.clock() - self.confirmed_at if self.confirmed_at is not None else 0.0
        status = (f"cut off: Consul at {self.settings.address} has not confirmed session "
                  f"{self.session} for {since:.0f}s ({reason}); not claiming "
                  f"{self.settings.trigger_key}")
        lost = f"cannot confirm the session with Consul ({reason}); another node may get the key"
        self._become(Role.CUT_OFF, status, lost)
        self.renew_at = min(self.renew_at, self.clock() + self.timing.renew_retry)

    def _session_gone(self, why: str) -> None:
        log.warning("session %s is gone: %s", self.session, why)
        self.session = None
        self.doubt = None
        self._drop_replacement()  # a fresh start makes its own
        self.confirmed_at = None
        self.renew_failing = None
        self.context.session = ""
        self.acquire_at = self.acquire_refused_since = self.decide_at = None
        self.state.clear()
        self._become(Role.WAITING, f"waiting: session gone ({why}); making a new one",
                     f"session gone: {why}")
        self.retry_at = self.clock()

    # ------------------------------------------------------------------
    # §4.2-§4.4: the key

    def _decide(self) -> None:
        """Act on the key as it is now, not as the (perhaps reconnecting) watcher last saw it."""
        self.key_index, self.key = self.consul.read_key()
        self._on_key(self.key)

    def _on_watch(self, event) -> None:
        if event.generation != self.watcher.generation:
            return
        if isinstance(event, WatchFailed):
            log.debug("watch on %s failed: %s", self.settings.trigger_key, event.error)
            return
        if self.trouble is not None:
            # The watcher got an answer: Consul is back. Try now, not at the end of the backoff.
            self.retry_at = self.clock()
            if self.session is not None:
                self.decide_at = self.clock()
        if event.index < self.key_index:
            # Older than what we read ourselves — or Consul's index went back: read afresh.
            self.decide_at = self.clock()
            return
        self.key, self.key_index = event.state, event.index
        if self.session is not None:
            self._on_key(event.state)

    def _on_key(self, key: Optional[KeyState]) -> None:
        if not self._preflight(key, fatal=False):
            return
        if key is None or key.session is None:
            if self.role == Role.LEADER:
                self._become(Role.FOLLOWER, "follower: the key was deleted; competing again",
                             "the key was deleted (our session was invalidated, or someone "
                             "deleted it)")
                self.renew_at = self.clock()   # find out now whether our session still lives
                self._renew()
                if self.session is None:
                    return
            self._try_acquire()
        elif key.session == self.session:
            if self.renew_failing is not None:
                return  # claimed again once a renewal confirms the session
            if not self._confirmed_now():
                self._renew()  # confirm first: we claim only what Consul has just confirmed
            if self.session is not None and self._confirmed_now():
                self._become(Role.LEADER, self._leader_status())
                self.renew_at = min(self.renew_at, self.confirmed_at + self._renew_interval())
        else:
            self._follow(key)

    def _try_acquire(self) -> None:
        if self.renew_failing is not None:
            return  # it would not be confirmed anyway; a good renewal decides again
        sent = self.clock()
        try:
            won = self.consul.acquire(self.session)
        except InvalidSession:
            self._session_gone("Consul says it is invalid")
            return
        except ConsulUnreachable:
            # No answer is not "no": Consul may have applied it (REFERENCE §8). Read again.
            self.decide_at = self.clock()
            raise
        now = self.clock()
        if won:
            self.acquire_at = self.acquire_refused_since = None
            self.confirmed_at = sent  # a won acquire proves the session valid
            self.key = KeyState(self.settings.value, self.key.flags if self.key else 0,
                                self.session, 0)
            self._become(Role.LEADER, self._leader_status())
            self.renew_at = min(self.renew_at, sent + self._renew_interval())
            # Learn our write's ModifyIndex (for the CAS delete) and make older watch news stale.
            self._decide()
            return
        # Refused while the key looked free: lock-delay after the last holder's session
        # ended (§4.4). Retry promptly until it has passed; later, more gently.
        if self.key is not None and self.key.session not in (None, self.session):
            self._follow(self.key)
            return
        if self.acquire_refused_since is None:
            self.acquire_refused_since = now
            log.debug("acquire of %s refused while it looked free (lock-delay, or another node "
                      "was faster); retrying every %gs", self.settings.trigger_key,
                      self.timing.lock_delay_retry)
        in_delay = now - self.acquire_refused_since < self.settings.lock_delay + 1.0
        self.acquire_at = now + (self.timing.lock_delay_retry if in_delay else 1.0)
        self._become(Role.FOLLOWER, "follower: key is free, waiting for lock-delay to pass")

    def _follow(self, key: KeyState) -> None:
        self.acquire_at = self.acquire_refused_since = None
        k = self.settings.trigger_key
        if key.value == self.settings.value:
            # Not a leader to follow: something else writes this node's own name.
            status = (f"follower: {k} is held by another session with this node's own value "
                      f"{key.value!r}")
            if self.status_text != status:
                log.warning("%s is held by another session with this node's own value %r (%s), "
                            "not by this daemon's session %s: a second vip-elector for the same "
                            "key on this host, another node with the same --hostname/"
                            "trigger-value, or an earlier run whose session was not saved (it "
                            "ends within %gs); give each instance its own trigger-key and each "
                            "node its own name", k, key.value, describe_holder(self.consul, key),
                            self.session, 2 * self.settings.ttl)
        else:
            status = f"follower: leader is {key.value}" if key.value else "follower: no leader yet"
        if self.status_text != status and key.value != self.settings.value:
            log.info("following: %s holds %s", key.value or "a session", k)
        if self.role == Role.LEADER:
            self._become(Role.FOLLOWER, status, f"{key.value or 'another session'} holds it now")
        else:
            self._become(Role.FOLLOWER, status)
        self.renew_at = min(self.renew_at, (self.confirmed_at or self.clock()) + self._renew_interval())

    def _leader_status(self) -> str:
        return f"leader: holding {self.settings.trigger_key} as {self.settings.value}"

    # ------------------------------------------------------------------
    # Role changes: logs, journal field, status, hook

    def _become(self, role: Role, status: str, why: str = "") -> None:
        previous = self.role
        self.role = role
        if self.vip is not None: self.vip.settle({Role.LEADER: True, Role.STARTING: None}.get(role, False))  # h5-vip  # noqa: E501,E701
        self.context.role = role.value
        if role == Role.LEADER and self.health is None and self.settings.check_id:
            interval = max(0.1, min(0.5, self.settings.lock_delay / 2))
            self.health = HealthWatch(self.consul, self.settings.check_id, interval,
                                      self._critical_seen)
        elif role != Role.LEADER and self.health is not None:
            self.health.stop()
            self.health = None
        if previous != Role.LEADER and role == Role.LEADER and self.resuming:
            # Not a new leadership (the audit's MESSAGE_ID): the key was not touched.
            log.info("resumed leadership: this node (%s) still holds %s with session %s; the "
                     "key was not touched", self.settings.value, self.settings.trigger_key,
                     self.session)
            self.hooks.announce(LEADER, "this node still holds the key (resumed)", self.session or "")
        elif previous != Role.LEADER and role == Role.LEADER:
            log.info("LOCK ACQUIRED: this node (%s) now holds %s", self.settings.value,
                     self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_ACQUIRED})
            self.hooks.announce(LEADER, "this node holds the key", self.session or "")
        elif previous == Role.LEADER and role not in (Role.LEADER, Role.STOPPING):
            log.warning("LOCK LOST: this node (%s) no longer holds %s: %s", self.settings.value,
                        self.settings.trigger_key, why or status, extra={"MESSAGE_ID": MESSAGE_LOST})
        if role not in (Role.LEADER, Role.STARTING) and previous != role or role == Role.STOPPING:
            self.hooks.announce(STANDBY, why or status, self.session or "")
        self._show_status(status)

    def _show_status(self, status: str) -> None:
        self.status_text = status
        self.notifier.status(status + (f"; {self.note}" if self.note else ""))

    # ------------------------------------------------------------------
    # §8.3: a reload

    def _reload(self) -> bool:
        """True: re-execute now (the configuration is valid). False: keep running as before."""
        self.notifier.reloading()
        log.info("reload requested: reading the configuration again")
        try:
            new = self.reload_settings() if self.reload_settings is not None else None
            if new is not None and self.session is not None:
                with self.consul.time_limit(self.timing.turn_budget):
                    self._carry_session_over(new)
        except ConfigError as e:
            return self._reload_refused(str(e))
        except ConsulError as e:
            return self._reload_refused(
                f"cannot make the session the new configuration needs ({e}), so the key stays "
                f"with the current one; try the reload again once Consul answers")
        except Exception as e:
            log.exception("internal error while reloading; still running as before")
            self.notifier.ready()
            self.reload_verdict(f"internal error ({type(e).__name__}); see journalctl -u vip-elector")
            return False
        self.note = ""
        self.reload_verdict(None)
        self.watcher.stop()
        with self.consul.time_limit(self.timing.shutdown_timeout):
            self._drop_replacement()  # the new program starts from the session it resumes
        self.hooks.finish(time.monotonic() + self.timing.reload_hook_wait)
        self.state.save(self.saved_session()) if self.session else self.state.clear()
        self._show_status("reloading: starting the new program")
        return True

    def _reload_refused(self, why: str) -> bool:
        log.error("reload failed, still running with the previous configuration: %s", why,
                  extra={"MESSAGE_ID": MESSAGE_CONFIG_ERROR})
        self.note = f"reload failed: {why}"
        self._show_status(self.status_text)
        self.notifier.ready()
        self.reload_verdict(why)
        return False

    def _carry_session_over(self, new: Settings) -> None:
        """A reload that changes the session's parameters: move the lock to a session made for them.

        Releasing the key would move the VIP for a change of TTL, lock-delay or
        checks; instead the new session is made now, while this program still
        holds the key, and the lock moves to it in one transaction (§9.4): the
        key is never free and its value does not change. Consul refusing the
        new session (a new check not registered, or critical) refuses the
        reload: the node keeps its key under the configuration it has. With
        another key, value or Consul, the new program releases and competes
        afresh (§8.3).
        """
        s = self.settings
        if (new.trigger_key, new.value, new.address, new.token) != (s.trigger_key, s.value, s.address, s.token):
            return
        if (tuple(new.checks), new.ttl, new.lock_delay) == (tuple(s.checks), s.ttl, s.lock_delay):
            return
        old = self.session
        try:
            fresh = self.consul.create_session(new.checks, ttl=new.ttl, lock_delay=new.lock_delay)
        except CheckNotPassing as e:
            check = e.check_id or new.checks[-1]
            state = "is not registered on the local agent" if e.state is None else f"is {e.state}"
            raise ConfigError(f"the new configuration binds check '{check}', which {state}: "
                              f"register it (or make it pass), or fix --check-id, then reload "
                              f"again") from None
        sent = self.clock()
        _, key = self.consul.read_key()
        if key is not None and key.session == old:
            try:
                self.consul.move_lock(old, fresh)
            except ConsulUnreachable:
                pass  # no answer is not "no": the key tells what Consul did
            _, key = self.consul.read_key()
            if key is not None and key.session == old:
                self._destroy_quietly(fresh, "the session made for the new configuration")
                raise ConsulError("Consul would not move the lock to the session made for the "
                                  "new configuration")
        moved = key is not None and key.session == fresh
        self._destroy_quietly(old, "the session of the previous configuration")
        self.settings = new  # what the state handed to the new program describes
        self.session, self.confirmed_at = fresh, sent
        self.context.session = fresh
        log.info("session %s replaced by %s for the new configuration (checks %s, ttl %gs, "
                 "lock-delay %gs)%s", old, fresh, "+".join(new.checks), new.ttl, new.lock_delay,
                 f"; {new.trigger_key} moved to it in place, its value unchanged" if moved else "")

    # ------------------------------------------------------------------
    # §4.5: a planned stop

    def _shutdown(self, requested_at: float) -> Outcome:
        deadline = requested_at + self.timing.stop_budget
        self.consul.reset_abort()
        holds = self.role == Role.LEADER or self._holds_key()
        self.notifier.stopping()
        self._become(Role.STOPPING, "stopping", "planned stop")
        self.watcher.stop()
        self.hooks.finish(deadline - self.timing.release_reserve)
        left = lambda: max(0.05, deadline - time.monotonic())  # noqa: E731
        with self.consul.time_limit(left()):
            if self.session is None and self.saved is not None:
                self._release_saved(self.saved)  # stopped before it could resume
            if holds and self.session is not None:
                self._release()
            if self.session is not None:
                try:
                    with self.consul.time_limit(min(self.timing.shutdown_timeout, left())):
                        self.consul.destroy_session(self.session)
                except ConsulError as e:
                    log.warning("could not destroy session %s: %s (Consul will expire it)",
                                self.session, e)
            self._drop_replacement()
        self.state.clear()
        self.hooks.close()
        log.info("stopped")
        return Outcome.STOPPED

    def _release_saved(self, saved: SavedSession) -> None:
        """A stop before the previous run's session was taken up: release it as that run would have.

        Clearing the state alone would leave the key held by a session nobody
        renews: no handover until its TTL ends (SPEC §4.5).
        """
        try:
            info = self.consul.session_info(saved.session)
            if info is None:
                return
            if not self._saved_is_ours(saved, info):
                return
            self._release_old(saved, "held by the previous run's session (stopped before resuming it)")
        except ConsulError as e:
            log.warning("could not release session %s of the previous run: %s; Consul deletes "
                        "%s when that session's TTL (%gs) ends", saved.session, e,
                        saved.key, saved.ttl)

    def _release(self) -> None:
        """Delete our own write with CAS: vip-manager drops the VIP, a standby takes over at once."""
        per_request = self.timing.shutdown_timeout
        try:
            key = self.key if self.key is not None and self.key.modify_index else None
            for _ in range(2):
                if key is None or key.session != self.session:
                    with self.consul.time_limit(per_request):
                        _, key = self.consul.read_key()
                    if key is None or key.session != self.session:
                        log.warning("LOCK LOST: %s was no longer ours at shutdown",
                                    self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_LOST})
                        return
                with self.consul.time_limit(per_request):
                    deleted = self.consul.delete_if_unchanged(key.modify_index)
                if deleted:
                    log.info("LOCK RELEASED: this node (%s) gave up %s on shutdown", self.settings.value,
                             self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_RELEASED})
                    return
                key = None  # changed under us: read it again once
            log.warning("could not release %s: it kept changing", self.settings.trigger_key)
        except ConsulError as e:
            log.warning("could not release %s: %s; Consul deletes it when our session ends",
                        self.settings.trigger_key, e)


__all__ = ["Election", "Role", "Outcome", "Timing", "Backoff", "KeyWatcher", "Inbox", "Stop"]
