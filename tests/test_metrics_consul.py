"""--metrics-address with the daemon against a real Consul agent (SPEC §11.6, issue 18).

The gauge follows a handover between two electors; counters move on Consul
errors injected by the fault proxy, on a session replacement and on hook
failures; a reload (re-execution) keeps serving on the same port and leaves
no listening socket behind; an unusable address is exit 78; --check says
whether the port can be bound.
"""

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from consul_agent import free_ports, wait_for
from elector_process import run_elector
from fault_proxy import RENEW, FaultProxy, status_500

pytestmark = pytest.mark.consul


def scrape(port, timeout=3):
    """{(name, frozenset(labels)): value}, or None when nothing answers."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open("http://127.0.0.1:%d/metrics" % port, timeout=timeout) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(port, name, **labels):
    got = scrape(port)
    return None if got is None else got.get((name, frozenset(labels.items())))


def wait_metric(port, name, test, timeout, **labels):
    """Poll until test(value) holds; the value."""
    seen = []

    def ok():
        v = metric(port, name, **labels)
        seen.append(v)
        return v is not None and test(v)
    try:
        wait_for(ok, timeout, interval=0.1, message="%s%s" % (name, labels))
    except Exception:
        raise AssertionError("%s%s never passed the test; last values %s" % (name, labels, seen[-5:]))
    return seen[-1]


def listening_sockets(pid, port):
    """Inodes of the TCP sockets in LISTEN on `port` that process `pid` has open."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(path).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    mine = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        if m and m.group(1) in inodes:
            mine.add(m.group(1))
    return mine


@pytest.fixture
def start(electors, write_config):
    def run(agent, key, name, port, addr=None, extra=()):
        config = write_config(agent.http_addr, key)
        args = ["--vip-manager-config", config, "--hostname", name,
                "--metrics-address", "127.0.0.1:%d" % port] + (["--addr", addr] if addr else []) + list(extra)
        e = electors(args, name=name)
        e.wait_for_line("serving metrics at http://127.0.0.1:%d/metrics" % port, 20)
        return e
    return run


def test_the_leader_gauge_follows_a_handover(consul, key, start):
    pa, pb = free_ports(2)
    a = start(consul, key, "node-a", pa)
    a.wait_for_line("LOCK ACQUIRED", 20)
    b = start(consul, key, "node-b", pb)
    b.wait_for_line("following", 20)
    wait_metric(pa, "vip_elector_leader", lambda v: v == 1, 5)
    wait_metric(pb, "vip_elector_leader", lambda v: v == 0, 5)
    assert metric(pb, "vip_elector_role", role="follower") == 1
    assert metric(pa, "vip_elector_info", version=metric_version(pa), key=key, value="node-a") == 1
    age = metric(pa, "vip_elector_session_confirmed_age_seconds")
    assert 0 <= age < 10, age  # a leader confirms at least every 1.5 s
    a.terminate()
    assert a.wait(10) == 0
    wait_metric(pb, "vip_elector_leader", lambda v: v == 1, 10)
    assert metric(pb, "vip_elector_transitions_total", to="leader") == 1
    assert metric(pb, "vip_elector_role", role="follower") == 0
    assert scrape(pa, timeout=1) is None, "a stopped daemon serves nothing"


def metric_version(port):
    for (name, labels), _ in scrape(port).items():
        if name == "vip_elector_info":
            return dict(labels)["version"]
    raise AssertionError("no vip_elector_info")


def test_consul_errors_and_a_session_replacement_are_counted(consul, key, start):
    (port,) = free_ports(1)
    proxy = FaultProxy(consul.http_addr).start()
    try:
        a = start(consul, key, "node-a", port, addr=proxy.addr)
        a.wait_for_line("LOCK ACQUIRED", 20)
        assert metric(port, "vip_elector_consul_errors_total", kind="server_error") == 0
        assert metric(port, "vip_elector_session_replacements_total") == 0
        rule = proxy.inject(status_500(), "PUT", RENEW, times=2)
        rule.wait_hits(2, 20)
        wait_metric(port, "vip_elector_consul_errors_total", lambda v: v >= 2, 10, kind="server_error")
        # Renewals failed, then one succeeded: the session is replaced in place (SPEC §9.4).
        a.wait_for_line("replaced by", 20)
        wait_metric(port, "vip_elector_session_replacements_total", lambda v: v == 1, 5)
        before = metric(port, "vip_elector_consul_errors_total", kind="unreachable")
        proxy.fail_all("refuse")
        wait_metric(port, "vip_elector_consul_errors_total", lambda v: v > before, 15, kind="unreachable")
        wait_metric(port, "vip_elector_leader", lambda v: v == 0, 15)  # cut off: not claiming
        proxy.heal()
        wait_metric(port, "vip_elector_leader", lambda v: v == 1, 20)
        assert metric(port, "vip_elector_transitions_total", to="cut-off") >= 1
        assert metric(port, "vip_elector_consul_errors_total", kind="denied") == 0
    finally:
        proxy.close()


