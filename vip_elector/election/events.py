"""What the loop hears: key changes, watch failures, stops, reloads, a critical check.

Every event comes through one ``Inbox``; the loop's thread alone takes them out.
"""

from __future__ import annotations

import collections
import select
import socket
import threading
from dataclasses import dataclass
from typing import Optional, Union

from ..consul import KeyState


@dataclass(frozen=True)
class KeyChanged:
    generation: int
    index: int                   # X-Consul-Index of the answer: orders it against our own reads
    state: Optional[KeyState]
    entries: Optional[list] = None  # the keys under <trigger-key>/ (candidates, a switchover request)


@dataclass(frozen=True)
class WatchFailed:
    generation: int
    error: str


@dataclass(frozen=True)
class Stop:
    at: float                    # the loop's clock at the request: the stop budget starts here


@dataclass(frozen=True)
class Reload:
    """SIGHUP: read the configuration again (SPEC §8.3)."""


@dataclass(frozen=True)
class CheckCritical:
    check_id: str                # the bound check the local agent says is critical


@dataclass(frozen=True)
class VipFault:
    why: str                     # --manage-vip: the interface is missing or down, or adding failed


RELOAD = Reload()

Event = Union[KeyChanged, WatchFailed, Stop, Reload, CheckCritical, VipFault]


class Inbox:
    """The loop's events, from the watcher thread, the health watch and the signal relay.

    A lock guards the queue, which other threads post to while the loop
    takes from it; a stop waiting overtakes everything else. A socketpair
    wakes ``select()``, so an event posted just before the loop blocks still
    wakes it.
    """

    def __init__(self):
        self._events: collections.deque = collections.deque()
        self._stop: Optional[Stop] = None      # the first stop posted, if any
        self._lock = threading.Lock()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def put(self, event: Event) -> None:
        """Safe from any thread."""
        with self._lock:
            self._events.append(event)
            if isinstance(event, Stop) and self._stop is None:
                self._stop = event
        try:
            self._writer.send(b"\0")
        except OSError:
            pass  # already plenty of wake-ups pending

    def get(self, timeout: float) -> Optional[Event]:
        """The next event, or None when ``timeout`` passes first. A stop overtakes the rest."""
        with self._lock:
            waiting = bool(self._events)
        if not waiting:
            select.select([self._reader], [], [], timeout)
            try:
                while self._reader.recv(4096):
                    pass
            except OSError:
                pass
        with self._lock:
            if self._stop is not None:
                stop, self._stop = self._stop, None
                self._events.clear()
                return stop
            return self._events.popleft() if self._events else None

    def drain(self) -> list[Event]:
        """Everything still waiting, oldest first; the inbox is empty afterwards."""
        with self._lock:
            events = list(self._events)
            self._events.clear()
            self._stop = None
        return events
