"""sd_notify as systemd sees it (SPEC §6), with a NOTIFY_SOCKET of the test's own.

The real systemd unit is tested in a container elsewhere; this checks the
messages themselves quickly: READY=1, STATUS= wording, WATCHDOG=1 cadence
while leading and following, STOPPING=1.
"""

import socket
import threading
import time

import pytest

from consul_agent import wait_for

pytestmark = pytest.mark.consul


class NotifySocket:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []          # (monotonic time, "KEY=value")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            t = time.monotonic()
            for line in data.decode("utf-8", "replace").splitlines():
                self.messages.append((t, line))

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def values(self, name):
        return [m.split("=", 1)[1] for _, m in list(self.messages) if m.startswith(name + "=")]

    def times(self, line):
        return [t for t, m in list(self.messages) if m == line]

    def wait(self, predicate, timeout, message):
        return wait_for(lambda: any(predicate(m) for _, m in list(self.messages)), timeout,
                        message="%s; got %s" % (message, [m for _, m in self.messages][-15:]))


@pytest.fixture
def notify(tmp_path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


@pytest.fixture
def notify2(tmp_path):
    s = NotifySocket(tmp_path / "notify2.sock")
    yield s
    s.close()


def test_ready_status_watchdog_stopping(consul, key, electors, write_config, notify, notify2):
    config = write_config(consul.http_addr, key)
    wd = {"WATCHDOG_USEC": "3000000"}
    a = electors(["--vip-manager-config", config, "--hostname", "node-a"],
                 env=dict(wd, NOTIFY_SOCKET=notify.path), name="node-a")
    notify.wait(lambda m: m == "READY=1", 20, "READY=1")
    notify.wait(lambda m: m == "STATUS=leader: holding %s as node-a" % key, 20, "leader STATUS")
    b = electors(["--vip-manager-config", config, "--hostname", "node-b"],
                 env=dict(wd, NOTIFY_SOCKET=notify2.path), name="node-b")
    notify2.wait(lambda m: m == "STATUS=follower: leader is node-a", 20, "follower STATUS")
    # WATCHDOG=1 at about half of WatchdogSec, from leader and follower alike,
    # blocking queries or not: never a gap near the 3 s timeout.
    t0 = time.monotonic()
    while time.monotonic() - t0 < 7:
        assert a.alive and b.alive
        time.sleep(0.2)
    for s, e in ((notify, a), (notify2, b)):
        ticks = [t for t in s.times("WATCHDOG=1") if t >= t0 - 3]
        assert len(ticks) >= 3, "%s: WATCHDOG=1 at %s" % (e.name, ticks)
        gaps = [y - x for x, y in zip(ticks, ticks[1:])] + [time.monotonic() - ticks[-1]]
        assert max(gaps) < 2.8, "%s: watchdog gap %.2fs (WatchdogSec=3s)" % (e.name, max(gaps))
    a.terminate()
    assert a.wait(10) == 0
    notify.wait(lambda m: m == "STOPPING=1", 1, "STOPPING=1")
    notify2.wait(lambda m: m == "STATUS=leader: holding %s as node-b" % key, 20, "STATUS of the new leader")
    b.terminate()
    assert b.wait(10) == 0
    notify2.wait(lambda m: m == "STOPPING=1", 1, "STOPPING=1")


def test_status_while_waiting(consul, consul_factory, key, check_id, electors, write_config, notify, notify2):
    consul.register_ttl_check(check_id, status="critical")
    a = electors(["--vip-manager-config", write_config(consul.http_addr, key), "--hostname", "node-a",
                  "--check-id", check_id], env={"NOTIFY_SOCKET": notify.path}, name="crit")
    absent = consul_factory(start=False)           # ports nobody listens on
    b = electors(["--vip-manager-config", write_config(absent.http_addr, key), "--hostname", "node-b"],
                 env={"NOTIFY_SOCKET": notify2.path}, name="noconsul")
    notify.wait(lambda m: m.startswith("STATUS=waiting: check '%s' is critical" % check_id), 20,
                "waiting STATUS")
    notify.wait(lambda m: m == "READY=1", 1, "READY=1")
    # READY once the first attempt to reach Consul has finished, reached or not.
    notify2.wait(lambda m: m == "READY=1", 20, "READY=1 without Consul")
    notify2.wait(lambda m: m.startswith("STATUS=waiting for Consul at %s: " % absent.http_addr)
                 or m.startswith("STATUS=waiting for Consul at http://%s: " % absent.http_addr),
                 20, "waiting-for-Consul STATUS")
    consul.deregister_check(check_id)
    notify.wait(lambda m: m.startswith("STATUS=waiting: check '%s' is not registered" % check_id), 20,
                "not-registered STATUS")
    t0 = time.monotonic()
    for e in (a, b):
        e.terminate()
    for e in (a, b):
        assert e.wait(10) == 0
    assert time.monotonic() - t0 < 5, "a waiting elector was slow to stop"
