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
  key *and* Consul confirmed the session less than the claim window ago
  (``Lease.claim_until``). A leader that cannot confirm becomes CUT_OFF: it
  stops claiming, keeps its session's ID and keeps renewing at its normal
  cadence; if Consul still has the session, it leads again without the key
  having been touched (§8.7).
* One session per daemon (§9.4): a session is abandoned only when Consul
  says it is gone, never because Consul is unreachable; one that outlived
  Consul trouble is replaced in place (``Lease.replace``).
* Nothing but a signal ends the loop (§9.1): every step runs under one guard
  (``_turn``); a Consul error is handled where it happens, a bug is logged
  with its traceback as an internal error and what was due is tried again
  after a backoff, without changing the role.
* Time budgets (§9.2): every step's requests share one budget, well inside
  ``WatchdogSec``/2; a stop aborts whatever request is in flight.

Shape: the main thread waits on one inbox and then does whatever is due. A
watcher thread keeps a blocking query open on the key and posts every
change; the signal relay posts stops and reloads. Only the main thread
decides anything, and it is the one that renews the session and pings the
systemd watchdog, so a stuck loop stops the pings. The loop asks its parts
what is due and maps their answers to roles: ``Start`` (connect, resume the
previous run's session (§8.2) or make one), the ``Lease`` (the session),
the ``TriggerKey``, the ``Cluster`` (§11: candidates, priorities,
stickiness, preemption), the ``Switchover`` (§11.3, as the leader), the
``Withdrawal`` (§12: the VIP's fault), ``ConsulTrouble`` (§4.8), and the
``Reporter``, which alone says and announces what the node is;
``Lifecycle`` ends it (a stop, a reload). No step calls back into the step
that called it: what one step makes due (a read after an acquire, an act
after a replacement) is a time written in the ``Agenda``, the one place
that says which ``Step`` is due now (``Agenda.due``) and when the loop
wakes next (``Agenda.wake_at``).

Timing-critical paths: key released → watcher wakes → acquire (one request);
SIGTERM → hook ``standby`` → CAS delete → destroy (two requests).
"""

from __future__ import annotations

import enum
import logging
import random
import signal
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional

from ..config import ConfigError, Settings
from ..consul import ConsulClient, ConsulError, ConsulUnreachable, InvalidSession, KeyState
from ..hooks import Hooks
from ..metrics import NullMetrics

if TYPE_CHECKING:
    from ..address import VirtualAddress
from ..state import SavedSession, StateStore
from ..systemd import ElectionContext, Notifier
from .agenda import Agenda, Step
from .events import RELOAD, CheckCritical, Inbox, KeyChanged, Reload, Stop, VipFault, WatchFailed
from .cluster import HANDOVER_HOOK_WAIT, READY_READ, Cluster
from .key import HeldByOther, RefusedByLockDelay, TriggerKey, Won
from .lease import Confirmed, Failing, Gone, Lease, Replaced, Unhealthy
from .lifecycle import Lifecycle
from .previous_run import PreviousRun
from .role import Reporter, Role
from .start import Start
from .switchover import HandedOver, Kept, Moved, Review, Switchover
from .timing import Backoff, Timing
from .trouble import ConsulTrouble
from .watch import KeyWatcher
from .withdrawal import Withdrawal

log = logging.getLogger("vip_elector")

class Outcome(enum.Enum):
    STOPPED = 0                  # a planned stop: exit 0
    REEXEC = 1                   # a reload with a valid configuration: re-execute


class Election:
    """The state machine of SPEC §4. ``run()`` returns an Outcome."""

    def __init__(self, settings: Settings, consul: ConsulClient, notifier: Notifier,
                 context: ElectionContext, timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random,
                 hooks: Optional[Hooks] = None,
                 state: Optional[StateStore] = None,
                 saved: Optional[SavedSession] = None,
                 reload_settings: Optional[Callable[[], Optional[Settings]]] = None,
                 reload_verdict: Callable[[Optional[str]], None] = lambda error: None,
                 metrics: Optional[NullMetrics] = None,
                 vip: Optional["VirtualAddress"] = None):
        self.settings, self.consul, self.notifier = settings, consul, notifier
        self.metrics = metrics or NullMetrics()  # a sink: told of roles, confirmations, replacements
        self.timing, self.clock = timing, clock
        self.reload_settings = reload_settings  # the validated new configuration, or ConfigError
        self.reload_verdict = reload_verdict    # told None (applied) or why a reload was refused
        self.state = state or StateStore(None)
        self.events = Inbox()
        self.watcher = KeyWatcher(consul, self.events, timing, rng)
        self.reporter = Reporter(settings, notifier, context,
                                 hooks or Hooks(None, 0, settings.trigger_key, settings.value),
                                 consul, self._critical_seen, self.metrics, vip)
        self.lease = Lease(consul, settings, timing, clock, self.state, self.reporter.use_session)
        self.reporter.claim_left = self._claim_left
        if vip is not None:
            vip.on_fault = lambda why: self.events.put(VipFault(why))  # from the VIP's keeper thread
        self.key = TriggerKey(consul, settings, timing, clock)
        self.cluster = Cluster(consul, settings, clock)  # SPEC §11: candidates, priority, switchover
        self.previous = PreviousRun(consul, settings, clock, self.state, self.reporter, saved)
        self.lifecycle = Lifecycle(consul, timing, clock, notifier, self.state, self.lease, self.key,
                                   self.previous, self.reporter, self.watcher, self.cluster)
        self.trouble = ConsulTrouble(settings, Backoff(timing.backoff_min, timing.backoff_max, rng),
                                     self.watcher)
        self.start = Start(consul, settings, self.lease, self.key, self.previous, self.cluster,
                           self.watcher, self.trouble)  # a session: resumed (§8.2) or made
        self.switchover = Switchover(consul, settings, self.cluster)  # §11.3, as the leader
        self.withdrawal = Withdrawal(consul, self.key, self.reporter, timing, clock, vip)  # §12's fault
        self.bug_backoff = Backoff(timing.backoff_min, timing.backoff_max, rng)  # internal errors
        self.main_thread = threading.get_ident()
        self.stop_requested = False              # set once, from the signal thread
        # What is due, on the loop's clock (the parts keep their own), and who does it.
        self.agenda = Agenda(self.lease, self.key, self.cluster, self.withdrawal, self.reporter,
                             notifier, clock)
        self._steps: dict[Step, Callable[[], None]] = {
            Step.WITHDRAW: self._withdraw, Step.START: self._start, Step.RENEW: self._renew,
            Step.SETTLE_STRAY: self._settle_stray, Step.READ_KEY: self._read_key, Step.ACT: self._act,
            Step.ACQUIRE: self._acquire, Step.WRITE_RECORD: self._write_record,
            Step.REVIEW_REQUEST: self._review_request, Step.PREEMPT: self._preempt}
        self.lost_at = float("-inf")             # our session was last lost (then look at the checks often)
        self.kept = False                        # a switchover failed: the key never left (no new leadership)

    @property
    def role(self) -> Role:
        return self.reporter.role

    @property
    def session(self) -> Optional[str]:
        return self.lease.session

    def saved_session(self) -> Optional[SavedSession]:
        """What a restart needs to resume our session, or None without one."""
        return self.lease.saved()

    # ------------------------------------------------------------------
    # Signals (from the relay's thread)

    def request_stop(self) -> None:
        """Ask the loop to stop (from the signal relay or another thread)."""
        at = self.clock()
        self.stop_requested = True  # first: the loop then knows why its request ends
        # A request in flight would hold the stop for its whole timeout: end it,
        # and any the loop starts before it sees the stop; Lifecycle.stop lifts that.
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
                for e in self.events.drain() if isinstance(e, (Stop, Reload))]

    # ------------------------------------------------------------------
    # The loop

    def run(self) -> Outcome:
        """Start (resume, or connect), tell systemd we are ready, then follow events."""
        self.main_thread = threading.get_ident()
        self.reporter.starting()
        self._turn(self._advance)                # the first attempt to reach Consul (§6: then READY)
        self.notifier.ready()
        while True:
            event = self.events.get(timeout=max(0.0, self.agenda.wake_at() - self.clock()))
            self.notifier.watchdog()
            if isinstance(event, Stop):
                holds = self.role == Role.LEADER or self.key.held_by(self.lease.session)
                self.lifecycle.stop(event.at, holds)
                return Outcome.STOPPED
            if isinstance(event, Reload):
                if self.stop_requested:  # the stop is on its way: no point starting a new program
                    log.info("reload requested, but a stop was asked for too: stopping instead")
                    continue
                if self.lifecycle.reload(self.reload_settings, self.reload_verdict):
                    return Outcome.REEXEC
                continue
            if isinstance(event, CheckCritical):
                self.consul.reset_abort()
                self._turn(self._on_check_critical, event)
            if isinstance(event, VipFault):
                self._turn(self._on_vip_fault, event)
            if isinstance(event, (KeyChanged, WatchFailed)):
                try:
                    self._turn(self._on_watch, event)
                finally:
                    self.watcher.handled.set()
            self._turn(self._advance)

    def _advance(self) -> None:
        """Do whatever is due, step after step; each step once (what it makes due again, such
        as a renewal that took longer than the renewal interval, waits for the next turn)."""
        done: list[Step] = []
        while True:
            step = self.agenda.due(self.clock())
            if step is None or step in done:
                return
            done.append(step)
            self._steps[step]()

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
        except Exception:  # a bug must not end the node's election, nor pass for Consul's trouble
            delay = self.bug_backoff.next()
            log.exception("internal error in the election loop (%s); retrying in %.1fs",
                          step.__name__, delay)
            self.agenda.paused_until = self.clock() + delay
        else:
            self.bug_backoff.reset()
        self._check_claim()
        self.metrics.session_confirmed(self.lease.confirmed_at)

    def _budget(self) -> float:
        """How long this step's requests may take: the turn budget, and a leader's claim window."""
        budget = self.timing.turn_budget
        until = self.lease.claim_until
        if until is not None and self.role == Role.LEADER:
            budget = min(budget, max(0.05, until - self.clock()))
        return budget

    def _claim_left(self) -> float:
        """Seconds until the claim window ends (§9.3); 0 without a confirmation."""
        until = self.lease.claim_until
        return 0.0 if until is None else max(0.0, until - self.clock())

    def _vip_holding_off(self) -> bool:
        """--manage-vip: the VIP cannot be held here now (a fault, or one too recent): do not
        compete; the node says so and looks again (§12, keepalived's FAULT state)."""
        held = self.withdrawal.holding_off()
        if held is None:
            return False
        why, left = held
        self.reporter.vip_fault(why, left, gave_up=False)
        self.agenda.retry_at = self.clock() + self.withdrawal.look_in(left)
        return True

    # ------------------------------------------------------------------
    # §4.6, §4.8, §8.2: reaching Consul, and a session

    def _start(self) -> None:
        """Reach Consul; resume the session we had, else get one. Again after any failure."""
        self.start.connect()
        if self.start.resume() is not None:
            self._act(resumed=True)  # it holds the key: lead on without a new leadership (§8.2)
            return
        if self._vip_holding_off():
            return
        created = self.start.create()
        if isinstance(created, Unhealthy):
            poll = self.timing.health_poll
            self.reporter.check_not_passing(created.check_id, created.state, created.output, poll)
            # Just lost our session while the checks pass again (a stale "failed" from gossip
            # lasts ~50 ms): look often, so the key can come back here (SPEC §11.4 stickiness).
            soon = self.clock() - self.lost_at < 3.0
            self.agenda.retry_at = self.clock() + (min(0.1, poll) if soon else poll)
            return
        self._read_key()

    def _consul_trouble(self, error: ConsulError) -> None:
        """§4.8: back off, and say so; with a session, keep renewing on the lease's own clock."""
        delay, status = self.trouble.failed(error)
        self.agenda.retry_at = self.clock() + delay
        with_session = self.lease.session is not None
        if with_session:  # read the key again later
            self.agenda.read_at = self.agenda.retry_at
            self.key.retry_at = None
        self.reporter.consul_trouble(status, str(error), with_session)

    # ------------------------------------------------------------------
    # §4.3, §8.7, §9.3, §9.4: keeping the session, and knowing we still have it

    def _renew(self) -> None:
        renewal = self.lease.renew(self.agenda.leading(), cut_off=self.role == Role.CUT_OFF)
        if isinstance(renewal, Gone):
            self._session_gone(renewal.reason)
        elif isinstance(renewal, Failing):
            if self.role != Role.LEADER:  # a leader keeps its claim until the window ends
                self._cut_off(renewal.reason)
        elif isinstance(renewal, Confirmed):
            self.trouble.over()
            self.reporter.claim_extended()  # the VIP's lifetime follows the claim window
            if renewal.recovered:
                log.info("Consul confirms session %s again", self.lease.session)
                # The watch went through the same trouble and may sit in its backoff (up to
                # 30 s): a key freed now (a stalled server applying a stop's release late)
                # would go unseen that long. Ask afresh.
                self.watcher.restart()
            if renewal.replace:
                self._replace()
            elif renewal.recovered:
                self.agenda.read_at = self.clock()

    def _settle_stray(self) -> None:
        """A refused reload's move went unanswered: the lock goes back to our session first."""
        self.agenda.read_at = self.clock()  # then act on the key as it is
        # If it fails (or raises): again then.
        self.agenda.stray_at = self.clock() + self.trouble.backoff.next()
        if self.lease.settle_stray():
            self.trouble.backoff.reset()

    def _replace(self) -> None:
        replaced = self.lease.replace()
        if isinstance(replaced, Replaced):
            self.metrics.session_replaced()
            self.key.seen(replaced.index, replaced.key)
            self.agenda.act_at = self.clock()

    def _check_claim(self) -> None:
        """End a claim Consul has not confirmed within the window (§9.3)."""
        until = self.lease.claim_until
        if self.role == Role.LEADER and until is not None and self.clock() >= until:
            self._cut_off(self.lease.failing or self.trouble.reason or "no answer in time")

    def _cut_off(self, reason: str) -> None:
        confirmed = self.lease.confirmed_at
        self.reporter.cut_off(self.clock() - confirmed if confirmed is not None else 0.0, reason)

    def _on_check_critical(self, event: CheckCritical) -> None:
        if self.role != Role.LEADER:
            return
        self.reporter.check_critical(event.check_id)
        self.lease.renew_now()  # learn now whether Consul has the session still

    def _on_vip_fault(self, event: VipFault) -> None:
        """The VIP cannot be held here (interface missing or down, adding failed): as in a
        planned handover, the key is released at once for a healthy node, and the session (with
        our candidate key) destroyed, so that this node does not compete until the fault has
        been gone for the hold-off (§12; keepalived's FAULT state)."""
        held = self.withdrawal.holding_off()
        if held is None or self.lease.session is None or self.withdrawal.active:
            return  # over already, or nothing to withdraw (_start looks before competing)
        why, left = held
        holds = self.role == Role.LEADER or self.key.held_by(self.lease.session)
        self.reporter.vip_fault(why, left, gave_up=holds)  # standby hook, VIP off
        if holds:
            self.reporter.finish_hooks(min(HANDOVER_HOOK_WAIT, self.settings.hook_timeout))
        self.withdrawal.begin(why)
        self.key.stop_retrying()
        self.agenda.read_at = self.agenda.act_at = None
        self._withdraw()

    def _withdraw(self) -> None:
        """Release the key (if ours) and destroy the session, again while Consul does not
        answer; then the node looks again (after the hold-off) whether it may compete."""
        withdrawn = self.withdrawal.attempt(self.lease.session, self._budget())
        if withdrawn is None:
            return
        self.lease.forget_quietly()
        self.cluster.session_lost()
        self.agenda.retry_at = self.clock() + withdrawn.look_in

    def _critical_seen(self, check_id: str) -> None:
        """From the health watch's thread: end the claim now, even mid-request."""
        self.events.put(CheckCritical(check_id))
        self.consul.abort(self.main_thread)

    def _session_gone(self, why: str) -> None:
        self.lease.forget(why)
        self.cluster.session_lost()
        self.lost_at = self.clock()
        self.key.stop_retrying()
        self.agenda.read_at = self.agenda.act_at = None
        self.reporter.session_gone(why)
        self.agenda.retry_at = self.clock()
        self.kept = False
        if self.switchover.moving is not None:  # whatever the move did, this node holds nothing now
            self._moved(self.switchover.settle(None, None))

    # ------------------------------------------------------------------
    # §4.2-§4.4: the key

    def _on_watch(self, event) -> None:
        if event.generation != self.watcher.generation:
            return
        if isinstance(event, WatchFailed):
            log.debug("watch on %s failed: %s", self.settings.trigger_key, event.error)
            return
        now = self.clock()
        if self.trouble.reason is not None:
            # The watcher got an answer: Consul is back. Try now, not at the end of the backoff.
            self.agenda.retry_at = now
            if self.lease.session is not None:
                self.agenda.read_at = now
        if not self.key.observe(event.index, event.state, event.entries):
            self.agenda.read_at = now  # older than what we read ourselves: read afresh
            return
        # Known with or without a session (waiting for a check, a VIP fault's hold-off): who
        # holds the key is what a later free key is judged by (§11.4), never a stale memory.
        self.cluster.observe(self.key.entries, self.key.state)
        if self.lease.session is not None:
            self._act()

    def _read_key(self) -> None:
        """Act on the key as it is now, not as the (perhaps reconnecting) watcher last saw it."""
        self.agenda.read_at = None
        self.key.read()
        self._act(fresh=True)
        self._expect_handover()

    def _act(self, resumed: bool = False, fresh: bool = False) -> None:
        """The key as last seen → what this node is (§4.3, §4.4, §4.6).

        ``resumed``: the session was just taken up from the previous run; if it
        holds the key, the node leads on without a new leadership (§8.2).
        ``fresh``: the key was read just now (not a watch answer that may predate a move)."""
        self.agenda.act_at = None
        key: Optional[KeyState] = self.key.state
        self.cluster.observe(self.key.entries, key)
        if self.withdrawal.active:
            return  # giving the session up (the VIP's fault): never a claim on the way
        moving = self.switchover.moving
        if moving is not None:
            # Only the target can hold it if the move was applied; that it is still ours, only
            # a read made after the move can say (a watch answer may be older).
            if not fresh and not moving.applied(key):
                self.agenda.read_at = self.clock()
                return
            self._moved(self.switchover.settle(key, self.lease.session))
        if self.lease.stray is not None:
            self.agenda.read_at = self.clock()  # the key may be on the stray session: settle that first
            return
        foreign = self.key.foreign(key)
        if foreign is not None:
            self.reporter.not_a_lock_key(key, foreign)
        elif key is None or key.session is None:
            if self.role == Role.LEADER:
                self.reporter.key_deleted()
                self._renew()  # find out now whether our session still lives
                if self.lease.session is None:
                    return
            if not self._defers():
                self._acquire()
        elif key.session == self.lease.session:
            if self.lease.failing is not None:
                return  # claimed again once a renewal confirms the session
            if not self.lease.confirmed_now(leading=True):
                self._renew()  # confirm first: we claim only what Consul has just confirmed
            if self.lease.session is not None and self.lease.confirmed_now(leading=True):
                self.reporter.leads(resumed=resumed, kept=self.kept)
                self.kept = False
                self._switchover()
        else:
            self._follow(key)

    def _acquire(self) -> None:
        if self.withdrawal.holding_off() is not None:
            self.key.stop_retrying()
            self.events.put(VipFault("held off"))  # withdraw: the next event destroys the session
            return
        if self.lease.failing is not None:
            self.key.retry_at = None
            return  # it would not be confirmed anyway; a good renewal decides again
        if self._defers():
            return
        try:
            acquired = self.key.acquire(self.lease.session)
        except InvalidSession:
            self._session_gone("Consul says it is invalid")
            return
        except ConsulUnreachable:
            # No answer is not "no": Consul may have applied it (REFERENCE §8). Read again.
            self.agenda.read_at = self.clock()
            raise
        if isinstance(acquired, Won):
            self.lease.confirm(acquired.sent)  # a won acquire proves the session valid
            self.reporter.leads()
            self.agenda.read_at = self.clock()  # learn our write's ModifyIndex (for the CAS delete)
        elif isinstance(acquired, HeldByOther):
            self._follow(acquired.holder)
        else:
            if isinstance(acquired, RefusedByLockDelay):
                self.cluster.refused_by_lock_delay()  # Consul freed it: stickiness may apply
                if self._defers():
                    return
            self.reporter.waits_for_lock_delay()

    # ------------------------------------------------------------------
    # SPEC §11: priorities and stickiness on a free key, our candidate key, switchovers

    def _defers(self) -> bool:
        """Leave the free key to a candidate of higher priority, or to its healthy former
        holder, for a bounded time (the watch wakes us the moment it takes the key)."""
        deferral = self.cluster.defer_to()
        if deferral is None:
            return False
        until, why = deferral
        self.key.stop_retrying()
        self.agenda.act_at = until
        self.reporter.defers(why, until - self.clock())
        return True

    def _write_record(self) -> None:
        self.cluster.write_record(self.lease.session, self.agenda.record_role(), self.lease.node)
        self._expect_handover()

    def _expect_handover(self) -> None:
        """The target of a switchover, once it said it is ready: read the key every READY_READ
        until the request is gone, so that it says it leads the moment the lock is moved to it
        (its watch may hang or back off: the key would be its own, unclaimed, meanwhile)."""
        if self.role != Role.LEADER and self.agenda.read_at is None and self.cluster.awaiting_handover():
            self.agenda.read_at = self.clock() + READY_READ

    def _preempt(self) -> None:
        if self.key.state is not None:
            self.cluster.preempt(self.key.state)

    def _review_request(self) -> None:
        """The request's time is up: the switchover says whether to read the key first."""
        review = self.switchover.review()
        if review is Review.READ_KEY:
            self._read_key()  # _act decides on the key as read
        elif review is Review.DECIDE:
            self._switchover()

    def _switchover(self) -> None:
        """A switchover asked of us (SPEC §11.3): standby first (hook ``standby`` before the key
        leaves us), then the lock moves in one transaction to the target's session."""
        handover = self.switchover.decide()
        if handover is None:
            return
        self.reporter.hands_over(handover.target.name, handover.request.by)
        self.reporter.finish_hooks(min(HANDOVER_HOOK_WAIT, self.settings.hook_timeout))
        self.agenda.read_at = self.clock()  # whatever happens next, the key says where it is
        self._moved(self.switchover.move(self.lease.session, handover))

    def _moved(self, moved: Moved) -> None:
        """A move answered or settled: the target holds the key, or it stayed ours (then leading
        on is no new leadership), or neither, or the key read next settles it."""
        if isinstance(moved, HandedOver):
            self.reporter.handed_over(moved.target)  # said first: the request's delete may hang
            self.switchover.done(moved)
        self.kept = isinstance(moved, Kept)

    def _follow(self, holder: KeyState) -> None:
        self.kept = False
        self.key.stop_retrying()
        self.reporter.follows(holder)

