"""Small helpers shared by the black-box tests (no vip_elector imports)."""

import re
import threading
import time

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text):
    """Seconds in a Go duration string ("1m30s", "500ms", "10s")."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, "not a Go duration: %r" % text
    return sum(float(n) * _UNITS[u] for n, u in parts)


def session_checks(session):
    """Check IDs a session is bound to, whichever fields Consul filled."""
    ids = set(session.get("Checks") or []) | set(session.get("NodeChecks") or [])
    ids |= {c["ID"] for c in session.get("ServiceChecks") or []}
    return ids


def sessions_named(agent, name):
    return [s for s in agent.sessions() if s["Name"] == name]


class KeySampler:
    """Samples a key in a thread: [(monotonic time, value or None, session or None)]."""

    def __init__(self, agent, key, interval=0.02):
        self.agent, self.key, self.interval = agent, key, interval
        self.samples = []
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                entry = self.agent.kv_get(self.key)
            except Exception as exc:  # noqa: BLE001 - recorded, the test decides
                self.errors.append((t, exc))
            else:
                self.samples.append((t, None if entry is None else entry["Value"].decode(),
                                     None if entry is None else entry.get("Session")))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def values_after(self, t):
        return [v for (ts, v, _) in self.samples if ts >= t]
