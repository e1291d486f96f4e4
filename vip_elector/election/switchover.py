"""A switchover asked of the leader (SPEC §11.3): review the request, move the lock, settle it.

The lock moves in one transaction from our session to the target's, with the
target's name as the value: the key is never free, no third node can take it,
and a refused move leaves it ours. This object decides on the request and
carries out the move; what the node *is* meanwhile (a standby before the lock
leaves, LOCK RELEASED once it has) is the loop's to say, from the answers it
gets here. The only writes made here are the move itself and the request's
end: its deletion, or the reason it was refused, for its author to read.

A move Consul did not answer is not a "no" (REFERENCE §8): it is kept as
``moving`` until a read of the key made after it says where the lock is.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional, Union

from ..cluster import Candidate, Request
from ..config import Settings
from ..consul import ConsulClient, ConsulError, KeyState
from .cluster import Cluster

log = logging.getLogger("vip_elector")


class Review(enum.Enum):
    """What the leader does once a request's time is up (its target's answer is overdue)."""

    NOTHING = "nothing"          # no request, or a stale one, dropped
    READ_KEY = "read key"        # the answer may be in a watch answer not had yet: read afresh once
    DECIDE = "decide"            # decide on what we know


@dataclass(frozen=True)
class HandOver:
    """Hand the key to ``target``: the node becomes a standby (hook first), then ``move``."""

    request: Request
    target: Candidate


@dataclass(frozen=True)
class Move:
    """A move Consul did not answer, until a key read since says whether it was applied."""

    request: Request
    session: str                 # the target's
    target: str                  # its name
    error: str                   # what Consul (did not) say

    def applied(self, key: Optional[KeyState]) -> bool:
        return key is not None and key.session == self.session


# What a move (or the settling of an unanswered one) answers -------------------

@dataclass(frozen=True)
class HandedOver:
    """The lock is the target's session's now; ``done`` deletes the request once said."""

    request: Request
    target: str


@dataclass(frozen=True)
class Kept:
    """The move failed and the key never left: leading on is no new leadership."""


@dataclass(frozen=True)
class Unanswered:
    """Consul did not answer the move: read the key, then ``settle``."""


@dataclass(frozen=True)
class Lost:
    """The move failed and the key is no longer ours: the candidates compete as usual."""


Moved = Union[HandedOver, Kept, Unanswered, Lost]


class Switchover:
    """The leader's side of a switchover request, for the loop to ask."""

    def __init__(self, consul: ConsulClient, settings: Settings, cluster: Cluster):
        self.consul, self.settings, self.cluster = consul, settings, cluster
        self.moving: Optional[Move] = None
        self._reviewed = 0           # the request whose overdue answer was read afresh

    def review(self) -> Review:
        """The request's time is up: drop it if stale, else read afresh once, then decide."""
        req = self.cluster.tree.request
        if req is None:
            return Review.NOTHING
        if self.cluster.request_expired(req):
            self._drop(req, f"no answer within its {req.timeout:g}s (its author gave up)")
            return Review.NOTHING
        if self._reviewed != req.modify_index:
            # The target's answer may be in a watch answer we have not had (a watch that hangs
            # or backs off): read afresh once, and decide on that; if the read fails, decide on
            # what we know the next time.
            self._reviewed = req.modify_index
            return Review.READ_KEY
        return Review.DECIDE

    def decide(self) -> Optional[HandOver]:
        """The request pending, if this node (the leader, its key confirmed) is to carry it out
        now; one it cannot is refused (or dropped) here, and None is answered."""
        req: Optional[Request] = self.cluster.pending_request()
        if req is None:
            return None
        if self.cluster.request_expired(req):
            self._drop(req, "it is stale (its author gave up)")
            return None
        if req.target == self.settings.value:
            self._drop(req, "this node holds the key already")
            return None
        target, why = self.cluster.check_target(req)
        if target is None:
            self._refuse(req, why)
            return None
        ready = self.cluster.target_ready(req, target)
        if ready is None:
            return None  # its answer comes through the watch (or the deadline: review)
        if not ready:
            self._refuse(req, f"{target.name}'s vip-elector did not answer within "
                              f"{self.cluster.answer_limit(req):g}s (is it frozen or overloaded, or "
                              f"its Consul agent failing? see its log); {self.settings.value} "
                              f"keeps the key")
            return None
        self.cluster.handled(req)
        return HandOver(req, target)

    def move(self, session: str, handover: HandOver) -> Moved:
        """Move the lock from our ``session`` to the target's, in one transaction."""
        req, target = handover.request, handover.target
        try:
            moved = self.consul.hand_over(session, target.session, target.name)
        except ConsulError as e:
            # No answer is not "no" (REFERENCE §8), and this step's budget may be spent: the
            # key, read in a step of its own, says whether Consul moved it. Until then this
            # node claims nothing (it is a standby since the hand-over began).
            log.warning("switchover to %s: Consul did not answer the move of the lock (%s); "
                        "reading %s to learn where it is", target.name, e, self.settings.trigger_key)
            self.moving = Move(req, target.session, target.name, str(e))
            return Unanswered()
        if not moved:
            self._refuse(req, f"Consul refused the move ({target.name}'s session ended, or the key "
                              f"changed); {self.settings.value} keeps the key")
            return Kept()
        return HandedOver(req, target.name)

    def settle(self, key: Optional[KeyState], session: Optional[str]) -> Moved:
        """The unanswered move, settled by the key as read since (None: our session is gone):
        handed over, or refused (the key still our ``session``'s, or not)."""
        move, self.moving = self.moving, None
        assert move is not None, "settle() is for a move under way (see moving)"
        if move.applied(key):
            return HandedOver(move.request, move.target)
        kept = key is not None and key.session == session
        self._refuse(move.request, f"Consul did not move the lock ({move.error}); "
                     + (f"{self.settings.value} keeps the key: try again once Consul is healthy"
                        if kept else "the key is no longer this node's: the candidates "
                                     "compete for it as usual"))
        return Kept() if kept else Lost()

    def done(self, moved: HandedOver) -> None:
        """The hand-over carried out and said: its request is of no use any more."""
        self._drop(moved.request, None)

    def _refuse(self, req: Request, why: str) -> None:
        """Tell the request's author why (on the request itself); it is not acted on again."""
        self.cluster.handled(req)
        log.warning("switchover to %s (asked by %s) refused: %s", req.target or "?", req.by or "?", why)
        try:
            self.consul.put_request(req.refused(why).to_json(), cas=req.modify_index)
        except ConsulError as e:
            log.warning("cannot tell the switchover's author why it was refused: %s", e)

    def _drop(self, req: Request, why: Optional[str]) -> None:
        """Delete the request (carried out, or of no use any more)."""
        if why:
            log.info("switchover request to %s dropped: %s", req.target or "?", why)
        self.cluster.dropped(req)
        try:
            self.consul.delete_request(req.modify_index)
        except ConsulError as e:
            log.warning("cannot delete the switchover request %s/switchover: %s",
                        self.settings.trigger_key, e)


__all__ = ["Switchover", "Review", "HandOver", "Move", "HandedOver", "Kept", "Unanswered", "Lost",
           "Moved"]
