"""How the loop ends: a planned stop (SPEC §4.5) or a reload that re-executes (§8.3).

A stop releases what this node holds, in the order that lets a standby take
over at once — the hook's ``standby``, then the key deleted by CAS, then the
session destroyed — all within the stop budget, whatever Consul does. A
reload validates the new configuration first, keeps running as before when
it is refused, and otherwise hands the session to the new program (moving
the lock to a session made for new parameters when they change).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from ..config import ConfigError, Settings
from ..consul import ConsulClient, ConsulError
from ..state import StateStore
from ..systemd import MESSAGE_CONFIG_ERROR, Notifier
from .cluster import Cluster
from .key import Release, TriggerKey
from .lease import Lease
from .previous_run import PreviousRun
from .role import Reporter
from .timing import Timing
from .watch import KeyWatcher

log = logging.getLogger("vip_elector")


class Lifecycle:
    """The stop and the reload, over the loop's parts."""

    def __init__(self, consul: ConsulClient, timing: Timing, clock: Callable[[], float],
                 notifier: Notifier, state: StateStore, lease: Lease, key: TriggerKey,
                 previous: PreviousRun, reporter: Reporter, watcher: KeyWatcher, cluster: Cluster):
        self.consul, self.timing, self.clock, self.notifier = consul, timing, clock, notifier
        self.state, self.lease, self.key, self.previous = state, lease, key, previous
        self.reporter, self.watcher, self.cluster = reporter, watcher, cluster

    def reload(self, read_settings: Optional[Callable[[], Optional[Settings]]],
               verdict: Callable[[Optional[str]], None]) -> bool:
        """True: re-execute now (the configuration is valid). False: keep running as before.

        ``read_settings``: the new configuration, validated (or ConfigError);
        ``verdict``: told None when it applies, else why not."""
        self.notifier.reloading()
        log.info("reload requested: reading the configuration again")
        if self.lease.stray is not None:  # the key may be on it: the loop settles that first
            return self._refused("the previous reload's move of the lock went unanswered and is "
                                 "not settled yet: try the reload again in a few seconds", verdict)
        try:
            new = read_settings() if read_settings is not None else None
            if new is not None and self.lease.session is not None:
                with self.consul.time_limit(self.timing.turn_budget):
                    self.lease.carry_over(new)
        except ConfigError as e:
            return self._refused(str(e), verdict)
        except ConsulError as e:
            return self._refused(f"the new configuration needs a new session, and {e}; the key "
                                 f"stays with the current session: try the reload again once "
                                 f"Consul answers", verdict)
        except Exception as e:
            log.exception("internal error while reloading; still running as before")
            self.notifier.ready()
            verdict(f"internal error ({type(e).__name__}); see journalctl -u vip-elector")
            return False
        self.reporter.reload_applies()
        verdict(None)
        self.watcher.stop()
        with self.consul.time_limit(self.timing.shutdown_timeout):
            self.lease.drop_replacement()  # the new program starts from the session it resumes
        self.reporter.finish_hooks(self.timing.reload_hook_wait)
        self.state.save(self.lease.saved()) if self.lease.session else self.state.clear()
        self.reporter.reloading()
        return True

    def _refused(self, why: str, verdict: Callable[[Optional[str]], None]) -> bool:
        log.error("reload failed, still running with the previous configuration: %s", why,
                  extra={"MESSAGE_ID": MESSAGE_CONFIG_ERROR})
        self.reporter.reload_refused(why)
        self.notifier.ready()
        verdict(why)
        return False

    def stop(self, requested_at: float, holds: bool) -> None:
        """SIGTERM: within ``stop_budget`` of ``requested_at`` (the loop's clock), whatever
        Consul does. ``holds``: this node leads (or its session holds the key)."""
        deadline = requested_at + self.timing.stop_budget
        self.consul.reset_abort()
        self.notifier.stopping()
        self.reporter.stopping()
        self.watcher.stop()
        self.reporter.finish_hooks(deadline - self.timing.release_reserve - self.clock())
        left = lambda: max(0.05, deadline - self.clock())  # noqa: E731
        with self.consul.time_limit(left()):
            if self.lease.session is None and self.previous.pending:
                self.previous.release_on_stop(self.lease.node)  # stopped before it could resume
            if holds and self.lease.session is not None:
                self._release_key()
            if self.lease.session is not None:
                with self.consul.time_limit(min(self.timing.shutdown_timeout, left())):
                    self.cluster.withdraw_record(self.lease.session)
                with self.consul.time_limit(min(self.timing.shutdown_timeout, left())):
                    self.lease.destroy()
            self.lease.drop_replacement()
        self.state.clear()
        self.reporter.close()
        log.info("stopped")

    def _release_key(self) -> None:
        """Delete our own write with CAS: vip-manager drops the VIP, a standby takes over at once."""
        try:
            released = self.key.release(self.lease.session)
        except ConsulError as e:
            log.warning("could not release %s: %s; Consul deletes it when our session ends",
                        self.key.settings.trigger_key, e)
            return
        if released == Release.RELEASED:
            self.reporter.released_on_stop()
        elif released == Release.NOT_OURS:
            self.reporter.lost_before_stop()
        else:
            log.warning("could not release %s: it kept changing", self.key.settings.trigger_key)
