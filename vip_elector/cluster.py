"""What the electors of one trigger-key tell each other through Consul (SPEC §11).

KV is flat, and vip-manager reads only the trigger-key itself, so the keys
below live under its name without vip-manager seeing anything:

    <trigger-key>/candidates/<value>   one per running elector, acquired with its
                                       own session (behaviour delete): it vanishes
                                       with the session (a stop, a crash, a failed check)
    <trigger-key>/switchover           a request to move leadership, written by
                                       ``vip-elector switchover`` with ``cas=0``

Both hold JSON. The daemon and the operator's commands share this module,
so they cannot disagree about names or fields.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

DEFAULT_PRIORITY = 100
MAX_PRIORITY = 255
#: SPEC §11.4: how long a free key waits for a candidate of higher priority (or the sticky holder).
DEFER_LIMIT = 2.0
#: A switchover request outlives its author's timeout by this much; then it is stale: the
#: leader drops it, and a new ``switchover`` may replace it.
REQUEST_GRACE_SECONDS = 2.0


def candidates_prefix(trigger_key: str) -> str:
    return f"{trigger_key}/candidates/"


def candidate_key(trigger_key: str, value: str) -> str:
    return candidates_prefix(trigger_key) + value


def request_key(trigger_key: str) -> str:
    return f"{trigger_key}/switchover"


@dataclass(frozen=True)
class Entry:
    """A KV entry under the trigger-key's name, as Consul has it."""

    key: str
    value: str
    session: Optional[str]
    modify_index: int
    flags: int = 0


@dataclass(frozen=True)
class Candidate:
    """One elector, as its candidate key says (``session`` is the key's holder, from Consul)."""

    name: str
    node: str = ""
    priority: int = DEFAULT_PRIORITY
    role: str = "standby"                    # leader | standby
    since: float = 0.0                       # wall clock: when it took this role
    up_since: float = 0.0                    # wall clock: when its session (its checks passing) began
    checks: dict = field(default_factory=dict)   # check ID -> status when written
    session: str = ""
    pid: int = 0
    version: str = ""
    ready: int = 0                           # the switchover request (its ModifyIndex) it is ready for

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("session")  # Consul says who holds the key; a copy could only disagree
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_entry(cls, entry: Entry, trigger_key: str) -> Optional["Candidate"]:
        """None: not a live candidate (no session holds the key: it is on its way out)."""
        if not entry.session:
            return None
        name = entry.key[len(candidates_prefix(trigger_key)):]
        data = _record(entry)

        def number(k: str, default, kind=float):
            try:
                return kind(data.get(k, default))
            except (TypeError, ValueError):
                return default
        checks = data.get("checks") if isinstance(data.get("checks"), dict) else {}
        return cls(name=name, node=str(data.get("node") or ""),
                   priority=number("priority", DEFAULT_PRIORITY, int),
                   role="leader" if data.get("role") == "leader" else "standby",
                   since=number("since", 0.0), up_since=number("up_since", 0.0),
                   checks={str(k): str(v) for k, v in checks.items()}, session=entry.session,
                   pid=number("pid", 0, int), version=str(data.get("version") or ""),
                   ready=number("ready", 0, int))


def _record(entry: Entry) -> dict:
    """A key's JSON object; {} for anything else (a damaged or foreign value is no record)."""
    try:
        data = json.loads(entry.value or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Request:
    """A switchover asked for: move leadership from ``source`` to ``target`` (SPEC §11.3)."""

    target: str
    source: str                               # the holder's name when asked
    timeout: float                            # seconds the author waits; then the request is stale
    requested: float                          # wall clock, for people
    by: str = ""                              # who asked: user@host, or "preempt by NAME"
    error: str = ""                           # set by the leader when it refuses
    modify_index: int = 0

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("modify_index")
        data["deadline"] = self.requested + self.timeout  # for people reading the key
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_entry(cls, entry: Entry) -> "Request":
        data = _record(entry)
        try:
            timeout = float(data.get("timeout", 10.0))
            requested = float(data.get("requested", 0.0))
        except (TypeError, ValueError):
            timeout, requested = 10.0, 0.0
        return cls(target=str(data.get("target") or ""), source=str(data.get("source") or ""),
                   timeout=timeout, requested=requested, by=str(data.get("by") or ""),
                   error=str(data.get("error") or ""), modify_index=entry.modify_index)

    def refused(self, why: str) -> "Request":
        return Request(self.target, self.source, self.timeout, self.requested, self.by, why,
                       self.modify_index)


@dataclass(frozen=True)
class Tree:
    """Everything under the trigger-key's name, as of one read (or one watch answer)."""

    candidates: dict = field(default_factory=dict)      # name -> Candidate (live ones only)
    request: Optional[Request] = None
    own: Optional[Entry] = None                          # our own candidate key, as Consul has it

    @classmethod
    def build(cls, trigger_key: str, entries: list, own_value: Optional[str] = None) -> "Tree":
        prefix, request = candidates_prefix(trigger_key), request_key(trigger_key)
        candidates: dict = {}
        req: Optional[Request] = None
        own: Optional[Entry] = None
        for e in entries:
            if e.key.startswith(prefix):
                c = Candidate.from_entry(e, trigger_key)
                if own_value is not None and e.key == prefix + own_value:
                    own = e
                if c is not None:
                    candidates[c.name] = c
            elif e.key == request:
                req = Request.from_entry(e)
        return cls(candidates, req, own)

    def by_session(self, session: Optional[str]) -> Optional[Candidate]:
        for c in self.candidates.values():
            if session and c.session == session:
                return c
        return None


def wall() -> float:
    return time.time()


__all__ = ["Entry", "Candidate", "Request", "Tree", "candidate_key", "candidates_prefix",
           "request_key", "REQUEST_GRACE_SECONDS", "DEFAULT_PRIORITY", "MAX_PRIORITY", "DEFER_LIMIT", "wall"]
