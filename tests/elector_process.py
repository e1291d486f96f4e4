"""Run vip-elector as a subprocess, the way a user or systemd would.

    e = Elector(["--vip-manager-config", path, "--hostname", "node-a"]).start()
    e.wait_for_line("LOCK ACQUIRED", 20)     # -> Line(index, t, text)
    e.terminate(); assert e.wait(10) == 0
    e.reap()                     # always (the `electors` fixture does it)

An Elector is a tests/helpers.py Process: the same API as every process the
harness runs.

Every run is `/usr/bin/python3 -m vip_elector ARGS` with the repository root
as cwd and PYTHONPATH, an environment without CONSUL_* / VIP_* / NOTIFY_SOCKET
variables unless the test adds them, stderr read line by line by a thread.
$VIP_ELECTOR_TEST_PYTHONPATH and then the test run's own PYTHONPATH, when
set, are put before the repository root on PYTHONPATH (to run the suite with
another Consul library, e.g. the cache's py-consul or python-consul). $VIP_ELECTOR_TEST_SRC, when set, is the source
tree to run instead of this repository.
"""

import os
import subprocess

from helpers import Process

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


class Elector(Process):
    """vip-elector run from this tree (`python3 -m vip_elector ARGS`), a Process
    (tests/helpers.py) reading its stderr. wrapper: a command run before python,
    e.g. ["unshare", ...]; journal_stream: see Process."""

    def __init__(self, args, env=None, name="elector", wrapper=(), journal_stream=False):
        self.args = list(args)
        super().__init__(name, list(wrapper) + [PYTHON, "-m", "vip_elector"] + self.args,
                         env=elector_env(env), cwd=REPO, journal_stream=journal_stream)