def test_hook_failures_are_counted(consul, key, start, tmp_path):
    (port,) = free_ports(1)
    hook = tmp_path / "failing-hook"
    hook.write_text("#!/bin/sh\necho \"failing on purpose for $1\"\nexit 3\n")
    hook.chmod(0o755)
    a = start(consul, key, "node-a", port, extra=["--hook", str(hook)])
    a.wait_for_line("LOCK ACQUIRED", 20)
    a.wait_for_line("hook failing-hook leader: exited 3", 10)
    wait_metric(port, "vip_elector_hook_runs_total", lambda v: v == 1, 5, state="leader", result="failed")
    assert metric(port, "vip_elector_hook_runs_total", state="leader", result="ok") == 0


def test_a_reload_keeps_serving_on_the_same_port_and_leaves_no_socket_behind(consul, key, start):
    (port,) = free_ports(1)
    a = start(consul, key, "node-a", port)
    a.wait_for_line("LOCK ACQUIRED", 20)
    for _ in range(3):
        assert scrape(port) is not None  # connections in TIME_WAIT: SO_REUSEADDR must cope
    before = listening_sockets(a.pid, port)
    assert len(before) == 1, before
    n = len(a.lines)
    a.send(signal.SIGHUP)
    a.wait_for_line("reloaded", 20, since=n)
    a.wait_for_line("serving metrics at http://127.0.0.1:%d/metrics" % port, 10, since=n)
    wait_metric(port, "vip_elector_leader", lambda v: v == 1, 10)
    after = listening_sockets(a.pid, port)
    assert len(after) == 1 and not after & before, (before, after)  # the old one did not survive the exec
    # Twice: the re-executed program's own socket is not inherited by the next either.
    n = len(a.lines)
    a.send(signal.SIGHUP)
    a.wait_for_line("reloaded", 20, since=n)
    wait_metric(port, "vip_elector_leader", lambda v: v == 1, 10)
    assert len(listening_sockets(a.pid, port)) == 1
    assert "trying again every 5 s" not in a.log()


def test_an_unusable_address_is_a_configuration_error(consul, key, write_config):
    config = write_config(consul.http_addr, key)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        for address, words in (("127.0.0.1:%d" % port, "address already in use"),
                               ("127.0.0.1", "is not HOST:PORT"),
                               ("192.0.2.1:9101", "this host has no such address")):
            r = run_elector(["--vip-manager-config", config, "--hostname", "node-a",
                             "--metrics-address", address])
            assert r.returncode == 78, (address, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "--metrics-address" in lines[0] and words in lines[0], r.stderr
            assert consul.kv_get(key) is None, "nothing was taken"
    finally:
        holder.close()


def test_check_says_whether_the_port_can_be_bound(consul, key, start, write_config):
    (port,) = free_ports(1)
    config = write_config(consul.http_addr, key)
    args = ["--vip-manager-config", config, "--hostname", "node-a", "--metrics-address",
            "127.0.0.1:%d" % port, "--check"]
    r = run_elector(args)
    assert "ok    metrics: 127.0.0.1:%d can be listened on" % port in r.stdout, r.stdout
    assert r.returncode == 0, r.stdout
    a = start(consul, key, "node-a", port)
    a.wait_for_line("LOCK ACQUIRED", 20)
    r = run_elector(args)
    assert "ok    metrics: 127.0.0.1:%d is served by the running vip-elector for %s" % (port, key) in r.stdout
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        other = holder.getsockname()[1]
        r = run_elector(args[:-2] + ["127.0.0.1:%d" % other, "--check"])
        assert r.returncode == 1
        assert "FAIL  metrics: --metrics-address 127.0.0.1:%d: cannot listen there: address already in use" \
            % other in r.stdout, r.stdout
    finally:
        holder.close()
