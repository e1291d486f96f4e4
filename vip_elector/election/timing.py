"""The loop's clocks, and the rules between them, checked where they are built."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

#: SPEC §4.5: a planned stop ends the daemon within this many seconds.
STOP_PROMISE = 5.0
#: SPEC §4.7: a node waiting for its check looks again at least this often.
HEALTH_POLL_PROMISE = 2.0
#: The shipped units' ``WatchdogSec=`` (systemd/vip-elector.service).
SHIPPED_WATCHDOG_SEC = 30.0
#: serfHealth turns critical no sooner than this after a node is cut off
#: (memberlist's suspicion timeout alone is 4 s): the claim margin must end first.
SERF_DETECTION = 4.0


@dataclass(frozen=True)
class Timing:
    """The loop's clocks, in seconds; tests may shorten them (the rules below still hold)."""

    backoff_min: float = 1.0        # Consul errors: jittered exponential backoff
    backoff_max: float = 30.0
    health_poll: float = 1.0        # waiting for a check to pass (§4.7: at least every 2 s)
    lock_delay_retry: float = 0.05  # an acquire refused by lock-delay is retried this often
    watch_wait: float = 60.0        # blocking-query wait: few requests while nothing happens
    renew_retry: float = 1.0        # a failed renewal is tried again this often (§8.7)
    leader_renew: float = 1.5       # a leader confirms at most this far apart (and 3 times a claim window)
    claim_margin: float = 3.0       # claim window = min(TTL, lock-delay + this); see Lease.claim_window
    turn_budget: float = 6.0        # all requests of one step (a turn has two): inside WatchdogSec/2
    stop_budget: float = 4.5        # signal to exit, whatever is in flight (§4.5: 5 s)
    release_reserve: float = 1.7    # of the stop budget, kept for the CAS delete and the destroy
    shutdown_timeout: float = 0.8   # per request on the way out
    reload_hook_wait: float = 5.0   # a reload lets a running hook finish for this long
    doubt_latency: float = 2.0      # a renewal this slow (Consul in trouble) replaces the session
    raft_poll: float = 5.0          # a leader reads the raft leader this often (with a renewal): a change replaces the session
    raft_poll_follower: float = 30.0  # a follower: before most of a woken server's retries, at 2 requests a minute

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value >= 0 or f.name in _NEVER_ZERO and not value > 0:
                raise ValueError(f"inconsistent Timing: {f.name} {value!r} must be positive "
                                 f"(a zero would make the loop spin)")
        _require(self.backoff_min <= self.backoff_max, "backoff_min must not exceed backoff_max")
        _require(self.health_poll <= HEALTH_POLL_PROMISE,
                 f"health_poll {self.health_poll}s: a waiting node looks at its check at least "
                 f"every {HEALTH_POLL_PROMISE:g}s (SPEC §4.7)")
        _require(self.release_reserve < self.stop_budget < STOP_PROMISE,
                 f"release_reserve {self.release_reserve}s < stop_budget {self.stop_budget}s < "
                 f"{STOP_PROMISE:g}s: the release must fit inside the stop, the stop inside SPEC §4.5's promise")
        _require(2 * self.shutdown_timeout <= self.release_reserve,
                 f"release_reserve {self.release_reserve}s must hold the CAS delete and the destroy "
                 f"({self.shutdown_timeout}s each)")
        _require(2 * self.turn_budget <= SHIPPED_WATCHDOG_SEC / 2,
                 f"turn_budget {self.turn_budget}s: a turn's two steps must end within half the "
                 f"shipped WatchdogSec ({SHIPPED_WATCHDOG_SEC:g}s, SPEC §9.2)")
        _require(self.claim_margin < SERF_DETECTION,
                 f"claim_margin {self.claim_margin}s: the claim must end before serfHealth can "
                 f"turn critical ({SERF_DETECTION:g}s, SPEC §9.3)")
        _require(self.raft_poll <= self.raft_poll_follower,
                 "raft_poll: a leader reads the raft leader at least as often as a follower")

    def claim_window(self, ttl: float, lock_delay: float) -> float:
        """How long after Consul last confirmed the session we may still claim the key.

        Another node can hold the key only after Consul has invalidated our
        session and lock-delay has passed. Invalidation needs either the TTL
        to run out (counted from a renewal Consul received no earlier than we
        sent it) or serfHealth to turn critical, which gossip takes more than
        4 s to decide after a node is cut off. So the window ends at
        lock-delay + ``claim_margin``, or the TTL if that is shorter: before
        anyone else can have the key.
        """
        return min(ttl, lock_delay + self.claim_margin)

    def renew_interval(self, ttl: float, lock_delay: float, leading: bool) -> float:
        """A follower renews before half the TTL has passed (§4.3); a leader (or a session
        holding the key) confirms at least three times per claim window, so that one slow
        answer does not end its claim (§9.3)."""
        half = ttl / 2
        follower = max(half / 2, half - 1.0)
        if not leading:
            return follower
        return min(follower, self.leader_renew, self.claim_window(ttl, lock_delay) / 3)


_NEVER_ZERO = frozenset({"backoff_min", "health_poll", "lock_delay_retry", "renew_retry",
                         "leader_renew", "watch_wait", "turn_budget", "stop_budget"})


def _require(ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"inconsistent Timing: {rule}")


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
