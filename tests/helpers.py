"""The test harness's shared pieces (no vip_elector imports): one of each.

    wait_for(condition, timeout, message=...)   poll a condition with a deadline
    stays_alive(procs, seconds, check=None)     "still running (and check holds) for N s"
    Process(name, argv, ...).start()            a child process, its output read line by line
    KeyWatcher(consul, key)                     every state of a key, through blocking queries
    no_internal_errors(*procs_or_texts)         SPEC §9.1: a bug is logged, and fails the test
    NotifySocket(path)                          systemd's end of NOTIFY_SOCKET

tests/elector_process.py's `Elector` is a Process running vip-elector;
tests/vipnet.py starts its processes (Consul, vip-manager, electors, `ip
monitor`) as Processes inside a network namespace.
"""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from typing import Callable, NamedTuple, Optional

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class WaitTimeout(AssertionError, TimeoutError):
    """A deadline passed: a failed assertion for pytest, a TimeoutError for
    the tools (tests/tools/bench, demo) that catch that."""


def wait_for(condition, timeout, message="condition", interval=0.05):
    """Poll condition() until it returns a true value; return that value.

    Raises WaitTimeout (an AssertionError and a TimeoutError) naming `message`
    when the deadline passes.
    Exceptions from condition() count as "not yet" (the last is reported).
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - polling through transient errors
            last_exc = exc
        if time.monotonic() >= deadline:
            extra = " (last error: %r)" % (last_exc,) if last_exc else ""
            raise WaitTimeout("timed out after %.1fs waiting for %s%s"
                              % (timeout, message, extra))
        time.sleep(interval)


def stays_alive(procs, seconds, check=None, interval=0.1):
    """For `seconds`, every process in `procs` keeps running and `check()` (if
    given; it asserts by itself) keeps holding: the time is the condition here,
    so this polls to the end. Fails naming the process that exited, with its log."""
    procs = [procs] if isinstance(procs, Process) else list(procs)
    end = time.monotonic() + seconds
    while True:
        for p in procs:
            assert p.alive, "%s exited (%s) while it should stay up:\n%s" % (
                p.name, p.returncode, p.tail(40))
        if check is not None:
            check()
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval, left))


INTERNAL_ERROR = "internal error"


def internal_errors(*sources):
    """Lines saying `internal error` in processes' logs or in texts (a journal)."""
    found = []
    for source in sources:
        text = source.log() if isinstance(source, Process) else str(source)
        name = source.name if isinstance(source, Process) else "log"
        found += ["%s: %s" % (name, line) for line in text.splitlines() if INTERNAL_ERROR in line]
    return found


def no_internal_errors(*sources):
    """SPEC §9.1: a bug in a step is logged and retried, never fatal — and never
    silent in a test: any daemon that took that path fails the test that ran it."""
    found = internal_errors(*sources)
    assert not found, "logged an internal error:\n" + "\n".join(found[:20])


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


# --- processes -------------------------------------------------------------------

class Line(NamedTuple):
    """One line of a Process's output."""
    index: int     # its position in Process.lines
    t: float       # time.time() when it was read
    text: str


def _matches(pattern, text):
    """A substring, a compiled regex or a predicate."""
    if callable(pattern):
        return pattern(text)
    if isinstance(pattern, re.Pattern):
        return pattern.search(text)
    return pattern in text


def _describe(pattern):
    return getattr(pattern, "pattern", None) or getattr(pattern, "__name__", None) or pattern


