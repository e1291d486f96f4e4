"""The sd_notify protocol and journald fallbacks, without a systemd (SPEC §6).

The daemon runs as a subprocess against a real Consul agent, with
NOTIFY_SOCKET pointing at an AF_UNIX datagram socket this test binds (a path,
and an abstract '@' name), so what is checked is exactly what systemd would
receive: READY=1 once, after the configuration is valid (and after the first
attempt to reach Consul, reached or not); STATUS= telling the role in the
words of SPEC §6; WATCHDOG=1 at half of WATCHDOG_USEC, as leader and as
follower; STOPPING=1 on SIGTERM. Then the broken environments a daemon meets
in the wild (a foreign WATCHDOG_PID, garbage WATCHDOG_USEC, a NOTIFY_SOCKET
nobody listens on, JOURNAL_STREAM without a journald): it keeps working,
exits 0 on SIGTERM and says so once.

The real systemd unit is tested in a container (test_systemd_container.py).
"""

import os
import shutil
import time
import uuid

import pytest

from consul_agent import free_ports
from helpers import wait_for

pytestmark = pytest.mark.consul

ROLES = ("starting", "leader: ", "follower: ", "waiting", "cut off: ", "stopping", "stopped")


def args_for(config, name, *extra):
    return ["--vip-manager-config=%s" % config, "--hostname", name] + list(extra)


def stop(elector, sock=None):
    """SIGTERM, exit 0, and (with sock) exactly one STOPPING=1 before the exit."""
    elector.terminate()
    assert elector.wait(10) == 0
    if sock is not None:
        sock.drain()
        assert sock.lines("STOPPING=") == ["STOPPING=1"], sock.lines()


# --- READY and STATUS -----------------------------------------------------------

def test_ready_once_status_follows_role_stopping_on_sigterm(consul, key, write_config, notify_socket,
                                                            electors):
    config = write_config(consul.http_addr, key)
    sock_a, sock_b = notify_socket(), notify_socket(abstract=True)
    a = electors(args_for(config, "node-a"), env={"NOTIFY_SOCKET": sock_a.path}, name="node-a")
    sock_a.wait("STATUS=leader: holding %s as node-a" % key, 20)
    assert consul.kv_value(key) == "node-a"
    b = electors(args_for(config, "node-b"), env={"NOTIFY_SOCKET": sock_b.path}, name="node-b")
    sock_b.wait("STATUS=follower: leader is node-a", 20)
    sock_b.wait("READY=1", 20)  # sent just after the first attempt's STATUS (SPEC §6)
    assert sock_b.lines("READY=") == ["READY=1"]
    assert sock_b.lines("STOPPING") == []

    stop(a, sock_a)
    assert sock_a.lines("READY=") == ["READY=1"], "READY=1 is sent once per run"
    # The follower takes over and says so.
    sock_b.wait("STATUS=leader: holding %s as node-b" % key, 20)
    stop(b, sock_b)
    assert sock_b.lines("READY=") == ["READY=1"]
    # Every status names a role.
    for line in sock_a.lines("STATUS=") + sock_b.lines("STATUS="):
        assert line.split("=", 1)[1].startswith(ROLES), line
    assert consul.kv_get(key) is None, "the last leader deleted the key on SIGTERM"


def test_no_ready_on_configuration_error(consul, key, write_config, notify_socket, electors):
    sock = notify_socket()
    d = electors(args_for(write_config(consul.http_addr, key, dcs_type="etcd"), "node-a"),
                 env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "2000000"})
    assert d.wait(15) == 78
    sock.drain()
    assert sock.lines("READY=") == [], "READY=1 only once the configuration is valid"
    assert "etcd" in d.log()


def test_ready_when_consul_unreachable_and_status_says_why(key, write_config, notify_socket, electors):
    """READY=1 after the first attempt to reach Consul, even a failed one (SPEC §6)."""
    port = free_ports(1)[0]
    sock = notify_socket()
    d = electors(args_for(write_config("127.0.0.1:%d" % port, key), "node-a"),
                 env={"NOTIFY_SOCKET": sock.path})
    sock.wait("READY=1", 20)
    sock.wait("STATUS=waiting for Consul at 127.0.0.1:%d: " % port, 10)
    assert d.alive
    stop(d, sock)


def test_ready_and_status_while_waiting_for_the_health_check(consul, key, check_id, write_config,
                                                             notify_socket, electors):
    """--check-id critical, then deregistered: READY=1 all the same, STATUS says
    which check and why; a waiting elector stops at once."""
    consul.register_ttl_check(check_id, status="critical")
    sock = notify_socket()
    d = electors(args_for(write_config(consul.http_addr, key), "node-a", "--check-id", check_id),
                 env={"NOTIFY_SOCKET": sock.path}, name="crit")
    sock.wait("STATUS=waiting: check '%s' is critical" % check_id, 20)
    sock.wait("READY=1", 10)
    consul.deregister_check(check_id)
    sock.wait("STATUS=waiting: check '%s' is not registered" % check_id, 20)
    assert consul.kv_get(key) is None
    t0 = time.monotonic()
    stop(d, sock)
    assert time.monotonic() - t0 < 5, "a waiting elector was slow to stop"


