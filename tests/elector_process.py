"""Run vip-elector as a subprocess, the way a user or systemd would.

    e = Elector(["--vip-manager-config", path, "--hostname", "node-a"]).start()
    e.wait_for_line("LOCK ACQUIRED", 20)
    e.terminate(); assert e.wait(10) == 0
    e.reap()                     # always (the `electors` fixture does it)

Every run is `/usr/bin/python3 -m vip_elector ARGS` with the repository root
as cwd and PYTHONPATH, an environment without CONSUL_* / VIP_* / NOTIFY_SOCKET
variables unless the test adds them, stderr read line by line by a thread.
$VIP_ELECTOR_TEST_PYTHONPATH and then the test run's own PYTHONPATH, when
set, are put before the repository root on PYTHONPATH (to run the suite with
another Consul library, e.g. the cache's py-consul or python-consul). $VIP_ELECTOR_TEST_SRC, when set, is the source
tree to run instead of this repository.
"""

import os
import re
import signal
import subprocess
import threading
import time

REPO = os.environ.get("VIP_ELECTOR_TEST_SRC") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = "/usr/bin/python3"


def elector_env(extra=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONSUL_", "VIP_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM",
                                "PYTHON"))}
    paths = [p for p in (os.environ.get("VIP_ELECTOR_TEST_PYTHONPATH"), os.environ.get("PYTHONPATH"), REPO)
             if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def run_elector(args, env=None, timeout=30, input=None):
    """Run to completion; a CompletedProcess with text stdout/stderr."""
    return subprocess.run([PYTHON, "-m", "vip_elector"] + list(args), cwd=REPO,
                          env=elector_env(env), capture_output=True, text=True,
                          timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


class Elector:
    """journal_stream=True: JOURNAL_STREAM names the daemon's stderr (the pipe's
    device:inode), as systemd sets it when stderr is connected to the journal."""

    def __init__(self, args, env=None, name="elector", wrapper=(), journal_stream=False):
        self.args = list(args)
        self.wrapper = list(wrapper)   # command run before python, e.g. ["unshare", ...]
        self.env = env
        self.name = name
        self.journal_stream = journal_stream
        self.proc = None
        self.lines = []           # stderr lines, in order
        self.stdout_lines = []
        self._cond = threading.Condition()
        self._threads = []
        self.started_at = None

    def start(self):
        env = elector_env(self.env)
        stderr = subprocess.PIPE
        if self.journal_stream:
            read_end, stderr = os.pipe()
            st = os.fstat(stderr)
            env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        try:
            self.proc = subprocess.Popen(self.wrapper + [PYTHON, "-m", "vip_elector"] + self.args,
                                         cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=stderr,
                                         start_new_session=True)
        finally:
            if self.journal_stream:
                os.close(stderr)
        if self.journal_stream:
            self.proc.stderr = os.fdopen(read_end, "rb")
        self.started_at = time.monotonic()
        for stream, sink in ((self.proc.stderr, self.lines), (self.proc.stdout, self.stdout_lines)):
            t = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _read(self, stream, sink):
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        stream.close()
        with self._cond:
            self._cond.notify_all()

    # ----------------------------------------------------------------- process

    @property
    def pid(self):
        return self.proc.pid

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def send(self, sig):
        if self.alive:
            self.proc.send_signal(sig)

    def terminate(self):
        self.send(signal.SIGTERM)

    def kill(self):
        self.send(signal.SIGKILL)

    def wait(self, timeout):
        """Exit status; AssertionError if still running after timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("%s still running %.1fs after wait started; log:\n%s"
                                 % (self.name, timeout, self.log()))

    def reap(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for t in self._threads:
            t.join(5)

    # --------------------------------------------------------------------- log

    def log(self):
        with self._cond:
            return "\n".join(self.lines)

    def _match(self, pattern, line):
        if callable(pattern):
            return pattern(line)
        if isinstance(pattern, re.Pattern):
            return pattern.search(line)
        return pattern in line

    def find_line(self, pattern, since=0):
        """Index of the first line at or after `since` matching pattern, else None."""
        with self._cond:
            for i in range(since, len(self.lines)):
                if self._match(pattern, self.lines[i]):
                    return i
        return None

    def wait_for_line(self, pattern, timeout, since=0):
        """Wait for a stderr line (substring, compiled regex or predicate); return (index, line)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(since, len(self.lines)):
                    if self._match(pattern, self.lines[i]):
                        return i, self.lines[i]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError("%s: no line matching %r within %.1fs (alive=%s); log:\n%s"
                                         % (self.name, getattr(pattern, "pattern", pattern), timeout,
                                            self.alive, "\n".join(self.lines)))
                if self.proc.poll() is not None and all(not t.is_alive() for t in self._threads):
                    raise AssertionError("%s exited (%s) before a line matching %r; log:\n%s"
                                         % (self.name, self.proc.returncode,
                                            getattr(pattern, "pattern", pattern), "\n".join(self.lines)))
                self._cond.wait(min(remaining, 0.5))
