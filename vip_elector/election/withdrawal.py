"""--manage-vip's fault (SPEC §12; keepalived's FAULT state): the session given up.

When the VIP cannot be held here (the interface missing or down, an add that
failed), the node must not compete until the fault has been gone for the
hold-off. As in a planned handover, the key is released at once for a
healthy node, and the session (with our candidate key) destroyed. Consul may
be out of reach through the very interface that failed, so the withdrawal is
retried every ``renew_retry`` until Consul answers: the session must never
outlive it, or its key would wait for the TTL. The loop says what the node
is meanwhile (WAITING); this object only gives the session up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from ..consul import ConsulClient, ConsulError, InvalidSession
from .key import Release, TriggerKey
from .role import Reporter
from .timing import Timing

if TYPE_CHECKING:
    from ..address import VirtualAddress

log = logging.getLogger("vip_elector")


@dataclass(frozen=True)
class Withdrawn:
    """The session is destroyed (and the key released if it was ours)."""

    look_in: float               # seconds until the node looks again whether it may compete


class Withdrawal:
    """The VIP's hold-off, and the session given up for it, for the loop to ask."""

    def __init__(self, consul: ConsulClient, key: TriggerKey, reporter: Reporter, timing: Timing,
                 clock: Callable[[], float], vip: Optional["VirtualAddress"]):
        self.consul, self.key, self.reporter = consul, key, reporter
        self.timing, self.clock, self.vip = timing, clock, vip
        self.why: Optional[str] = None           # the fault whose session is being given up
        self.at = float("inf")                   # the next attempt, while one is under way
        self._failing: Optional[str] = None      # why the last attempt failed (logged once)

    @property
    def active(self) -> bool:
        """A session is being given up: nothing else is done with it meanwhile."""
        return self.why is not None

    def holding_off(self) -> Optional[tuple[str, float]]:
        """(why, seconds left) while the VIP cannot be held here, else None (no --manage-vip)."""
        return self.vip.holding_off() if self.vip is not None else None

    def look_in(self, left: float) -> float:
        """Seconds until a node held off for ``left`` more seconds looks again."""
        return min(self.timing.health_poll, max(0.05, left))

    def begin(self, why: str) -> None:
        """The fault ``why`` starts a withdrawal: ``attempt`` it until it is done."""
        self.why = why

    def attempt(self, session: str, budget: float) -> Optional[Withdrawn]:
        """Release the key (if ours) and destroy ``session``, within ``budget`` (and the stop's
        share); None: Consul did not answer, ``at`` says when to try again."""
        try:
            with self.consul.time_limit(min(budget, 2 * self.timing.shutdown_timeout + 0.5)):
                if self.key.held_by(session) or self.key.state is None:
                    if self.key.release(session) == Release.RELEASED:
                        self.reporter.released_on_fault()
                self.consul.destroy_session(session)
        except InvalidSession:
            pass  # gone already, and its key with it
        except ConsulError as e:
            if self._failing != str(e):
                log.warning("cannot withdraw session %s yet (%s): trying again every %gs",
                            session, e, self.timing.renew_retry)
            self._failing = str(e)
            self.at = self.clock() + self.timing.renew_retry
            return None
        log.info("session %s destroyed: withdrawn while the VIP cannot be held here (%s)",
                 session, self.why or "")
        self.why = self._failing = None
        self.at = float("inf")
        held = self.holding_off()
        return Withdrawn(self.look_in(held[1] if held else 0.0))


__all__ = ["Withdrawal", "Withdrawn"]
