"""The session lease (SPEC §4.1, §4.3, §8.7, §9.3, §9.4).

One session bound to this node's health, and what we know of it: when
Consul last confirmed it (``confirmed_at``, the one timestamp the claim
window of §9.3 is counted from), whether renewals fail, and whether Consul's
trouble makes it one to replace.

A session that outlived Consul trouble is replaced in place. A Consul server
that found the session expired while it could not commit (a quorum loss, a
frozen raft leader) keeps retrying the destroy for minutes (10, 30, 70, 150,
310 s later) without looking at the session again, and applies it if it leads
at that moment: the key is deleted out of the blue, any time, even while the
leader node is cut off and cannot learn it — another node then holds the key
one lock-delay later, sooner than our claim window allows. So once Consul
confirms a session again after failed or slow renewals (or a gap of a TTL),
or after the raft leader changed, the lease makes a new session and moves the
lock to it in one transaction (the key's value never changes: vip-manager
does not move the VIP), then destroys the old one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Union

from ..config import ConfigError, Settings
from ..consul import CheckNotPassing, ConsulClient, ConsulError, InvalidSession, KeyState
from ..state import SavedSession, StateStore
from .timing import Timing

log = logging.getLogger("vip_elector")


# What creating a session answers -------------------------------------------

@dataclass(frozen=True)
class Created:
    session: str
    sent: float                  # when the create went out: Consul confirmed it then


@dataclass(frozen=True)
class Unhealthy:
    """No session: a bound check is critical, or not registered (SPEC §4.7)."""

    check_id: str
    state: Optional[str]         # None: not registered
    output: str = ""             # what the check last said (its script's or probe's words)


# What a renewal answers -----------------------------------------------------

@dataclass(frozen=True)
class Confirmed:
    recovered: bool              # after failed renewals, or a claim that had ended
    replace: bool                # in doubt (Consul had trouble): replace it in place now


@dataclass(frozen=True)
class Failing:
    reason: str                  # the session may live: keep trying at the renewal cadence (§8.7)


@dataclass(frozen=True)
class Gone:
    reason: str                  # Consul no longer has it


Renewal = Union[Confirmed, Failing, Gone]


# What a replacement answers -------------------------------------------------

@dataclass(frozen=True)
class Replaced:
    index: int                   # the key as read after the move
    key: Optional[KeyState]


@dataclass(frozen=True)
class NotReplaced:
    """Not this time: the old session stays ours, the doubt stays, the next good renewal retries."""


class MoveFailed(ConsulError):
    """The move of the lock failed or went unanswered, and the key read after it shows it
    still held by the old session: nothing changed."""


class Lease:
    """The session: create, renew, replace in place, destroy; and the claim window's rule."""

    def __init__(self, consul: ConsulClient, settings: Settings, timing: Timing,
                 clock: Callable[[], float], store: StateStore,
                 on_session: Callable[[Optional[str]], None]):
        self.consul, self.settings, self.timing, self.clock = consul, settings, timing, clock
        self.store, self.on_session = store, on_session
        self.session: Optional[str] = None
        self.node: Optional[str] = None          # the session's node, when known
        self.confirmed_at: Optional[float] = None  # send time of the last request Consul confirmed the session by
        self.failing: Optional[str] = None       # why the last renewal failed
        self.doubt: Optional[str] = None         # why the session is to be replaced (Consul trouble)
        self.replacement: Optional[str] = None   # the session replacing it, made but not yet ours
        self.stray: Optional[str] = None         # a refused reload's session the lock may have moved to
        self._failed_at = 0.0
        self._renew_now = False
        self._doubts = Doubts(consul, settings, timing)
        self._warned_unseen = False

    # ------------------------------------------------------------------ §9.3: the claim window

    @property
    def claim_window(self) -> float:
        return self.timing.claim_window(self.settings.ttl, self.settings.lock_delay)

    @property
    def claim_until(self) -> Optional[float]:
        """The end of the claim Consul's last confirmation allows, or None without one."""
        if self.confirmed_at is None or self.session is None:
            return None
        return self.confirmed_at + self.claim_window

    def renew_interval(self, leading: bool) -> float:
        return self.timing.renew_interval(self.settings.ttl, self.settings.lock_delay, leading)

    def confirmed_now(self, leading: bool) -> bool:
        """Confirmed recently enough to claim the key until the next renewal is due."""
        until = self.claim_until
        return until is not None and self.clock() < until - self.renew_interval(leading)

    def renew_due(self, leading: bool) -> float:
        """When the next renewal is due: at the cadence of §4.3, after a failure at
        ``renew_retry`` (§8.7, not the backoff of §4.8), or now when asked."""
        if self._renew_now:
            return float("-inf")
        interval = self.renew_interval(leading)
        if self.failing is not None:
            return self._failed_at + min(self.timing.renew_retry, interval)
        return (self.confirmed_at or 0.0) + interval

    def renew_now(self) -> None:
        self._renew_now = True

    # ------------------------------------------------------------------ §4.1, §4.7

    def create(self) -> Union[Created, Unhealthy]:
        """A session bound to serfHealth and --check-id, unless a check is not passing."""
        own = list(self.settings.check_ids)
        details = self.consul.check_details(own)
        states = {cid: status for cid, (status, _) in details.items()}
        critical = [(cid, st, out) for cid, (st, out) in details.items() if st == "critical"]
        if critical:
            return Unhealthy(*critical[-1])
        # A check the agent does not list may be one this token cannot see (no
        # node:read): Consul itself decides, refusing the session when the
        # check is really missing ("Missing check … registration").
        unseen = [cid for cid, st in states.items() if st is None]
        sent = self.clock()
        try:
            session = self.consul.create_session(self.settings.checks)
        except CheckNotPassing as e:  # serfHealth, or the catalog has not caught up yet
            log.debug("session refused: %s", e)
            return Unhealthy(e.check_id or self.settings.checks[-1], e.state)
        if unseen and not self._warned_unseen:
            log.warning("check %s is not visible to the %s, but Consul accepts it: give the token "
                        "node:read (and service:read for a service check) so the status can say "
                        "when it fails (see examples/consul-acl-policy.hcl)", ", ".join(unseen),
                        self.settings.token_words)
            self._warned_unseen = True
        return Created(session, sent)

    def adopt(self, session: str, confirmed_at: float, created: bool = False) -> None:
        """Make ``session`` ours (created, resumed or a replacement), and keep it for a restart."""
        if created:
            s = self.settings
            log.info("session %s created (checks %s, ttl %gs, lock-delay %gs)", session,
                     ", ".join(s.checks), s.ttl, s.lock_delay)
        self.session = session
        self.on_session(session)
        self.confirmed_at = confirmed_at
        self.failing = None
        self._renew_now = False
        self.store.save(self.saved())

    def learn_node(self) -> None:
        """The agent's node, from Consul's record of the session it just made.

        A token without agent:read (the least-privilege policy) cannot ask the
        agent its name, but may read its own sessions; the state file keeps the
        node so that a restart can tell this node's session from another's
        (§8.2) instead of comparing it with an unknown.
        """
        try:
            info = self.consul.session_info(self.session)
        except ConsulError as e:
            log.debug("cannot read session %s to learn this node's name: %s", self.session, e)
            return
        if info is not None and info.node:
            self.node = info.node
            self.store.save(self.saved())

    def confirm(self, sent: float) -> None:
        """A request sent at ``sent`` proved the session valid (a won acquire)."""
        self.confirmed_at = sent

    def saved(self) -> Optional[SavedSession]:
        """What a restart needs to resume our session, or None without one."""
        if self.session is None:
            return None
        s = self.settings
        return SavedSession(session=self.session, node=self.node or "", name=s.session_name,
                            key=s.trigger_key, value=s.value, checks=tuple(s.checks),
                            ttl=s.ttl, lock_delay=s.lock_delay)

    # ------------------------------------------------------------------ §4.3, §8.7

    def renew(self, leading: bool, cut_off: bool) -> Renewal:
        """Renew once. ``leading``: it holds (or claims) the key; ``cut_off``: its claim had ended."""
        self._renew_now = False
        sent = self.clock()
        try:
            self.consul.renew_session(self.session)
        except InvalidSession:
            return Gone("Consul no longer has it (a bound check failed, it expired, or "
                        "the agent's node left the cluster)")
        except ConsulError as e:
            # Not the backoff of §4.8: the session may live, keep at it (§8.7).
            reason = str(e)
            if reason != self.failing:
                log.warning("cannot renew session %s: %s; trying again every %gs", self.session,
                            reason, min(self.timing.renew_retry, self.renew_interval(leading)))
            self.failing = reason
            self._failed_at = self.clock()
            return Failing(reason)
        now = self.clock()
        recovered = self.failing is not None or cut_off
        doubt = self._doubts.after_renewal(recovered, self.failing, self.confirmed_at, sent, now, leading)
        self.confirmed_at = sent
        self.failing = None
        self.doubt = self.doubt or doubt
        return Confirmed(recovered, self.doubt is not None)

    # ------------------------------------------------------------------ §9.4: replace in place

    def replace(self) -> Union[Replaced, NotReplaced]:
        """A new session for one Consul had trouble with; the lock moves with it.

        On a Consul error (raised) nothing is lost: the old session stays
        ours, the new one is kept in ``replacement`` and the move is tried
        again after the next good renewal (a move that went unanswered may
        have been applied: the key says).
        """
        old, why = self.session, self.doubt
        if self.replacement is None:
            try:
                self.replacement = self.consul.create_session(self.settings.checks)
            except CheckNotPassing as e:  # the old session is being invalidated too: let that happen
                log.debug("cannot replace session %s yet: %s", old, e)
                return NotReplaced()
        new = self.replacement
        sent = self.clock()
        moved = self._move_lock(old, new)
        if moved is None:
            self.replacement = None
            self._destroy_quietly(new, "the replacement Consul would not give the lock to")
            return NotReplaced()
        index, key = moved
        moved = key is not None and key.session == new
        self.replacement = self.doubt = None
        self._doubts = Doubts(self.consul, self.settings, self.timing)  # a fresh baseline for the new session
        self.adopt(new, sent)
        log.info("session %s replaced by %s: Consul had trouble (%s), and a Consul server may "
                 "still destroy a session it saw expire then%s", old, new, why,
                 f"; {self.settings.trigger_key} moved to the new session, its value unchanged"
                 if moved else "")
        self._destroy_quietly(old, "the replaced session (it holds nothing)")
        return Replaced(index, key)

    def carry_over(self, new: Settings) -> bool:
        """A reload that changes the session's parameters: move the lock to a session made for them.

        Releasing the key would move the VIP for a change of TTL, lock-delay or
        checks; instead the new session is made now, while this program still
        holds the key, and the lock moves to it in one transaction (§9.4): the
        key is never free and its value does not change. Consul refusing the
        new session (a new check not registered, or critical) raises
        ConfigError: the reload is refused and the node keeps its key under the
        configuration it has; a move Consul would not make raises ConsulError.
        With another key, value or Consul, nothing is carried over (False): the
        new program releases and competes afresh (§8.3).
        """
        s = self.settings
        if (new.trigger_key, new.value, new.address, new.token) != (s.trigger_key, s.value, s.address, s.token):
            return False
        if (tuple(new.checks), new.ttl, new.lock_delay) == (tuple(s.checks), s.ttl, s.lock_delay):
            return False
        old = self.session
        # The loop waits meanwhile: confirm the session first, and end within the claim window
        # less a renewal interval, so that a leader's claim cannot lapse however Consul answers
        # (a hung request would otherwise end the claim: a standby hook, then a leader one).
        sent = self.clock()
        self.consul.renew_session(old)
        self.confirmed_at = sent
        with self.consul.time_limit(max(0.5, self.claim_window - self.renew_interval(True))):
            return self._carry_over(old, new)

    def _carry_over(self, old: str, new: Settings) -> bool:
        try:
            fresh = self.consul.create_session(new.checks, ttl=new.ttl, lock_delay=new.lock_delay)
        except CheckNotPassing as e:
            check = e.check_id or new.checks[-1]
            state = "is not registered on the local agent" if e.state is None else f"is {e.state}"
            raise ConfigError(f"the new configuration binds check '{check}', which {state}: "
                              f"register it (or make it pass), or fix --check-id, then reload "
                              f"again") from None
        except ConsulError as e:  # (unanswered, it may exist: not renewed, it ends within 2×TTL)
            raise ConsulError(f"Consul did not create it ({e})") from None
        sent = self.clock()
        try:
            moved = self._move_lock(old, fresh)
        except MoveFailed as e:
            self._destroy_quietly(fresh, "the session made for the new configuration")
            raise ConsulError(f"Consul did not move the lock to it ({e})") from None
        except ConsulError as e:
            # Moved or not, nobody can tell now: both sessions are ours and the key is held by
            # one of them (the move is all or nothing). The loop settles it first (settle_stray).
            self.stray = fresh
            raise ConsulError(f"Consul did not answer the move of the lock to it, nor the read "
                              f"after it ({e})") from None
        if moved is None:
            self._destroy_quietly(fresh, "the session made for the new configuration")
            raise ConsulError("Consul refused to move the lock to it")
        _, key = moved
        self._destroy_quietly(old, "the session of the previous configuration")
        self.settings = new  # what the state handed to the new program describes
        self.adopt(fresh, sent)
        log.info("session %s replaced by %s for the new configuration (checks %s, ttl %gs, "
                 "lock-delay %gs)%s", old, fresh, "+".join(new.checks), new.ttl, new.lock_delay,
                 f"; {new.trigger_key} moved to it in place, its value unchanged"
                 if key is not None and key.session == fresh else "")
        return True

    def _move_lock(self, old: str, new: str) -> Optional[tuple[int, Optional[KeyState]]]:
        """Move the lock from ``old`` to ``new`` if ``old`` holds it: the key as it is then,
        or None when Consul refused (``new`` not valid, or the key changed under us).

        A move that fails or goes unanswered may still have been applied (REFERENCE §8;
        a 500 is no proof either): the key, read after it, tells. Still ``old``'s: MoveFailed.
        The move gets half of what is left of the step's budget, so that a hung one leaves
        time for that read; a read that fails too raises its ConsulError (then nobody knows yet)."""
        index, key = self.consul.read_key()
        if key is None or key.session != old:
            return index, key
        error: Optional[ConsulError] = None
        left = self.consul.time_left()
        try:
            with self.consul.time_limit(self.timing.turn_budget / 3 if left is None else left / 2):
                if not self.consul.move_lock(old, new):
                    return None  # rolled back as a whole: nothing changed
        except ConsulError as e:
            error = e
        index, key = self.consul.read_key()
        if key is not None and key.session == old:
            if error is not None:
                raise MoveFailed(str(error)) from None
            return None
        return index, key

    def settle_stray(self) -> bool:
        """A refused reload's session that the lock may have moved to (its move unanswered):
        move the lock back to ours if it did, then destroy it. True once settled; a Consul
        error (raised) leaves it for the next step. Never free: both moves are one txn each."""
        stray = self.stray
        if stray is None or self.session is None:
            self.stray = None
            return True
        _, key = self.consul.read_key()
        if key is not None and key.session == stray:
            if self._move_lock(stray, self.session) is None:
                return False  # Consul refused (the stray holds it still): try again
            log.info("the refused reload's move of %s had been applied after all: moved back to "
                     "session %s", self.settings.trigger_key, self.session)
        self.stray = None
        self._destroy_quietly(stray, "the session made for the refused reload")
        return True

    def drop_replacement(self) -> None:
        """A replacement made but never taken up (a stop, a reload, the old session gone), and
        a refused reload's session not settled yet (if it holds the key, destroying it frees
        the key: on a stop, that is the release)."""
        if self.replacement is not None:
            self._destroy_quietly(self.replacement, "the replacement session")
            self.replacement = None
        if self.stray is not None:
            self._destroy_quietly(self.stray, "the session made for the refused reload")
            self.stray = None

    # ------------------------------------------------------------------ the end of a session

    def forget(self, why: str) -> None:
        """Consul says the session is gone: nothing of it is kept (a fresh start makes its own)."""
        log.warning("session %s is gone: %s", self.session, why)
        self._clear()

    def forget_quietly(self) -> None:
        """The session was given up on purpose (destroyed by us): nothing of it is kept."""
        self._clear()

    def _clear(self) -> None:
        self.session = None
        self.doubt = None
        self.drop_replacement()
        self.confirmed_at = None
        self.failing = None
        self._renew_now = False
        self.on_session(None)
        self.store.clear()

    def destroy(self) -> None:
        """On a planned stop (the caller gives the time limit)."""
        try:
            self.consul.destroy_session(self.session)
        except ConsulError as e:
            log.warning("could not destroy session %s: %s (Consul will expire it)", self.session, e)

    def _destroy_quietly(self, session: str, what: str) -> None:
        try:
            self.consul.destroy_session(session)
        except ConsulError as e:
            log.warning("could not destroy %s %s: %s (not renewed, Consul ends it within %gs)",
                        what, session, e, 2 * self.settings.ttl)


