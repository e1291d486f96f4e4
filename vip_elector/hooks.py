"""Leadership hooks (SPEC §10): tell an operator's program when this node leads.

The election loop calls :meth:`Hooks.announce` whenever the node's state
changes and never waits: a worker thread runs ``PATH STATE KEY VALUE``.

Contract (SPEC §10.2–§10.3), and how it is kept here:

- Level-triggered. The first announcement after start always gets a call (the
  daemon just started or re-executed: the hook cannot know the state); after
  that a state equal to the one last called (or being called) is not called
  again. Hooks must be idempotent.
- One wanted state, the latest. ``announce`` overwrites it; the worker takes
  it when the previous call is over. A state superseded before its call could
  start is therefore skipped, and the latest always gets its call.
- Calls never overlap and run in order: there is one worker.
- Bounded. A call running longer than the timeout gets SIGTERM, then SIGKILL
  2 s later, sent to its whole process group (it runs in a session of its
  own), so children that outlive it go too; the hook is always reaped. Its
  output is logged line by line under its name, with a bound on line length
  and on lines per call; the rest is drained and counted, never buffered.
- Fresh at every call: the file is looked at again (replaced, removed or made
  unsafe on disk: the next call sees it; a call that cannot start is one
  error line, never a crash).
- The hook does not get the daemon's environment: that holds the Consul
  token (``CONSUL_HTTP_TOKEN``) and TLS key paths. It gets a fixed ``PATH``,
  the locale and time zone, and the ``VIP_ELECTOR_*`` variables. Its stdin is
  ``/dev/null``, its working directory ``/``, its signal mask empty.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import signals
from .config import ConfigError

log = logging.getLogger("vip_elector")

LEADER = "leader"
STANDBY = "standby"

#: SIGTERM first; SIGKILL this long after (SPEC §10.3).
KILL_AFTER = 2.0
#: Output bounds per call: what a journal reader can use, not what a broken hook prints.
MAX_LINE = 1024
MAX_LINES = 200
#: Environment passed through from the daemon's own (nothing secret in these).
PASSED_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ")
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def validate_hook(path: str) -> str:
    """The hook's absolute path, or ConfigError naming --hook (SPEC §10.1).

    A hook may run with privileges (the fencing example removes an address),
    so only root or the daemon's own user may own it, and nobody else may
    write it or replace it in its directory.
    """
    full = os.path.abspath(path)
    try:
        st = os.stat(full)
    except FileNotFoundError:
        raise ConfigError(f"--hook {path}: no such file; give the path of an executable hook") from None
    except OSError as e:
        raise ConfigError(f"--hook {path}: cannot be read ({e.strerror}); "
                          f"give a path vip-elector's user can reach") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"--hook {path}: not a regular file; give the path of an executable program")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"--hook {path}: owned by uid {st.st_uid}, not by root or the user "
                          f"vip-elector runs as; fix: chown root: {path}; chmod 0755 {path}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"--hook {path}: writable by group or others, who could change what "
                          f"vip-elector runs; fix: chown root: {path}; chmod 0755 {path}")
    if not os.access(full, os.X_OK) or not st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        raise ConfigError(f"--hook {path}: not executable by vip-elector's user; fix: chmod 0755 {path}")
    parent = os.path.dirname(full)
    try:
        pst = os.stat(parent)
    except OSError:
        pst = None
    if pst is not None and pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
        raise ConfigError(f"--hook {path}: its directory {parent} is writable by group or others, "
                          f"who could replace the hook; put it in a directory only root can write "
                          f"(e.g. /etc/vip-elector/) or chmod go-w {parent}")
    return full


@dataclass(frozen=True)
class _Call:
    state: str
    reason: str
    session: str


class Hooks:
    """Runs the hook for each state change, never blocking the caller.

    ``announce`` is level-triggered: a state equal to the last one announced is
    ignored; calls never overlap and run in order; a state superseded before
    its call started is skipped. With ``path`` None every method is a no-op.
    """

    def __init__(self, path: Optional[str], timeout: float, key: str, value: str,
                 report: Optional[Callable[[str, str], None]] = None):
        self.path, self.timeout, self.key, self.value = path, timeout, key, value
        #: Told how each call ended: (state, ok|failed|killed|not_run), for the metrics.
        self.report = report or (lambda state, result: None)
        self.name = os.path.basename(path) if path else ""
        self._cond = threading.Condition()
        self._wanted: Optional[_Call] = None   # the latest state not yet started
        self._last: Optional[str] = None       # the state last called or being called
        self._busy = False
        self._closing = False
        self._proc: Optional[subprocess.Popen] = None
        self._term_by: Optional[float] = None  # set by finish(): the stop's budget
        self._kill_by: Optional[float] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ API

    def announce(self, state: str, reason: str, session: str = "") -> None:
        """Queue a call for ``state`` (LEADER or STANDBY); returns at once."""
        if not self.path:
            return
        with self._cond:
            if self._closing:
                return
            if self._wanted is not None and self._wanted.state != state:
                log.debug("hook %s: %s superseded by %s before its call started",
                          self.name, self._wanted.state, state)
            self._wanted = _Call(state, reason, session or "")
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="hook", daemon=True)
                self._thread.start()

    def finish(self, deadline: float) -> None:
        """Let queued calls run until ``deadline`` (time.monotonic()); then kill what runs.

        For a planned stop: the ``standby`` call gets what remains of the
        budget. A call still running near the deadline gets SIGTERM, then
        SIGKILL, both before the deadline. Never raises.
        """
        if not self.path:
            return
        try:
            now = time.monotonic()
            grace = min(KILL_AFTER, max(0.0, deadline - now) / 2)
            with self._cond:
                self._term_by = deadline - grace
                self._kill_by = deadline - min(0.05, grace / 2)
                self._cond.notify_all()
                while (self._wanted is not None or self._busy) and self._thread is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._proc is not None:
                    _kill_group(self._proc, signal.SIGKILL)
                # The budget was for this stop (or reload) only: if the
                # daemon carries on, later calls get their full timeout.
                self._term_by = self._kill_by = None
        except Exception:
            log.exception("internal error in the hook runner")

    def close(self) -> None:
        """Stop the worker; a running hook gets SIGTERM, then SIGKILL 0.5 s later."""
        if not self.path:
            return
        try:
            with self._cond:
                self._closing = True
                self._wanted = None
                self._cond.notify_all()
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(KILL_AFTER + 1)
        except Exception:
            log.exception("internal error in the hook runner")

    # --------------------------------------------------------------- worker

    def _work(self) -> None:
        # Process-directed signals are the main thread's business (the
        # election loop's wakeup fd, the re-exec's blocked mask): never here.
        signal.pthread_sigmask(signal.SIG_BLOCK, _catchable_signals())
        while True:
            try:
                call = self._next()
                if call is None:
                    return
                try:
                    self._run(call)
                finally:
                    with self._cond:
                        self._busy = False
                        self._proc = None
                        self._cond.notify_all()
            except Exception:
                log.exception("internal error in the hook runner")
                time.sleep(0.1)

    def _next(self) -> Optional[_Call]:
        """The next state to call, or None when closing."""
        with self._cond:
            while True:
                while self._wanted is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                call, self._wanted = self._wanted, None
                if call.state == self._last:
                    continue  # level-triggered: already called (or superseded back)
                self._last = call.state
                self._busy = True
                return call

    def _environment(self, call: _Call) -> dict[str, str]:
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(PATH=HOOK_PATH,
                   VIP_ELECTOR_STATE=call.state, VIP_ELECTOR_KEY=self.key,
                   VIP_ELECTOR_VALUE=self.value, VIP_ELECTOR_SESSION=call.session,
                   VIP_ELECTOR_REASON=call.reason)
        return env

    def _run(self, call: _Call) -> None:
        what = f"hook {self.name} {call.state}"
        try:
            path = validate_hook(self.path)
        except ConfigError as e:
            log.error("%s: not run: %s", what, str(e).replace("--hook ", "", 1))
            self.report(call.state, "not_run")
            return
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [path, call.state, self.key, self.value], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self._environment(call),
                cwd="/", close_fds=True, start_new_session=True, preexec_fn=signals.unblock)
        except OSError as e:
            log.error("%s: cannot run %s: %s", what, path, e.strerror or e)
            self.report(call.state, "not_run")
            return
        with self._cond:
            self._proc = proc
        log.info("%s: started (%s)", what, call.reason or "no reason given")
        try:
            self._supervise(proc, what, started)
        finally:
            # Whatever happened above, nothing of this call survives it. The
            # hook is not reaped yet (waitid WNOWAIT), so its PID still names
            # its group: no signal can reach a stranger that reused the PID.
            with self._cond:
                _kill_group(proc, signal.SIGKILL)
                self._proc = None
            _reap(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        self.report(call.state, self._log_exit(proc, what, started))

    def _supervise(self, proc: subprocess.Popen, what: str, started: float) -> None:
        """Log its output until it exits (and its group is gone); enforce the deadlines."""
        out = _OutputLog(self.name)
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        term_sent: Optional[float] = None
        kill_sent = False
        exited_at: Optional[float] = None
        eof = False
        while True:
            now = time.monotonic()
            with self._cond:
                term_by = min(started + self.timeout, self._term_by or float("inf"))
                kill_by = self._kill_by or float("inf")
                if self._closing:  # close(): a short grace, then it goes
                    term_by = min(term_by, now)
                    kill_by = min(kill_by, (term_sent or now) + 0.5)
            if exited_at is None and _exited(proc):
                exited_at = now
                # Its children may still run and hold the pipe: they go with it.
                _kill_group(proc, signal.SIGKILL)
            if exited_at is None:
                if term_sent is None and now >= term_by:
                    log.warning("%s: still running after %.1f s, sending SIGTERM", what, now - started)
                    _kill_group(proc, signal.SIGTERM)
                    term_sent = now
                if not kill_sent and (now >= kill_by or (
                        term_sent is not None and now >= term_sent + KILL_AFTER)):
                    log.warning("%s: still running after %.1f s, sending SIGKILL", what, now - started)
                    _kill_group(proc, signal.SIGKILL)
                    kill_sent = True
            elif eof or now > exited_at + 1.0:
                break  # done; or a process outside its group holds the pipe: stop reading
            wake = [now + 0.05]
            if exited_at is None and not kill_sent:
                wake += [term_by if term_sent is None else term_sent + KILL_AFTER, kill_by]
            timeout = max(0.0, min(wake) - now)
            if eof:
                time.sleep(timeout)
                continue
            readable, _, _ = select.select([fd], [], [], timeout)
            if readable:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if chunk:
                    out.feed(chunk)
                else:
                    eof = True
        out.close()

    def _log_exit(self, proc: subprocess.Popen, what: str, started: float) -> str:
        """Log how the call ended; return it in a word: ok, failed or killed."""
        ms = (time.monotonic() - started) * 1000
        code = proc.returncode
        if code == 0:
            log.info("%s: exited 0 after %.0f ms", what, ms)
            return "ok"
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            log.warning("%s: killed by %s after %.0f ms", what, name, ms)
            return "killed"
        log.warning("%s: exited %s after %.0f ms", what, code, ms)
        return "failed"


class _OutputLog:
    """Turns a hook's output into bounded log lines: ``hook NAME: LINE``."""

    def __init__(self, name: str):
        self.name = name
        self.buf = b""
        self.lines = 0
        self.dropped_lines = 0
        self.dropped_bytes = 0
        self.skip_rest = False  # inside a line already logged truncated

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE:
                    # A line with no end in sight: log its start, drop the rest.
                    if not self.skip_rest:
                        self._line(self.buf[:MAX_LINE], truncated=True)
                        self.dropped_bytes += len(self.buf) - MAX_LINE
                    else:
                        self.dropped_bytes += len(self.buf)
                    self.buf = b""
                    self.skip_rest = True
                return
            line, self.buf = self.buf[:nl], self.buf[nl + 1:]
            if self.skip_rest:
                self.dropped_bytes += len(line) + 1
                self.skip_rest = False
                continue
            self._line(line, truncated=len(line) > MAX_LINE)

    def _line(self, raw: bytes, truncated: bool) -> None:
        if self.lines >= MAX_LINES:
            self.dropped_lines += 1
            self.dropped_bytes += len(raw) + 1
            return
        self.lines += 1
        if truncated:
            self.dropped_bytes += max(0, len(raw) - MAX_LINE)
        text = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        log.info("hook %s: %s%s", self.name, text, " [...]" if truncated else "")

    def close(self) -> None:
        if self.buf and not self.skip_rest:
            self._line(self.buf, truncated=len(self.buf) > MAX_LINE)
        self.buf = b""
        if self.dropped_lines or self.dropped_bytes:
            log.warning("hook %s: output too long: %d more lines (%d bytes) not logged",
                        self.name, self.dropped_lines, self.dropped_bytes)


def _catchable_signals() -> set:
    return set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the hook's process group (its PID: it leads its own session)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the hook has exited, without reaping it (its PID stays its group's)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(KILL_AFTER + 1)
    except subprocess.TimeoutExpired:
        log.error("hook %s: process %d survived SIGKILL", os.path.basename(proc.args[0]), proc.pid)
