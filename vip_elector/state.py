"""The state file: which session this daemon made, so a restart can resume it (SPEC §8.1).

A crashed, watchdog-killed or re-executed daemon comes back to a session
Consul still has, and to the key that session holds: resuming it means the
key is not written, deleted or released, and the VIP does not move. The file
says what the session was made for, so the next start can tell "mine, for
this configuration" (resume) from "mine, for another one" (release it) and
from "not mine" (never touch it).

Nothing here is fatal: a missing, unreadable or damaged file is one warning,
then a normal start; a directory we cannot write is one warning, then the
daemon runs without resuming. The file is written atomically (a temporary
file renamed over it), mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

log = logging.getLogger("vip_elector")

FORMAT = 1
FILE_NAME = "state.json"
MAX_SIZE = 64 * 1024
#: The state handed to a re-executed program (SPEC §8.3): the same as the
#: file, so a reload resumes even without a state directory.
ENV_VAR = "VIP_ELECTOR_RESUME"


@dataclass(frozen=True)
class SavedSession:
    """A session this daemon created, and what it was created for."""

    session: str
    node: str            # the agent's node, as Consul reported the session's
    name: str            # vip-elector-<value>
    key: str
    value: str
    checks: tuple[str, ...]
    ttl: float
    lock_delay: float

    def to_json(self) -> str:
        data = asdict(self)
        data["checks"] = list(self.checks)
        return json.dumps({"format": FORMAT, **data}, sort_keys=True)


class StateError(ValueError):
    """The saved state is not usable; the message says why, for one warning."""


def parse(text: str) -> SavedSession:
    try:
        data = json.loads(text)
    except ValueError:
        raise StateError("it is not JSON (damaged or truncated)") from None
    if not isinstance(data, dict):
        raise StateError("it is not a JSON object")
    if data.get("format") != FORMAT:
        raise StateError(f"it has format {data.get('format')!r}, this version reads {FORMAT}")
    try:
        saved = SavedSession(
            session=_text(data, "session"), node=_text(data, "node", empty=True),
            name=_text(data, "name"), key=_text(data, "key"), value=_text(data, "value"),
            checks=tuple(_text({"c": c}, "c") for c in data["checks"]),
            ttl=float(data["ttl"]), lock_delay=float(data["lock_delay"]))
    except (KeyError, TypeError, ValueError) as e:
        raise StateError(f"a field is missing or malformed ({e})") from None
    return saved


def _text(data: Mapping[str, Any], name: str, empty: bool = False) -> str:
    value = data[name]
    if not isinstance(value, str) or (not value and not empty) or len(value) > 1024:
        raise ValueError(name)
    return value


class StateStore:
    """The state file in ``directory`` (None: keep nothing)."""

    def __init__(self, directory: Optional[str]):
        self.directory = directory
        self.path = os.path.join(directory, FILE_NAME) if directory else None
        self._write_failed = False

    def load(self, env: Optional[dict] = None) -> Optional[SavedSession]:
        """The saved session, from a re-executing parent (``env``) or the file; None if none."""
        if env is not None and env.get(ENV_VAR):
            text = env.pop(ENV_VAR)
            try:
                return parse(text)
            except StateError as e:
                log.warning("ignoring the state handed over by the reload: %s", e)
        if self.path is None:
            return None
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the state file %s (%s): starting without resuming a "
                        "session", self.path, e.strerror or e)
            return None
        try:
            if len(raw) > MAX_SIZE:
                raise StateError("it is far too large")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise StateError("it is not text") from None
            if not text.strip():
                raise StateError("it is empty")
            return parse(text)
        except StateError as e:
            log.warning("ignoring the state file %s: %s; starting without resuming a session "
                        "(it is rewritten once a session exists)", self.path, e)
            self.clear()
            return None

    def save(self, saved: SavedSession) -> None:
        if self.path is None:
            return
        try:
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.directory)
            try:
                with os.fdopen(fd, "w") as f:  # mkstemp makes it 0600
                    f.write(saved.to_json() + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                _unlink(tmp)
                raise
        except OSError as e:
            if not self._write_failed:
                log.warning("cannot write the state file %s (%s): a restart of this daemon will "
                            "not resume its session (and may move the VIP); check --state-dir or "
                            "the unit's RuntimeDirectory=", self.path, e.strerror or e)
            self._write_failed = True
            return
        if self._write_failed:
            log.info("the state file %s is written again", self.path)
        self._write_failed = False

    def clear(self) -> None:
        if self.path is not None:
            _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["SavedSession", "StateStore", "StateError", "parse", "ENV_VAR"]
