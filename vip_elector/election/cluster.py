"""The daemon's part of cluster operations (SPEC §11): its candidate key, priorities,
stickiness, and a switchover asked of the leader.

Costs, by design:

* The watcher's one blocking query covers the trigger-key *and* everything
  under ``<trigger-key>/`` (one recursive read), so every elector knows the
  candidates and any switchover request the moment the key changes, with no
  request of its own. A follower's idle load is what it was (renewals, the
  raft-leader read, one blocking query a minute).
* The candidate key is written once per session, and again when the role
  changes between leader and standby: never on a hot path. It is acquired
  with the session (behaviour delete), so a crash's TTL or a failed check
  removes it. A planned stop deletes it itself, after the key's release and
  before the session's destroy (one request off the handover's path): the
  destroy would leave it under lock-delay, and the next run could not write
  its own for that long.
* A free key: the highest priority present acquires at once (no request is
  added before the acquire); the others defer to it for at most
  ``DEFER_LIMIT``. The holder whose key was deleted (a planned stop) is never
  waited for: it is leaving.
* Stickiness: when the key was freed by Consul (the holder did not ask: an
  acquire is refused by lock-delay, which a release never causes), the
  others look once, halfway through the lock-delay, at the holder's node in
  the catalog (one read of ``/v1/health/node``, the node and checks its
  candidate key named). Still failing (its check is critical, it is cut off)
  they take the key the moment the lock-delay ends: a real failover costs
  nothing. Passing again — a ~50 ms "failed" verdict from stale gossip after
  a partition heals, refuted at once — or not readable, they wait
  ``STICKY_GRACE`` past the lock-delay for the holder's name to come back as
  a live candidate (a new session: a live elector makes one within
  milliseconds), then defer to it for at most lock-delay + ``DEFER_LIMIT``
  after the key was freed, and it takes the key back. A holder whose node
  passes but that does not come back (killed: its TTL ran out) costs
  ``STICKY_GRACE`` on that failover.
* Preemption (``--preempt-delay``) only asks, through the switchover request
  the leader carries out; a session whose checks fail ends (and with it the
  time its checks have passed), so a flapping favourite never qualifies.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from .. import __version__
from ..cluster import DEFER_LIMIT, REQUEST_GRACE_SECONDS, Candidate, Request, Tree, wall
from ..config import Settings
from ..consul import ConsulClient, ConsulError, KeyState, PermissionDenied

log = logging.getLogger("vip_elector")

#: Consul freed the key (lock-delay) and the holder's node passes (or could not be read): how long past
#: the lock-delay the others wait for the holder to come back with a new session before they
#: take the key. A loaded machine needs a few hundred milliseconds to notice, make a session
#: and write its candidate key.
STICKY_GRACE = 0.5
#: When, as a share of the lock-delay after the key was freed, the others read the former
#: holder's node: a stale "failed" verdict is refuted within ~50 ms, a real failure stays, and
#: the acquires are refused until the lock-delay ends anyway.
HEALTH_LOOK = 0.5
#: After a refused or failed switchover, the same preemption is not asked again before this.
PREEMPT_RETRY = 10.0
REQUEST_GRACE = REQUEST_GRACE_SECONDS
#: After a candidate-key write failed, the next attempt (it is never urgent)...
RECORD_RETRY = 5.0
#: ...unless it says we are ready for a switchover: the leader waits for it (answer_limit).
RECORD_READY_RETRY = 0.25
#: A candidate-key write gets this long: one that hangs must not hold the loop (its
#: renewals) for a whole request timeout, nor let a switchover's answer limit pass.
RECORD_WRITE_LIMIT = 2.0
#: The same, when the token may not write it (a token made from an older example policy).
RECORD_DENIED_RETRY = 600.0
#: A target that said it is ready reads the key this often until the request is gone: a watch
#: that hangs (or backs off) must not leave it unaware that it holds the key.
READY_READ = 0.5
#: A hook's ``standby`` call gets at most this long to finish before the lock moves.
HANDOVER_HOOK_WAIT = 3.0


class Cluster:
    """Candidacy, deferral, preemption and switchover requests, for the loop to ask."""

    def __init__(self, consul: ConsulClient, settings: Settings, clock: Callable[[], float]):
        self.consul, self.settings, self.clock = consul, settings, clock
        self.tree = Tree()
        # The candidate key: what we wrote, with which session and role.
        self.written: Optional[tuple[str, str, int]] = None   # (session, role, ready)
        self.record_retry_at = float("-inf")
        self._record_trouble: Optional[str] = None
        self._node: tuple[str, str] = ("", "")              # (session, its node), learnt once
        self.role_since = wall()
        self._role = "standby"
        self.session_since: Optional[float] = None       # loop clock: our session began (checks passing)
        self.up_since_wall: float = wall()
        # The key's last holder, and how it was freed.
        self.holder: Optional[KeyState] = None           # the key as last seen held
        self.holder_name: Optional[str] = None
        self.holder_left = False                         # its candidate key was still there when the key went
        self.free_at: Optional[float] = None             # loop clock: first seen free
        self.refused = False                             # an acquire on this free key met lock-delay
        self.holder_record: Optional[Candidate] = None   # the holder's candidate key, while it held
        self.holder_health: Optional[str] = None         # "passing" | "failing" | "unknown", once read
        # Every candidate's last record by name: a watch answer taken just as the key moved may
        # lack the new holder's (seen in the lab), and its node and checks rarely change.
        self._known: dict[str, Candidate] = {}
        # Switchover requests (as leader) and preemption (as follower).
        self._seen_requests: dict[int, float] = {}       # ModifyIndex -> loop clock first seen
        self._handled: set[int] = set()
        self._dropped: set[int] = set()
        self.preempt_after = float("-inf")

    # ------------------------------------------------------------------ what we know

    def observe(self, entries: Optional[list], key: Optional[KeyState]) -> None:
        """A read or watch answer: the tree under the key, and the key itself."""
        if entries is not None:
            self.tree = Tree.build(self.settings.trigger_key, entries, self.settings.value)
            self._known.update(self.tree.candidates)
        if key is not None and key.session:
            if self.holder is None or key.session != self.holder.session:
                self.holder_name, self.holder_record = key.value, None
            record = self.tree.by_session(key.session)
            if record is not None:
                self.holder_record = record  # kept after the key is freed: its node and checks
            self.holder, self.free_at, self.refused, self.holder_left = key, None, False, False
            self.holder_health = None
        elif self.free_at is None:
            self.free_at = self.clock()
            if self.holder is not None:  # its candidate key still there: it deleted the key itself
                self.holder_left = self.tree.by_session(self.holder.session) is not None

    def session_began(self, session: str, resumed: bool) -> None:
        """A new (or resumed) session of ours: from now on its checks have passed."""
        now = self.clock()
        if resumed and self.tree.own is not None and self.tree.own.session == session:
            mine = Candidate.from_entry(self.tree.own, self.settings.trigger_key)
            if mine is not None and mine.up_since:
                self.up_since_wall = mine.up_since
                self.session_since = now - max(0.0, wall() - mine.up_since)
                return  # written again once (a reload may have changed the priority)
        self.session_since = now
        self.up_since_wall = wall()

    def session_lost(self) -> None:
        self.session_since = None
        self.written = None

    # ------------------------------------------------------------------ §11.1: our candidate key

    def record_due(self, session: Optional[str], role: str) -> Optional[float]:
        """When our candidate key must be (re)written, or None while it says what is so."""
        if session is None or self.written == (session, role, self._ready_for()):
            return None
        return self.record_retry_at

    def awaiting_handover(self) -> bool:
        """Our candidate key told the leader we are ready for its request, which is still
        there: the key may become ours any moment (the loop looks, not only the watch)."""
        return self.written is not None and self.written[2] != 0 and self._ready_for() == self.written[2]

    def _ready_for(self) -> int:
        """A switchover request naming us: our candidate key says we are ready for it, which
        proves to the leader that our loop runs (a frozen target would never claim the key)."""
        req = self.tree.request
        if req is None or req.error or req.target != self.settings.value:
            return 0
        return req.modify_index

    def write_record(self, session: str, role: str, node: Optional[str]) -> None:
        """Acquire our candidate key with our session; trouble is logged once and retried later
        (the election never waits for it)."""
        if role != self._role:
            self._role, self.role_since = role, wall()
        if not node:  # a token without agent:read: the session knows its node (once per session)
            node = self._node_of(session)
        s = self.settings
        ready = self._ready_for()
        record = Candidate(name=s.value, node=node or "", priority=s.priority, role=role,
                           since=self.role_since, up_since=self.up_since_wall,
                           checks={c: "passing" for c in s.checks}, pid=os.getpid(), version=__version__,
                           ready=ready)
        left = self.consul.time_left()
        try:
            with self.consul.time_limit(RECORD_WRITE_LIMIT if left is None else min(left, RECORD_WRITE_LIMIT)):
                written = self.consul.put_candidate(session, record.to_json())
        except ConsulError as e:
            # A token of the policy before issue 16 (no key_prefix on <trigger-key>/): it will
            # not change until a reload, so ask seldom (the election itself is unaffected).
            denied = isinstance(e, PermissionDenied)
            self.record_retry_at = self.clock() + (RECORD_DENIED_RETRY if denied else
                                                   RECORD_READY_RETRY if ready else RECORD_RETRY)
            reason = str(e)
            if reason != self._record_trouble:
                hint = (f" (give the token key_prefix \"{s.trigger_key}/\" write: see "
                        "examples/consul-acl-policy.hcl)" if isinstance(e, PermissionDenied) else "")
                log.warning("cannot write this node's candidate key under %s/candidates/: %s%s; "
                            "'vip-elector list' will not show it, and a switchover cannot choose it",
                            s.trigger_key, e, hint)
            self._record_trouble = reason
            return
        if not written:  # our replaced session still holds it for a moment, or a namesake does
            self.record_retry_at = self.clock() + 0.2
            return
        if self._record_trouble is not None:
            log.info("candidate key %s/candidates/%s written", s.trigger_key, s.value)
        self._record_trouble = None
        self.written = (session, role, ready)
        self.record_retry_at = float("-inf")

    def withdraw_record(self, session: Optional[str]) -> None:
        """A planned stop, before the session is destroyed: delete our candidate key. The
        destroy would delete it too, but under the lock-delay, so the next run (a restart, an
        upgrade) could not write its own for a lock-delay: a node nobody sees as a candidate,
        whose node the others do not know if it leads and fails then (§11.4)."""
        own = self.tree.own
        if session is None or own is None or own.session != session:
            return
        try:
            self.consul.delete_candidate(own.modify_index)
        except ConsulError as e:
            log.debug("candidate key not deleted before the session (%s): it goes with it", e)

    def _node_of(self, session: str) -> str:
        if self._node[0] != session:
            try:
                info = self.consul.session_info(session)
            except ConsulError:
                return ""
            self._node = (session, info.node if info else "")
        return self._node[1]

    # ------------------------------------------------------------------ §11.4: a free key

    def refused_by_lock_delay(self) -> None:
        """Our acquire met lock-delay: Consul freed the key (the holder did not release it)."""
        self.refused = True

    def defer_to(self) -> Optional[tuple[float, str]]:
        """(until, why) while this node should leave the free key to another, else None."""
        if self.free_at is None:
            return None
        me, mine = self.settings.value, self.settings.priority
        others = {n: c for n, c in self.tree.candidates.items() if n != me}
        sticky = self.holder_name
        if self.refused and sticky and sticky != me:
            sticking = self._stick_to(sticky, sticky in others)
            if sticking is not None:
                return sticking
        if self.holder_name == me:
            return None  # the key was ours: nobody outranks its holder on a free key
        leaving = self.holder.session if self.holder is not None and self.holder_left else None
        higher = sorted((c for c in others.values() if c.priority > mine and c.session != leaving),
                        key=lambda c: -c.priority)
        until = self.free_at + DEFER_LIMIT + (self.settings.lock_delay if self.refused else 0.0)
        if higher and self.clock() < until:
            top = higher[0]
            return until, f"{top.name} has priority {top.priority} (ours is {mine})"
        return None

    def _stick_to(self, sticky: str, back: bool) -> Optional[tuple[float, str]]:
        """Consul freed the key: defer to its holder if its node and checks pass again."""
        delay, now = self.settings.lock_delay, self.clock()
        if back:
            until = self.free_at + delay + DEFER_LIMIT
            return (until, f"{sticky} held it until Consul freed it and is healthy again") if now < until else None
        look_at = self.free_at + delay * HEALTH_LOOK
        if self.holder_health is None:
            if now < look_at:  # acquires are refused by lock-delay until then anyway
                return look_at, f"{sticky} held it until Consul freed it: looking at its node soon"
            self.holder_health = self._holder_health()
        if self.holder_health == "failing":
            return None  # a real failure: take the key the moment the lock-delay ends
        # Its node passes (or could not be read) but its elector has no session yet: a live one
        # makes one within milliseconds of losing the old, a killed one (its TTL ran out) never.
        until = self.free_at + delay + STICKY_GRACE
        why = (f"{sticky} held it until Consul freed it, and its node and checks pass again: waiting "
               f"{STICKY_GRACE:g}s past the lock-delay for it to come back"
               if self.holder_health == "passing" else
               f"{sticky} held it until Consul freed it: waiting {STICKY_GRACE:g}s past "
               "the lock-delay for it to come back")
        return (until, why) if now < until else None

    def _holder_health(self) -> str:
        """The former holder's node and the checks its session was bound to, from the catalog."""
        record = self.holder_record or self._known.get(self.holder_name or "")
        if record is None or not record.node:
            log.info("cannot tell whether %s recovers: its candidate key (with its node) was never "
                     "seen", self.holder_name)
            return "unknown"
        try:
            checks = self.consul.catalog_checks(record.node)
        except ConsulError as e:
            log.info("cannot read node %s's checks to see whether %s recovers: %s",
                     record.node, record.name, e)
            return "unknown"
        if not checks:
            return "unknown"  # a token without node:read on it sees nothing, not even serfHealth
        wanted = set(record.checks) | {"serfHealth"}
        failing = sorted(c for c in wanted if checks.get(c) != "passing")
        if failing:
            log.info("%s lost the key %s: on node %s, %s; taking over once the lock-delay ends",
                     record.name, self.settings.trigger_key, record.node,
                     ", ".join(f"check {c} is {checks.get(c) or 'missing'}" for c in failing))
            return "failing"
        log.info("%s lost the key %s although node %s and its checks pass again (a stale "
                 "'failed' verdict): leaving the key to it", record.name, self.settings.trigger_key,
                 record.node)
        return "passing"

    # ------------------------------------------------------------------ §11.3: as leader

    def pending_request(self) -> Optional[Request]:
        """A switchover request not handled yet (the leader acts on it once)."""
        req = self.tree.request
        if req is None:
            return None
        self._seen_requests.setdefault(req.modify_index, self.clock())
        if req.modify_index in self._handled or req.error:
            return None
        return req

    def request_expired(self, req: Request) -> bool:
        seen = self._seen_requests.get(req.modify_index, self.clock())
        return self.clock() - seen > max(0.0, req.timeout) + REQUEST_GRACE

    def handled(self, req: Request) -> None:
        self._handled.add(req.modify_index)

    def dropped(self, req: Request) -> None:
        self._handled.add(req.modify_index)
        self._dropped.add(req.modify_index)

    def request_due(self) -> Optional[float]:
        """When the leader must look at the request again: the target's answer is overdue,
        or the request is stale (its author gave up long ago)."""
        req = self.tree.request
        if req is None or req.modify_index in self._dropped:
            return None
        seen = self._seen_requests.setdefault(req.modify_index, self.clock())
        stale = seen + max(0.0, req.timeout) + REQUEST_GRACE
        if req.modify_index in self._handled or req.error:
            return stale
        return min(stale, seen + self.answer_limit(req))

    @staticmethod
    def answer_limit(req: Request) -> float:
        """How long the target has to say it is ready (its candidate key) before the leader refuses."""
        return max(0.5, min(5.0, req.timeout / 2))

    def target_ready(self, req: Request, target: Candidate) -> Optional[bool]:
        """True: the target said it is ready; None: not yet; False: too late."""
        if target.ready == req.modify_index:
            return True
        seen = self._seen_requests.setdefault(req.modify_index, self.clock())
        return None if self.clock() - seen < self.answer_limit(req) else False

    def check_target(self, req: Request) -> tuple[Optional[Candidate], str]:
        """The live candidate a request names, or None and why it cannot be."""
        names = ", ".join(sorted(self.tree.candidates)) or "none"
        if not req.target:
            return None, "the request names no target"
        target = self.tree.candidates.get(req.target)
        if target is None:
            return None, f"{req.target} is not a live candidate (candidates: {names})"
        if target.session == (self.holder.session if self.holder else None):
            return None, f"{req.target} already holds the key"
        return target, ""

    # ------------------------------------------------------------------ §11.4: preemption

    def preempt_due(self, key: Optional[KeyState], session: Optional[str]) -> Optional[float]:
        """When this follower may ask for the key (``--preempt-delay``), or None: never now."""
        delay = self.settings.preempt_delay
        if delay is None or session is None or self.session_since is None:
            return None
        if key is None or not key.session or key.session == session or self.tree.request is not None:
            return None
        holder = self.tree.by_session(key.session)
        if holder is None or holder.priority >= self.settings.priority:
            return None  # never on equal priority; a holder we do not know is left alone
        if self.written is None or self.written[0] != session:
            return None  # the leader checks our candidate key: it must be there first
        if self.tree.own is None or self.tree.own.session != session:
            return None  # gone with our session (a check failed): the streak of passing ended
        return max(self.session_since + delay, self.preempt_after)

    def preempt(self, key: KeyState) -> None:
        """Ask the leader for the key (one request, cas=0: never over another request)."""
        holder = self.tree.by_session(key.session)
        self.preempt_after = self.clock() + max(PREEMPT_RETRY, self.settings.preempt_delay or 0.0)
        if holder is None:
            return
        s = self.settings
        req = Request(target=s.value, source=holder.name, timeout=10.0, requested=wall(),
                      by=f"preemption by {s.value} (priority {s.priority} > {holder.priority}, "
                         f"checks passing for {self.clock() - (self.session_since or self.clock()):.0f}s)")
        try:
            asked = self.consul.put_request(req.to_json(), cas=0)
        except ConsulError as e:
            log.warning("cannot ask %s for %s (preemption): %s; trying again in %.0fs", holder.name,
                        s.trigger_key, e, self.preempt_after - self.clock())
            return
        if asked:
            log.info("preempting: priority %d outranks %s's %d and our checks have passed for %s: "
                     "asked for a switchover to this node", s.priority, holder.name, holder.priority,
                     f"{s.preempt_delay:g}s")


__all__ = ["Cluster", "HANDOVER_HOOK_WAIT", "READY_READ"]
