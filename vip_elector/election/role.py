"""The role, and everything said about it (SPEC §6, §9.3, §10).

The ``Reporter`` is the only object that changes the role, and the only one
that says so: the LOCK ACQUIRED / LOST / RELEASED lines with their journal
MESSAGE_IDs, systemd's STATUS, the journal's role and session fields, the
hook calls, and the health watch that runs while this node leads. The loop
decides; the reporter tells. It never decides anything from what it said:
a line logged once per situation is kept apart by a typed ``said`` tag, not
by reading the status text back.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import TYPE_CHECKING, Callable, Optional

from ..config import Settings
from ..consul import ConsulClient, KeyState, describe_holder
from ..hooks import LEADER, STANDBY, Hooks
from ..metrics import NullMetrics

if TYPE_CHECKING:
    from ..address import VirtualAddress
from ..systemd import (MESSAGE_ACQUIRED, MESSAGE_LOST, MESSAGE_RELEASED, MESSAGE_WAITING,
                       ElectionContext, Notifier)
from .watch import HealthWatch

log = logging.getLogger("vip_elector")


class Role(str, enum.Enum):
    """What this node is, and the only place that says so."""

    STARTING = "starting"
    WAITING = "waiting"          # no session: Consul unreachable, or a check not passing
    FOLLOWER = "follower"        # a confirmed session; the key is another's, or free
    LEADER = "leader"            # the session holds the key and Consul confirmed it recently
    CUT_OFF = "cut-off"          # a session Consul has not confirmed lately: claims nothing
    STOPPING = "stopping"


class Reporter:
    """Changes the role and says so: log, STATUS, journal fields, hooks, health watch."""

    def __init__(self, settings: Settings, notifier: Notifier, context: ElectionContext,
                 hooks: Hooks, consul: ConsulClient, on_critical: Callable[[str], None],
                 metrics: Optional[NullMetrics] = None,
                 vip: Optional["VirtualAddress"] = None):
        self.settings, self.notifier, self.context, self.hooks = settings, notifier, context, hooks
        self.metrics = metrics or NullMetrics()
        self.vip = vip                         # --manage-vip: on exactly while this node leads (§12)
        self.consul, self.on_critical = consul, on_critical
        self.role = Role.STARTING
        self.session = ""                      # the session hooks and the journal are told about
        self.note = ""                         # appended to the status (a failed reload)
        self._status = ""
        self._said: tuple = ()                 # which situation the status describes
        self._health: Optional[HealthWatch] = None
        self._handing_over = False             # a switchover: no LOCK LOST for the standby it begins with
        # Seconds the claim window has left (§9.3), for the VIP's lifetime (§12); set by the loop.
        self.claim_left: Callable[[], float] = lambda: 0.0

    @property
    def watching_health(self) -> bool:
        """The bound check is being watched (only while leading, with --check-id)."""
        return self._health is not None

    def use_session(self, session: Optional[str]) -> None:
        self.session = session or ""
        self.context.session = self.session

    # ------------------------------------------------------------------
    # The node's situations, in the words of SPEC §4

    def starting(self) -> None:
        self._become(Role.STARTING, f"starting: connecting to Consul at {self.settings.address}")

    def leads(self, resumed: bool = False, kept: bool = False) -> None:
        """The session holds the key, confirmed; ``resumed``: the previous run's (SPEC §8.2);
        ``kept``: a switchover's move failed and the key never left (SPEC §11.3)."""
        self._become(Role.LEADER, self._leader_status(), resumed=resumed, kept=kept)

    def follows(self, holder: KeyState) -> None:
        """Another session holds the key (SPEC §4.4)."""
        value, k = holder.value, self.settings.trigger_key
        said = ("following", value)
        if value == self.settings.value:
            # Not a leader to follow: something else writes this node's own name.
            said = ("own value held by another session", value)
            status = f"follower: {k} is held by another session with this node's own value {value!r}"
            if self._said != said:
                log.warning("%s is held by another session with this node's own value %r (%s), "
                            "not by this daemon's session %s: a second vip-elector for the same "
                            "key on this host, another node with the same --hostname/"
                            "trigger-value, or an earlier run whose session was not saved (it "
                            "ends within %gs); give each instance its own trigger-key and each "
                            "node its own name", k, value, describe_holder(self.consul, holder),
                            self.session or None, 2 * self.settings.ttl)
        else:
            status = f"follower: leader is {value}" if value else "follower: no leader yet"
            if self._said != said:
                log.info("following: %s holds %s", value or "a session", k)
        lost = f"{value or 'another session'} holds it now" if self.role == Role.LEADER else ""
        self._become(Role.FOLLOWER, status, lost, said)

    def key_deleted(self) -> None:
        self._become(Role.FOLLOWER, "follower: the key was deleted; competing again",
                     "the key was deleted (our session was invalidated, or someone deleted it)")

    def defers(self, why: str, seconds: float) -> None:
        """A free key left to another candidate for a while (SPEC §11.4); said once."""
        said = ("deferring", why)
        if self._said != said:
            log.info("the key is free; leaving it for %.1fs at most: %s", seconds, why)
        self._become(Role.FOLLOWER, f"follower: key is free, deferring: {why}", "", said)

    def hands_over(self, target: str, by: str) -> None:
        """A switchover (SPEC §11.3): standby first (the hook is called), then the lock moves."""
        self._handing_over = True
        try:
            self._become(Role.FOLLOWER, f"follower: handing {self.settings.trigger_key} over to {target}",
                         f"switchover to {target}" + (f" ({by})" if by else ""))
        finally:
            self._handing_over = False
        log.info("switchover to %s%s: standby now, moving the lock", target, f" ({by})" if by else "")

    def handed_over(self, target: str) -> None:
        log.info("LOCK RELEASED: this node (%s) handed %s over to %s (switchover)", self.settings.value,
                 self.settings.trigger_key, target, extra={"MESSAGE_ID": MESSAGE_RELEASED})

    def waits_for_lock_delay(self) -> None:
        self._become(Role.FOLLOWER, "follower: key is free, waiting for lock-delay to pass")

    def check_not_passing(self, check_id: str, state: Optional[str], output: str, poll: float) -> None:
        """No session while a bound check is missing or critical (SPEC §4.7); logged once per
        check and state (the output, which may change at every run of the check, rides along)."""
        why = "is not registered on the local agent" if state is None else f"is {state}"
        said = ("check", check_id, why)
        changed = self.role != Role.WAITING or self._said != said
        if output:
            why += f": {output}"
        self._become(Role.WAITING, f"waiting: check '{check_id}' {why}", f"check '{check_id}' {why}", said)
        if changed:
            log.warning("not competing for %s: check '%s' %s; looking again every %gs",
                        self.settings.trigger_key, check_id, why, poll,
                        extra={"MESSAGE_ID": MESSAGE_WAITING})

    def not_a_lock_key(self, key: KeyState, message: str) -> None:
        """Someone overwrote the key with a plain write (SPEC §4.6): never touch it; said once."""
        said = ("not a lock key",)
        if self.role != Role.WAITING or self._said != said:
            log.error("%s.", message)
        self._become(Role.WAITING, f"waiting: {self.settings.trigger_key} is not a lock key "
                                   f"({key.value!r} written by another program)",
                     "the key was overwritten by a plain write", said)

    def cut_off(self, since: float, reason: str) -> None:
        """Consul has not confirmed the session within the claim window (SPEC §9.3)."""
        status = (f"cut off: Consul at {self.settings.address} has not confirmed session "
                  f"{self.session} for {since:.0f}s ({reason}); not claiming "
                  f"{self.settings.trigger_key}")
        self._become(Role.CUT_OFF, status,
                     f"cannot confirm the session with Consul ({reason}); another node may get the key")

    def check_critical(self, check_id: str) -> None:
        """The local agent says the bound check is critical: Consul frees the key now (SPEC §10.4)."""
        self._become(Role.CUT_OFF, f"cut off: check '{check_id}' is critical on this node; "
                                   f"not claiming {self.settings.trigger_key}",
                     f"check '{check_id}' is critical on this node: Consul invalidates the "
                     f"session and frees the key")

    def session_gone(self, why: str) -> None:
        self._become(Role.WAITING, f"waiting: session gone ({why}); making a new one",
                     f"session gone: {why}")

    def consul_trouble(self, status: str, reason: str, with_session: bool) -> None:
        """Consul errs (SPEC §4.8): say so; a leader's claim holds until its window ends."""
        if not with_session:
            self._become(Role.WAITING, status, reason)
        elif self.role == Role.LEADER:
            self._show(f"{self._leader_status()}; {status}", ("leader, trouble",))
        elif self.role != Role.CUT_OFF:
            self._become(Role.FOLLOWER, f"follower: {status}")

    def stopping(self) -> None:
        self._become(Role.STOPPING, "stopping", "planned stop")

    def claim_extended(self) -> None:
        """A leader's renewal was confirmed: the VIP's lifetime follows the claim window (§12)."""
        if self.vip is not None and self.role == Role.LEADER:
            self.vip.settle(True, self.claim_left())

    def vip_fault(self, why: str, seconds: float, gave_up: bool) -> None:
        """--manage-vip cannot hold the address here (keepalived's FAULT): not competing.

        Said once per fault (the status counts the hold-off down)."""
        said = ("vip fault", why)
        status = (f"waiting: VIP fault: {why}; not competing for {self.settings.trigger_key} until "
                  f"it has had no fault for {seconds:.0f}s")
        if self._said != said:
            log.error("VIP fault: %s; %s, and not competing for it until the interface has been "
                      "usable for %gs", why,
                      f"gave up {self.settings.trigger_key} so that a healthy node takes the VIP"
                      if gave_up else f"withdrew this node's candidacy for {self.settings.trigger_key}",
                      seconds, extra={"MESSAGE_ID": MESSAGE_WAITING})
        self._handing_over = gave_up  # not LOCK LOST: it lets go (LOCK RELEASED follows)
        try:
            self._become(Role.WAITING, status, f"VIP fault: {why}", said)
        finally:
            self._handing_over = False

    def released_on_fault(self) -> None:
        log.info("LOCK RELEASED: this node (%s) gave up %s: it cannot hold the VIP",
                 self.settings.value, self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_RELEASED})

    # ------------------------------------------------------------------
    # Releases (the key changes hands because we let go)

    def released_on_stop(self) -> None:
        log.info("LOCK RELEASED: this node (%s) gave up %s on shutdown", self.settings.value,
                 self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_RELEASED})

    def lost_before_stop(self) -> None:
        log.warning("LOCK LOST: %s was no longer ours at shutdown", self.settings.trigger_key,
                    extra={"MESSAGE_ID": MESSAGE_LOST})

    def released_old(self, key: str, why: str) -> None:
        """A previous run's (or configuration's) session let go of the key (SPEC §8.2)."""
        log.info("LOCK RELEASED: deleted %s, %s", key, why, extra={"MESSAGE_ID": MESSAGE_RELEASED})

    # ------------------------------------------------------------------
    # Reloads, and the hooks' end

    def reload_refused(self, error: str) -> None:
        self.note = f"reload failed: {error}"
        self._show(self._status, self._said)

    def reload_applies(self) -> None:
        self.note = ""

    def reloading(self) -> None:
        self._show("reloading: starting the new program", ("reloading",))

    def finish_hooks(self, seconds: float) -> None:
        """Let a hook still running finish for ``seconds`` at most (a stop's or a reload's share).

        The hook runner keeps time by time.monotonic(): the loop's deadlines
        (on its own clock) reach it as a time left.
        """
        self.hooks.finish(time.monotonic() + max(0.0, seconds))

    def close(self) -> None:
        if self._health is not None:
            self._health.stop()
            self._health = None
        self.hooks.close()

    # ------------------------------------------------------------------

    def _leader_status(self) -> str:
        return f"leader: holding {self.settings.trigger_key} as {self.settings.value}"

    def _become(self, role: Role, status: str, why: str = "", said: tuple = (),
                resumed: bool = False, kept: bool = False) -> None:
        previous = self.role
        self.role = role
        self.context.role = role.value
        self.metrics.role(role.value)
        if self.vip is not None:
            # Before anything is said or announced: the address is added before
            # the leader hook runs, and removed before the key can leave (§12.1);
            # while starting, a crashed leader's address stays until it knows.
            # A leader's address lives no longer than its claim window (its kernel lifetime).
            claiming = {Role.LEADER: True, Role.STARTING: None}.get(role, False)
            self.vip.settle(claiming, self.claim_left() if claiming else None)
        self._watch_health(role == Role.LEADER)
        if previous != Role.LEADER and role == Role.LEADER and resumed:
            # Not a new leadership (the audit's MESSAGE_ID): the key was not touched.
            log.info("resumed leadership: this node (%s) still holds %s with session %s; the "
                     "key was not touched", self.settings.value, self.settings.trigger_key,
                     self.session)
            self.hooks.announce(LEADER, "this node still holds the key (resumed)", self.session)
        elif previous != Role.LEADER and role == Role.LEADER and kept:
            # Not a new leadership either: the switchover's standby ends, the key never left.
            log.info("kept leadership: the switchover's move failed and this node (%s) still "
                     "holds %s with session %s", self.settings.value, self.settings.trigger_key,
                     self.session)
            self.hooks.announce(LEADER, "this node still holds the key (the switchover failed)",
                                self.session)
        elif previous != Role.LEADER and role == Role.LEADER:
            log.info("LOCK ACQUIRED: this node (%s) now holds %s", self.settings.value,
                     self.settings.trigger_key, extra={"MESSAGE_ID": MESSAGE_ACQUIRED})
            self.hooks.announce(LEADER, "this node holds the key", self.session)
        elif previous == Role.LEADER and role not in (Role.LEADER, Role.STOPPING) and not self._handing_over:
            log.warning("LOCK LOST: this node (%s) no longer holds %s: %s", self.settings.value,
                        self.settings.trigger_key, why or status, extra={"MESSAGE_ID": MESSAGE_LOST})
        if role not in (Role.LEADER, Role.STARTING) and previous != role or role == Role.STOPPING:
            self.hooks.announce(STANDBY, why or status, self.session)
        self._show(status, said or (role, status))

    def _watch_health(self, leading: bool) -> None:
        if leading and self._health is None and self.settings.check_ids:
            self._health = HealthWatch(self.consul, self.settings.check_ids,
                                       HealthWatch.interval_for(self.settings.lock_delay),
                                       self.on_critical)
        elif not leading and self._health is not None:
            self._health.stop()
            self._health = None

    def _show(self, status: str, said: tuple) -> None:
        self._status, self._said = status, said
        self.notifier.status(status + (f"; {self.note}" if self.note else ""))