class Doubts:
    """Consul trouble a session may have been through, though Consul confirms it now.

    Failed or slow renewals, a gap of a TTL, or a change of the servers' raft
    leader (read now and then: a frozen raft leader may go unnoticed otherwise).
    """

    def __init__(self, consul: ConsulClient, settings: Settings, timing: Timing):
        self.consul, self.settings, self.timing = consul, settings, timing
        self._raft_leader: Optional[str] = None  # the servers' raft leader when last read
        self._raft_read_at: Optional[float] = None

    def after_renewal(self, recovered: bool, failing: Optional[str], confirmed_at: Optional[float],
                      sent: float, now: float, leading: bool) -> Optional[str]:
        """Why a server may hold a stray destroy of the session just confirmed (a renewal sent
        at ``sent`` answered at ``now``, after the confirmation at ``confirmed_at``), or None."""
        if recovered:
            return f"renewals failed: {failing or 'no answer in time'}"
        if confirmed_at is not None and now - confirmed_at >= self.settings.ttl:
            return f"not confirmed for {now - confirmed_at:.0f}s"
        if now - sent >= self.timing.doubt_latency:
            return f"a renewal took {now - sent:.1f}s"
        return self._raft_leader_changed(now, leading)

    def _raft_leader_changed(self, now: float, leading: bool) -> Optional[str]:
        """Read the raft leader now and then; a change (since we last read it) is a doubt."""
        every = self.timing.raft_poll if leading else self.timing.raft_poll_follower
        if self._raft_read_at is not None and now - self._raft_read_at < every:
            return None
        self._raft_read_at = now
        try:
            leader = self.consul.raft_leader()
        except ConsulError as e:  # only a precaution: the renewal decides about the session
            log.debug("cannot read the raft leader: %s", e)
            return None
        if not leader:
            return None
        before, self._raft_leader = self._raft_leader, leader
        if before is not None and leader != before:
            return f"the Consul servers' raft leader changed from {before} to {leader}"
        return None