class Process:
    """A child process whose output is read line by line by a thread.

        p = Process("vip-manager-a", argv, log_path=..., merge_output=True).start()
        p.wait_for_line(re.compile(r"state is (true|false)"), 10)   # -> Line(index, t, text)
        n = len(p.lines); p.send(signal.SIGHUP); p.wait_for_line("reloaded", 10, since=n)
        p.stop(timeout=10)          # SIGTERM, then SIGKILL: the exit status

    `lines` are the texts of its stderr lines (merge_output=True: of stdout and
    stderr together), `stamps` the time.time() each was read; `stdout_lines`
    its stdout when not merged. A pattern is a substring, a compiled regex or a
    predicate; `since` is a line index (len(p.lines) before an action), `after`
    a time.time(). With `log_path`, each line is appended there with its time;
    `on_line(proc, t, text)` is called from the reader thread for every line.
    It runs in a session of its own; `preexec_fn` and `pass_fds` are the
    caller's (tests/vipnet.py: a network namespace, PR_SET_PDEATHSIG).
    journal_stream=True: JOURNAL_STREAM names its stderr (the pipe's
    device:inode), as systemd sets it when stderr is connected to the journal.
    """

    def __init__(self, name: str, argv, *, env=None, cwd=None, log_path: Optional[str] = None,
                 merge_output: bool = False, on_line: Optional[Callable] = None,
                 preexec_fn: Optional[Callable] = None, pass_fds=(), journal_stream: bool = False):
        self.name = name
        self.argv = list(argv)
        self.env, self.cwd, self.log_path = env, cwd, log_path
        self.merge_output = merge_output
        self.on_line = on_line
        self.preexec_fn, self.pass_fds = preexec_fn, tuple(pass_fds)
        self.journal_stream = journal_stream
        self.popen: Optional[subprocess.Popen] = None
        self.lines: list = []
        self.stamps: list = []
        self.stdout_lines: list = []
        self.started_at: Optional[float] = None    # time.time()
        self.exited_at: Optional[float] = None     # time.time() its exit was seen
        self._output_done = False                  # its output read to the end, it reaped
        self._cond = threading.Condition()
        self._threads: list = []

    def start(self) -> "Process":
        env = dict(self.env) if self.env is not None else None
        stderr = subprocess.STDOUT if self.merge_output else subprocess.PIPE
        read_end = None
        if self.journal_stream:
            read_end, stderr = os.pipe()
            st = os.fstat(stderr)
            env = dict(os.environ if env is None else env, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        try:
            self.popen = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                                          pass_fds=self.pass_fds, preexec_fn=self.preexec_fn)
        finally:
            if read_end is not None:
                os.close(stderr)
        if read_end is not None:
            self.popen.stderr = os.fdopen(read_end, "rb")
        self.started_at = time.time()
        main = self.popen.stdout if self.merge_output else self.popen.stderr
        self._spawn(self._read_main, main)
        if not self.merge_output:
            self._spawn(self._read_stdout, self.popen.stdout)
        return self

    def _spawn(self, target, stream):
        t = threading.Thread(target=target, args=(stream,), daemon=True, name="reader-" + self.name)
        t.start()
        self._threads.append(t)

    def _read_main(self, stream):
        log = open(self.log_path, "a", encoding="utf-8", errors="replace") if self.log_path else None
        try:
            for raw in iter(stream.readline, b""):
                t = time.time()
                text = raw.decode("utf-8", "replace").rstrip("\n")
                if log:
                    log.write("%.6f %s\n" % (t, text))
                    log.flush()
                with self._cond:
                    self.lines.append(text)
                    self.stamps.append(t)
                    self._cond.notify_all()
                if self.on_line:
                    self.on_line(self, t, text)
        finally:
            stream.close()
            if log:
                log.close()
        self.popen.wait()
        with self._cond:
            self._output_done = True
            self.exited_at = self.exited_at or time.time()
            self._cond.notify_all()

    def _read_stdout(self, stream):
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.stdout_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()

    # ----------------------------------------------------------------- process

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.popen is None else self.popen.poll()

    def send(self, sig):
        if self.alive:
            self.popen.send_signal(sig)

    def terminate(self):
        self.send(signal.SIGTERM)

    def kill(self):
        self.send(signal.SIGKILL)

    def wait(self, timeout=None) -> int:
        """Exit status; WaitTimeout (with the log) if still running after timeout."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout("%s still running %.1fs after wait started; log:\n%s"
                              % (self.name, timeout, self.tail(60))) from None
        self._join_main_reader()
        return status

    def _join_main_reader(self):
        """After the exit: let the reader see the end of the output, so that
        `lines` is complete and `exited_at` is the precise moment the output
        ended (tests/tools/bench times exits by it); a grandchild that keeps the
        pipe open only delays this 5 s, then the exit as seen now counts."""
        if self._threads and self._threads[0] is not threading.current_thread():
            self._threads[0].join(5)
        with self._cond:
            self.exited_at = self.exited_at or time.time()

    def stop(self, timeout=10, sig=signal.SIGTERM) -> Optional[int]:
        """Signal, wait up to timeout, then SIGKILL; return the exit status."""
        if self.popen is None:
            return None
        if self.alive:
            self.send(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.wait()
        for t in self._threads:
            t.join(5)
        return self.popen.returncode

    def reap(self):
        """Kill it if it still runs, reap it and its readers (teardown)."""
        self.stop(timeout=0, sig=signal.SIGKILL)

    # --------------------------------------------------------------------- log

    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def tail(self, n=30) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def _find(self, pattern, since, after):
        for i in range(since, len(self.lines)):
            if (after is None or self.stamps[i] >= after) and _matches(pattern, self.lines[i]):
                return Line(i, self.stamps[i], self.lines[i])
        return None

    def find_line(self, pattern, since=0, after=None) -> Optional[Line]:
        """The first line at or after index `since` (and time `after`) matching pattern."""
        with self._cond:
            return self._find(pattern, since, after)

    def wait_for_line(self, pattern, timeout, since=0, after=None) -> Line:
        """Wait for find_line(...); WaitTimeout (with the log) at the deadline or
        when the process has exited without printing it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self._find(pattern, since, after)
                if found:
                    return found
                if self._output_done:
                    raise WaitTimeout("%s exited (%s) before a line matching %r; log:\n%s"
                                      % (self.name, self.popen.returncode, _describe(pattern),
                                         "\n".join(self.lines[-60:])))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout("%s: no line matching %r within %.1fs (alive=%s); log:\n%s"
                                      % (self.name, _describe(pattern), timeout, self.alive,
                                         "\n".join(self.lines[-60:])))
                self._cond.wait(min(remaining, 0.5))


