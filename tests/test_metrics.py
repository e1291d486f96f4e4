"""vip_elector/metrics.py on its own (SPEC §11.6): the address, the numbers, the server.

No Consul here: tests/test_metrics_consul.py runs the daemon against a real agent.
"""

import errno
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vip_elector import consul as c
from vip_elector.config import ConfigError
from vip_elector.metrics import (Metrics, MetricsAddress, NullMetrics, bind, check_address,
                                 error_kind, parse_metrics_address, same_address)


def samples(text):
    """{(name, frozenset(labels)): value} of a scrape's text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text_or_samples, name, **labels):
    got = samples(text_or_samples) if isinstance(text_or_samples, str) else text_or_samples
    return got.get((name, frozenset(labels.items())))


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never $http_proxy


def scrape(address, path="/metrics", timeout=5):
    with DIRECT.open("http://%s%s" % (address, path), timeout=timeout) as r:
        return r.read().decode()


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def make(clock=None, hooks=True, process=False, vip=False):
    return Metrics("9.9", "service/pg/leader", "node-a", hooks=hooks, clock=clock or Clock(),
                   process=process, vip=vip)


# -- the address ---------------------------------------------------------------

@pytest.mark.parametrize("text, host, port", [
    ("127.0.0.1:9101", "127.0.0.1", 9101),
    ("[::1]:9101", "::1", 9101),
    ("[::]:9101", "::", 9101),
    ("localhost:65535", "localhost", 65535),
    (" 0.0.0.0:1 ", "0.0.0.0", 1),
])
def test_addresses_that_parse(text, host, port):
    a = parse_metrics_address(text)
    assert (a.host, a.port) == (host, port)
    assert parse_metrics_address(str(a)) == a


@pytest.mark.parametrize("text, words", [
    ("9101", "is not HOST:PORT"),
    ("127.0.0.1", "is not HOST:PORT"),
    ("::1:9101", "is not HOST:PORT"),
    ("[::1]", "is not HOST:PORT"),
    ("127.0.0.1:http", "is not HOST:PORT"),
    (":9101", "names no host"),
    ("127.0.0.1:0", "out of range"),
    ("127.0.0.1:70000", "out of range"),
    ("http://127.0.0.1:9101", "is not HOST:PORT"),
])
def test_malformed_addresses_are_one_sentence_naming_the_flag(text, words):
    with pytest.raises(ConfigError) as e:
        parse_metrics_address(text)
    assert str(e.value).startswith("--metrics-address ") and words in str(e.value)
    assert "\n" not in str(e.value)


def test_a_taken_port_names_the_flag_and_what_to_do():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as e:
            bind(MetricsAddress("127.0.0.1", port))
        text = str(e.value)
        assert text.startswith("--metrics-address 127.0.0.1:%d: cannot listen there: address "
                               "already in use" % port), text
        assert "each vip-elector instance needs its own" in text
        ok, line = check_address(MetricsAddress("127.0.0.1", port), "service/pg/leader")
        assert not ok and "address already in use" in line
    finally:
        holder.close()


def test_a_privileged_port_is_refused_in_words():
    """As the unit's unprivileged user would be (root here forks a child that drops to nobody)."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            if int(f.read()) <= 80:
                pytest.skip("this host lets anybody bind port 80")
    except OSError:
        pass
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only os._exit
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            try:
                bind(MetricsAddress("127.0.0.1", 80)).close()
                text = "bound"
            except ConfigError as e:
                text = str(e)
            os.write(write_end, text.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    out = b""
    while True:
        chunk = os.read(read_end, 4096)
        if not chunk:
            break
        out += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    out = out.decode()
    assert out.startswith("--metrics-address 127.0.0.1:80: cannot listen there: permission denied"), out
    assert "choose a port above 1024" in out


def test_an_address_this_host_does_not_have():
    with pytest.raises(ConfigError) as e:
        bind(MetricsAddress("192.0.2.1", 9101))  # TEST-NET-1: never local
    assert "this host has no such address" in str(e.value)


def test_same_address_compares_sockets():
    a = MetricsAddress("127.0.0.1", 9101)
    assert same_address(a, MetricsAddress("127.0.0.1", 9101))
    assert not same_address(a, MetricsAddress("127.0.0.1", 9102))
    assert not same_address(a, None)


# -- the numbers ---------------------------------------------------------------

def test_roles_drive_the_leader_gauge_the_role_gauge_and_transitions():
    m = make()
    text = m.exposition().decode()
    assert value(text, "vip_elector_info", version="9.9", key="service/pg/leader", value="node-a") == 1
    assert value(text, "vip_elector_leader") == 0
    assert value(text, "vip_elector_transitions_total", to="leader") == 0  # series exist from the start
    for role in ("starting", "follower", "follower", "leader", "leader", "cut-off", "leader"):
        m.role(role)
    got = samples(m.exposition().decode())
    assert value(got, "vip_elector_leader") == 1
    assert value(got, "vip_elector_transitions_total", to="leader") == 2  # repeats are not changes
    assert value(got, "vip_elector_transitions_total", to="follower") == 1
    assert value(got, "vip_elector_transitions_total", to="cut-off") == 1
    assert value(got, "vip_elector_transitions_total", to="starting") == 0  # where it began
    assert value(got, "vip_elector_role", role="leader") == 1
    assert sum(v for (n, _), v in got.items() if n == "vip_elector_role") == 1
    m.role("stopping")
    assert value(m.exposition().decode(), "vip_elector_leader") == 0


def test_the_session_age_is_computed_when_scraped():
    clock = Clock(1000.0)
    m = make(clock)
    assert value(m.exposition().decode(), "vip_elector_session_confirmed_age_seconds") == math.inf
    m.session_confirmed(998.5)
    assert value(m.exposition().decode(), "vip_elector_session_confirmed_age_seconds") == 1.5
    clock.t = 1030.0
    m.session_confirmed(None)  # no session now: the age keeps growing from the last confirmation
    assert value(m.exposition().decode(), "vip_elector_session_confirmed_age_seconds") == 31.5


def test_consul_errors_are_counted_by_kind():
    m = make()
    for error in (c.ConsulUnreachable("connection refused"), c.ConsulTimeout("no answer (timed out)"),
                  c.ConsulTimeout("no answer in time"), c.PermissionDenied("Permission denied"),
                  c._error_for(500, "rpc error making call: No cluster leader"),
                  c._error_for(429, "Your IP is issuing too many concurrent connections"),
                  c.ConsulError("unexpected answer"),
                  # answers, not faults:
                  c.InvalidSession("gone"), c.CheckNotPassing("Check 'x' is in critical state"),
                  c.RequestAbandoned("request abandoned")):
        m.consul_error(error)
    got = samples(m.exposition().decode())
    counts = {dict(labels)["kind"]: v for (n, labels), v in got.items()
              if n == "vip_elector_consul_errors_total"}
    assert counts == {"unreachable": 1, "timeout": 2, "denied": 1, "server_error": 1, "bad_answer": 2}


def test_error_kinds_follow_the_adapters_types():
    assert error_kind(c._error_for(403, "ACL not found")) == "denied"
    assert error_kind(c._error_for(500, "invalid session")) is None   # InvalidSession: an answer
    assert error_kind(c._error_for(503, "")) == "server_error"
    assert isinstance(c.ConsulTimeout("x"), c.ConsulUnreachable)      # the loop's handling is unchanged


def test_replacements_and_hook_runs_are_counted():
    m = make()
    m.session_replaced()
    m.hook_run("leader", "failed")
    m.hook_run("leader", "failed")
    m.hook_run("standby", "ok")
    got = samples(m.exposition().decode())
    assert value(got, "vip_elector_session_replacements_total") == 1
    assert value(got, "vip_elector_hook_runs_total", state="leader", result="failed") == 2
    assert value(got, "vip_elector_hook_runs_total", state="standby", result="ok") == 1
    assert value(got, "vip_elector_hook_runs_total", state="standby", result="killed") == 0
    assert value(make(hooks=False).exposition().decode(), "vip_elector_hook_runs_total",
                 state="leader", result="ok") is None  # no --hook: no series


def test_vip_errors_are_counted_by_action_with_manage_vip_only():
    m = make(vip=True)
    m.vip_error("remove")
    m.vip_error("remove")
    got = samples(m.exposition().decode())
    assert value(got, "vip_elector_vip_errors_total", action="remove") == 2
    assert value(got, "vip_elector_vip_errors_total", action="add") == 0
    assert value(make().exposition().decode(), "vip_elector_vip_errors_total", action="add") is None


def test_a_broken_metric_never_raises_into_the_loop(caplog):
    m = make()
    m.transitions = None  # any bug inside
    m.role("leader")
    m.role("follower")
    assert sum("internal error in the metrics" in r.getMessage() for r in caplog.records) == 1


def test_null_metrics_take_every_call():
    n = NullMetrics()
    n.role("leader"); n.session_confirmed(1.0); n.session_replaced()
    n.consul_error(c.ConsulError("x")); n.hook_run("leader", "ok"); n.vip_error("add"); n.close()


def test_the_process_collector_is_there_when_asked():
    text = make(process=True).exposition().decode()
    assert value(text, "process_resident_memory_bytes") > 0
    assert value(text, "process_open_fds") > 0
    assert 0 < time.time() - value(text, "process_start_time_seconds") < 60
    assert value(text, "process_cpu_seconds_total") > 0
    assert "python_gc" not in text and "python_info" not in text  # our registry, not the global one


# -- the server ----------------------------------------------------------------

@pytest.fixture
def served():
    m = make()
    sock = bind(MetricsAddress("127.0.0.1", 0))
    address = MetricsAddress("127.0.0.1", sock.getsockname()[1])
    m.serve(sock)
    yield m, address
    m.close()


def test_serves_metrics_and_only_metrics(served):
    m, address = served
    m.role("leader")
    assert value(scrape(address), "vip_elector_leader") == 1
    with pytest.raises(urllib.error.HTTPError) as e:
        scrape(address, "/")
    assert e.value.code == 404
    req = urllib.request.Request("http://%s/metrics" % address,
                                 headers={"Accept": "application/openmetrics-text; version=0.0.1"})
    with DIRECT.open(req, timeout=5) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.read().decode().endswith("# EOF\n")


def test_a_silent_scraper_holds_only_its_own_thread(served):
    m, address = served
    silent = [socket.create_connection(("127.0.0.1", address.port)) for _ in range(5)]
    try:
        t0 = time.monotonic()
        scrape(address)
        assert time.monotonic() - t0 < 2.0
    finally:
        for s in silent:
            s.close()


def test_the_listening_socket_is_not_inherited():
    sock = bind(MetricsAddress("127.0.0.1", 0))
    try:
        assert not sock.get_inheritable()
    finally:
        sock.close()


def test_closed_means_closed_and_the_port_is_free_again_at_once(served):
    m, address = served
    for _ in range(3):
        scrape(address)  # connections in TIME_WAIT on the port
    accepting = m._server.thread
    m.close()
    with pytest.raises(urllib.error.URLError):
        scrape(address, timeout=2)
    accepting.join(2)
    assert not accepting.is_alive(), "the accept() thread outlived close()"
    again = bind(address)  # SO_REUSEADDR: what the re-executed daemon of a reload does
    again.close()


def test_check_says_when_the_port_is_ours(served):
    m, address = served
    ok, line = check_address(address, "service/pg/leader")
    assert ok and "served by the running vip-elector for service/pg/leader" in line
    ok, line = check_address(address, "service/other/leader")
    assert not ok and "already in use" in line
    free = bind(MetricsAddress("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    ok, line = check_address(MetricsAddress("127.0.0.1", port))
    assert ok and "can be listened on" in line


def test_ipv6_loopback_when_the_host_has_it():
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as e:
        assert e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
        pytest.skip("no IPv6 loopback here")
    m = make()
    sock = bind(MetricsAddress("::1", 0))
    address = MetricsAddress("::1", sock.getsockname()[1])
    m.serve(sock)
    try:
        assert value(scrape(address), "vip_elector_leader") == 0
    finally:
        m.close()


# -- a reload to another address -----------------------------------------------

def test_a_reload_to_an_address_that_cannot_be_bound_is_refused(tmp_path):
    """SPEC §8.3: found before the exec, so the running daemon carries on (cli._validate_reload)."""
    from vip_elector.cli import _validate_reload
    config = tmp_path / "vm.yml"
    config.write_text("dcs-type: consul\ntrigger-key: service/pg/leader\n")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        argv = ["--vip-manager-config", str(config), "--hostname", "a",
                "--metrics-address", "127.0.0.1:%d" % port]
        with pytest.raises(ConfigError) as e:
            _validate_reload(argv, {}, bound=MetricsAddress("127.0.0.1", port + 1 if port < 65535 else 1))
        assert "--metrics-address 127.0.0.1:%d: cannot listen there" % port in str(e.value)
        # The address this daemon holds itself: the new program takes it over.
        settings = _validate_reload(argv, {}, bound=MetricsAddress("127.0.0.1", port))
        assert settings.metrics_address == MetricsAddress("127.0.0.1", port)
    finally:
        holder.close()


def test_the_priority_is_exported():
    """SPEC §11.6: vip_elector_priority, this node's --priority."""
    from vip_elector.metrics import Metrics
    assert value(make().exposition().decode(), "vip_elector_priority") == 100
    m = Metrics("9.9", "service/pg/leader", "node-a", process=False, priority=200)
    assert value(m.exposition().decode(), "vip_elector_priority") == 200