# --- the watchdog ------------------------------------------------------------------

@pytest.mark.parametrize("role", ["leader", "follower"])
def test_watchdog_pings_at_half_of_watchdog_usec(consul, key, write_config, notify_socket, electors, role):
    config = write_config(consul.http_addr, key)
    if role == "follower":
        holder = electors(args_for(config, "node-x"), name="node-x")
        wait_for(lambda: consul.kv_value(key), 15, message="node-x to lead")
    sock = notify_socket()
    # 3 s: pings due every 1.5 s. The loop's own work (renewals every few
    # seconds, blocking queries up to a minute) must not delay them.
    # WATCHDOG_PID is the daemon's own PID, as systemd sets it.
    d = electors(args_for(config, "node-a"), env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "3000000"},
                 wrapper=["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"], name="node-a")
    sock.wait("READY=1", 20)
    wait_for(lambda: len(sock.times("WATCHDOG=1")) >= 6, 30, message="6 watchdog pings")
    pings = sock.times("WATCHDOG=1")
    gaps = [y - x for x, y in zip(pings, pings[1:])]
    assert max(gaps) < 2.7, "a ping came late enough to be killed by systemd: %s" % gaps
    assert 0.9 < sum(gaps) / len(gaps) < 2.1, "pings not at half of WATCHDOG_USEC: %s" % gaps
    assert min(gaps) > 0.45, "pings much more often than needed: %s" % gaps
    assert sock.last_status().startswith(role + ": "), sock.lines("STATUS=")
    stop(d, sock)
    if role == "follower":
        stop(holder)


def test_watchdog_pid_of_another_process_is_not_ours(consul, key, write_config, notify_socket, electors):
    sock = notify_socket()
    d = electors(args_for(write_config(consul.http_addr, key), "node-a"),
                 env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    sock.wait("STATUS=leader: holding %s as node-a" % key, 20)
    # Pings would be due every 0.5 s; as leader the loop turns several times in 3 s.
    time.sleep(3)
    assert sock.lines("WATCHDOG=") == []
    stop(d, sock)


# --- the daemon keeps working in broken environments, and says so once -----------

def _works_then_stops(consul, key, d, sock=None, name="node-a"):
    wait_for(lambda: consul.kv_value(key) == name, 15, message="%s to hold %s" % (name, key))
    assert d.alive
    stop(d, sock)
    assert consul.kv_get(key) is None


@pytest.mark.parametrize("value", ["garbage", "0", "-5", ""])
def test_bad_watchdog_usec_is_ignored_with_one_warning(consul, key, write_config, notify_socket, electors,
                                                       value):
    sock = notify_socket()
    d = electors(args_for(write_config(consul.http_addr, key), "node-a"),
                 env={"NOTIFY_SOCKET": sock.path, "WATCHDOG_USEC": value})
    sock.wait("READY=1", 20)
    _works_then_stops(consul, key, d, sock)
    assert sock.lines("WATCHDOG=") == []
    assert d.log().count("WATCHDOG_USEC") == 1, d.log()


def test_notify_socket_nobody_listens_on(consul, key, write_config, tmp_path, electors):
    for target in (str(tmp_path / "no-such.sock"), "@vip-elector-nobody-%s" % uuid.uuid4().hex):
        d = electors(args_for(write_config(consul.http_addr, key), "node-a"),
                     env={"NOTIFY_SOCKET": target, "WATCHDOG_USEC": "1000000"})
        _works_then_stops(consul, key, d)
        warnings = [line for line in d.log().splitlines() if "NOTIFY_SOCKET" in line]
        assert len(warnings) == 1, d.log()


def test_journal_stream_without_journald_falls_back_to_stderr(consul, key, write_config, electors):
    """JOURNAL_STREAM says stderr is the journal, but no journald listens on
    /run/systemd/journal/socket: lines go to stderr, with one warning."""
    wrapper = []
    if os.path.exists("/run/systemd/journal/socket"):
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("a journald runs here and hiding it needs root (unshare -m)")
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs /run/systemd/journal && exec "$@"', "hide-journald"]
    d = electors(args_for(write_config(consul.http_addr, key), "node-a"), wrapper=wrapper,
                 journal_stream=True)
    _works_then_stops(consul, key, d)
    log = d.log()
    assert "LOCK ACQUIRED" in log, log
    # (the key is named after this test: it says "journal" too)
    journald_warnings = [line for line in log.splitlines() if "journal" in line.replace(key, "").lower()]
    assert len(journald_warnings) == 1, log