# --- the key ---------------------------------------------------------------------

class KeyWatcher:
    """Every state of one key, seen through blocking queries: (t, value, session, index).

    `consul` is any tests/consul_agent.py ConsulAPI (a ConsulAgent, or
    tests/vipnet.py's ConsulHTTP over a unix socket). value is None when the
    key is absent. States shorter than a round trip can be missed (a blocking
    query reports the latest state); the time of each state (time.time()) is
    when the answer arrived, an upper bound on when it began. A renewal does
    not change the key, so a steady leader is one state.

        with KeyWatcher(consul, key) as w:      # or w = KeyWatcher(...); ...; w.close()
            ...
        w.wait(lambda s: s[1] == "node-b" and s[2], 10, since=t0)
        w.history; w.current(); w.values_between(t0, t1)
    """

    def __init__(self, consul, key):
        self.consul = consul
        self.key = key
        self.history = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="key-watcher")
        self._thread.start()
        wait_for(lambda: self.history, 30, interval=0.01, message="first answer about the key")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self):
        index = 0
        while not self._stop.is_set():
            try:
                status, headers, data = self.consul.request(
                    "GET", "/v1/kv/" + self.key, params={"index": index, "wait": "5s"}, timeout=15)
            except (OSError, http.client.HTTPException):
                index = 0
                self._stop.wait(0.005)
                continue
            t = time.time()
            if status not in (200, 404):
                index = 0
                self._stop.wait(0.005)
                continue
            new_index = int(headers.get("X-Consul-Index", 0) or 0)
            if status == 200:
                entry = json.loads(data)[0]
                value = base64.b64decode(entry["Value"]).decode() if entry.get("Value") else ""
                state = (value, entry.get("Session"), entry["ModifyIndex"])
            else:
                state = (None, None, 0)
            with self._cond:
                if not self.history or self.history[-1][1:] != state:
                    self.history.append((t,) + state)
                    self._cond.notify_all()
            index = new_index if new_index >= index else 0

    def current(self):
        with self._cond:
            return self.history[-1] if self.history else None

    def states_since(self, t):
        """The states that began at or after time t (time.time())."""
        with self._cond:
            return [s for s in self.history if s[0] >= t]

    def wait(self, predicate, timeout, since=None, message="key state"):
        """Wait for a state (t, value, session, index) matching predicate: the
        current one (since=None) or the first seen at or after `since`."""
        def found():
            if since is None:
                return self.history and predicate(self.history[-1]) and self.history[-1]
            for state in self.history:
                if state[0] >= since and predicate(state):
                    return state
            return None
        with self._cond:
            result = self._cond.wait_for(found, timeout)
            if not result:
                raise WaitTimeout("%s not seen in %.1fs; key now %r"
                                  % (message, timeout, self.history[-1] if self.history else None))
        return result

    def values_between(self, start, end):
        """Values the key held in [start, end] (including the one current at start)."""
        with self._cond:
            out, before = set(), None
            for t, value, _, _ in self.history:
                if t <= start:
                    before = value
                elif t <= end:
                    out.add(value)
            out.add(before)
            return out

    def close(self):
        self._stop.set()
