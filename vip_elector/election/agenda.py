"""What the election loop must do, and when it must wake (SPEC §4, §9.2, §9.3, §11).

The loop's steps make others due instead of calling them (a read after an
acquire, an act after a replacement, a retry after Consul trouble): they
write the time here, on the loop's clock. The parts keep their own times
(the lease its renewal, the key its acquire retry, the cluster its candidate
key, request and preemption, the withdrawal its next attempt); the agenda
reads theirs beside its own and answers the two questions the loop asks:
which step is due now (``due``, in the order of SPEC §4), and when it must be
awake next (``wake_at``: a leader's claim window and the watchdog's ping
bound the sleep). It decides nothing and calls nothing but the parts' reads.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional

from ..systemd import Notifier
from .cluster import Cluster
from .key import TriggerKey
from .lease import Lease
from .role import Reporter, Role
from .withdrawal import Withdrawal


class Step(enum.Enum):
    """A step of the loop; when several are due, the first in this order is done first."""

    WITHDRAW = "withdraw"              # the VIP's fault: give the session up (nothing else meanwhile)
    START = "start"                    # no session: reach Consul, resume or get one
    RENEW = "renew"                    # the session's renewal (§4.3)
    SETTLE_STRAY = "settle stray"      # a refused reload's move of the lock went unanswered
    READ_KEY = "read key"              # read the key, then act on it
    ACT = "act"                        # act on the key as last seen
    ACQUIRE = "acquire"                # the key's acquire, again (lock-delay)
    WRITE_RECORD = "write record"      # our candidate key (§11.1)
    REVIEW_REQUEST = "review request"  # a switchover request's time is up (as leader)
    PREEMPT = "preempt"                # ask the leader for the key (as follower, --preempt-delay)


class Agenda:
    """The loop's due times, and the one rule that orders them with the parts'."""

    def __init__(self, lease: Lease, key: TriggerKey, cluster: Cluster, withdrawal: Withdrawal,
                 reporter: Reporter, notifier: Notifier, clock: Callable[[], float]):
        self.lease, self.key, self.cluster, self.withdrawal = lease, key, cluster, withdrawal
        self.reporter, self.notifier, self.clock = reporter, notifier, clock
        self.retry_at = float("-inf")            # no session: the next attempt to get one
        self.read_at: Optional[float] = None     # read the key again, then act on it
        self.act_at: Optional[float] = None      # act on the key as last seen
        self.paused_until = float("-inf")        # after an internal error, nothing is due before this
        self.stray_at = float("-inf")            # settle the lease's stray session (a refused reload's)

    def leading(self) -> bool:
        """The session holds the key, or claims (or claimed) it: a leader's cadence."""
        return self.key.held_by(self.lease.session) or self.reporter.role in (Role.LEADER, Role.CUT_OFF)

    def record_role(self) -> str:
        """The role our candidate key names."""
        return "leader" if self.reporter.role == Role.LEADER else "standby"

    def wake_at(self) -> float:
        """The one place that knows when the loop must be awake next."""
        now = self.clock()
        due = [self.retry_at if self.lease.session is None else self.lease.renew_due(self.leading())]
        if self.withdrawal.active:
            due = [self.withdrawal.at]
        due += [t for t in (self.read_at, self.act_at, self.key.retry_at) if t is not None]
        if self.lease.stray is not None:
            due.append(self.stray_at)
        due += [t for t in self._cluster_due() if t is not None]
        wake = max(min(due), self.paused_until)
        until = self.lease.claim_until
        if self.reporter.role == Role.LEADER and until is not None:
            wake = min(wake, until)
        ping = self.notifier.next_ping()
        if ping is not None:
            wake = min(wake, ping)
        return max(now, wake)

    def due(self, now: float) -> Optional[Step]:
        """The step due now, if any, in the order of SPEC §4: session, renewal, key, acquire."""
        if now < self.paused_until:
            return None
        if self.withdrawal.active:
            return Step.WITHDRAW if now >= self.withdrawal.at else None
        if self.lease.session is None:
            return Step.START if now >= self.retry_at else None
        if now >= self.lease.renew_due(self.leading()):
            return Step.RENEW
        if self.lease.stray is not None and now >= self.stray_at:
            return Step.SETTLE_STRAY
        if self.read_at is not None and now >= self.read_at:
            return Step.READ_KEY
        if self.act_at is not None and now >= self.act_at:
            return Step.ACT
        if self.key.retry_at is not None and now >= self.key.retry_at:
            return Step.ACQUIRE
        record, stale, preempt = self._cluster_due()
        if record is not None and now >= record:
            return Step.WRITE_RECORD
        if stale is not None and now >= stale:
            return Step.REVIEW_REQUEST
        if preempt is not None and now >= preempt:
            return Step.PREEMPT
        return None

    def _cluster_due(self) -> tuple[Optional[float], Optional[float], Optional[float]]:
        """SPEC §11, never before the election's own steps: our candidate key, a stale
        switchover request (the leader drops it), a preemption (a follower asks)."""
        if self.lease.session is None or self.lease.failing is not None:
            return None, None, None
        role = self.reporter.role
        record = self.cluster.record_due(self.lease.session, self.record_role())
        stale = self.cluster.request_due() if role == Role.LEADER else None
        preempt = (self.cluster.preempt_due(self.key.state, self.lease.session)
                   if role == Role.FOLLOWER else None)
        return record, stale, preempt


__all__ = ["Agenda", "Step"]
