"""Small helpers shared by the black-box tests (no vip_elector imports)."""

import os
import re
import socket
import threading
import time

from consul_agent import WaitTimeout

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


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET receives: an AF_UNIX datagram socket.

    `path` is a file (reachable from any network namespace) or, starting with
    '@', an abstract name (first byte NUL), as systemd allows. `messages`:
    (time.time() at receipt, "KEY=value") for each line of each datagram.

        sock = NotifySocket(tmp_path / "notify.sock")   # env NOTIFY_SOCKET=sock.path
        t, _ = sock.wait("READY=1", 20)                 # a prefix or a predicate(text)
        sock.lines("STATUS=")[-1]; sock.times("WATCHDOG=1"); sock.close()
    """

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self.path.startswith("@"):
            self.sock.bind("\0" + self.path[1:])
        else:
            if os.path.exists(self.path):
                os.unlink(self.path)
            self.sock.bind(self.path)
        self.messages = []
        self._drained = set()
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="notify")
        self._thread.start()

    def _run(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if self._closed:
                return
            t = time.time()
            with self._cond:
                for text in data.decode("utf-8", "replace").split("\n"):
                    if text.startswith(self._DRAIN):
                        self._drained.add(text)
                    elif text:
                        self.messages.append((t, text))
                self._cond.notify_all()

    def lines(self, prefix=""):
        with self._cond:
            return [text for _, text in self.messages if text.startswith(prefix)]

    def times(self, line):
        """Arrival times of the messages equal to `line`."""
        with self._cond:
            return [t for t, text in self.messages if text == line]

    def find(self, match, since=0.0):
        """(time, text) of the first message at or after `since` that starts with
        `match` (a string) or satisfies it (a predicate), else None."""
        test = match if callable(match) else (lambda text: text.startswith(match))
        with self._cond:
            for t, text in self.messages:
                if t >= since and test(text):
                    return t, text
        return None

    def wait(self, match, timeout, since=0.0):
        """Wait for find(match, since); raise WaitTimeout naming what did arrive."""
        with self._cond:
            found = self._cond.wait_for(lambda: self.find(match, since), timeout)
            if not found:
                raise WaitTimeout("no %s on %s within %.1fs; got %s"
                                  % (getattr(match, "__name__", match), self.path, timeout,
                                     [text for _, text in self.messages][-15:]))
        return found

    def last_status(self):
        with self._cond:
            for _, text in reversed(self.messages):
                if text.startswith("STATUS="):
                    return text[len("STATUS="):]
        return None

    _DRAIN = "X-TEST-DRAIN="

    def drain(self, timeout=5.0):
        """Return once every datagram sent before this call has been read (a
        marker sent to ourselves comes after them): lines() is then complete."""
        marker = "%s%d-%f" % (self._DRAIN, threading.get_ident(), time.monotonic())
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(marker.encode(), self.sock.getsockname())
        with self._cond:
            if not self._cond.wait_for(lambda: marker in self._drained, timeout):
                raise WaitTimeout("%s: reader thread not draining the socket" % self.path)

    def close(self):
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the reader's recv()
        except OSError:
            pass
        self._thread.join(5)
        self.sock.close()
        if not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except OSError:
                pass
