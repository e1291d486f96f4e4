"""The two threads that watch for the loop: the key's blocking query, and a leader's check.

They decide nothing: they post what they see to the loop's ``Inbox``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from ..consul import ConsulClient, ConsulError
from .events import Inbox, KeyChanged, WatchFailed
from .timing import Backoff, Timing

log = logging.getLogger("vip_elector")

# How long the watcher lets the loop act on a change (an acquire, when the key
# was freed) before it takes the CPU and the GIL for its next query.
HANDOFF_WAIT = 0.05


class KeyWatcher:
    """A thread that keeps a blocking query open on the key and posts changes.

    It cannot die: every failure, expected or not, is posted (or logged) and
    retried with backoff. Consul's index rules (§9.5): an index that goes
    backwards or is not positive restarts the watch, after a pause so a broken
    answer cannot make it spin. ``restart()`` abandons the query in flight,
    closing its connection, and starts afresh; the abandoned thread's events
    carry an old generation and are ignored.
    """

    def __init__(self, consul: ConsulClient, events: Inbox, timing: Timing,
                 rng: Callable[[], float]):
        self.consul, self.events, self.timing, self.rng = consul, events, timing, rng
        self.generation = 0
        self._kick = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.handled = threading.Event()  # set by the loop once it has acted on our news

    @property
    def alive(self) -> bool:
        """A query is kept open (the thread runs)."""
        return self._thread is not None and self._thread.is_alive()

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
                new_index, state, entries = self.consul.read_tree(index, self.timing.watch_wait)
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
                self.events.put(KeyChanged(generation, new_index, state, entries))
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

    def __init__(self, consul: ConsulClient, check_id, interval: float,
                 on_critical: Callable[[str], None]):
        # One check ID, or several (--check-id more than once, SPEC §11.5): one read for all.
        self.check_ids = [check_id] if isinstance(check_id, str) else list(check_id)
        self.check_id = self.check_ids[0]
        self.consul, self.interval = consul, interval
        self.on_critical = on_critical
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="health", daemon=True).start()

    @staticmethod
    def interval_for(lock_delay: float) -> float:
        """Half the lock-delay, between 0.1 s and 0.5 s."""
        return max(0.1, min(0.5, lock_delay / 2))

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                states = self.consul.check_states(self.check_ids)
            except ConsulError:
                continue  # the renewals judge Consul's health; this reads the check only
            except Exception:
                log.exception("internal error in the health watch; retrying")
                continue
            critical = [cid for cid in self.check_ids if states.get(cid) == "critical"]
            if critical and not self._stop.is_set():
                self.on_critical(critical[0])
                return
