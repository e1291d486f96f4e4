"""vip_elector/consul.py against tiny in-process HTTP servers (no Consul, fast).

The election loop reacts to exception types, so the adapter's mapping of
Consul's answers is the contract (SPEC §9.1): Consul's own error bodies (as
Consul 1.8.7 sends them, REFERENCE §1) become the typed exceptions, anything
malformed or silent becomes a ConsulError (never a ValueError or a hang), and
the token travels only in X-Consul-Token (SPEC §3, §6). Only the public API
is used: ConsulClient's methods and the exceptions.
"""

import json
import socket
import time

import pytest

from consul_agent import LOCK_FLAG, free_ports
from fault_proxy import Cut, FaultProxy
from tiny_http import TinyServer
from vip_elector import consul as adapter
from vip_elector.config import Settings
from vip_elector.consul import (CheckNotPassing, ConsulClient, ConsulError, ConsulUnreachable,
                                InvalidSession, InvalidSessionTTL, PermissionDenied)

KEY = "service/adapter/leader"
SESSION = "3d4c5b1e-8c5e-4c3c-9e7e-1b2b3c4d5e6f"
TOKEN = "tok-3c1d-SECRET"
# Fast, but it depends on the Consul library beneath the adapter: `make compat`
# runs it again with python-consul 0.7.1 and py-consul 1.5.
pytestmark = pytest.mark.compat

SPECIAL = (ConsulUnreachable, PermissionDenied, InvalidSession, CheckNotPassing, InvalidSessionTTL)


def settings_for(addr, token=None):
    host, port = addr.split(":")
    return Settings(config_path="/etc/patroni/vip.yml", trigger_key=KEY, value="node-a",
                    scheme="http", host=host, port=int(port), token=token,
                    token_source="--token" if token else "none")


def good_consul(seen):
    """What Consul 1.8.7 answers on the happy path, enough for every adapter call."""
    index = {"X-Consul-Index": "42", "Content-Type": "application/json"}
    routes = {
        ("GET", "/v1/kv/" + KEY): [{"Key": KEY, "Value": "bm9kZS1h", "Flags": LOCK_FLAG,
                                    "Session": SESSION, "LockIndex": 1, "CreateIndex": 40,
                                    "ModifyIndex": 41}],
        ("PUT", "/v1/kv/" + KEY): True,
        ("DELETE", "/v1/kv/" + KEY): True,
        ("PUT", "/v1/session/create"): {"ID": SESSION},
        ("PUT", "/v1/session/renew/" + SESSION): [{"ID": SESSION, "TTL": "10s"}],
        ("PUT", "/v1/session/destroy/" + SESSION): True,
        ("GET", "/v1/agent/self"): {"Config": {"NodeName": "node-1"}},
        ("GET", "/v1/agent/checks"): {"vip-http": {"CheckID": "vip-http", "Status": "passing"}},
        ("PUT", "/v1/txn"): {"Results": [], "Errors": None},
        ("GET", "/v1/status/leader"): "10.0.0.1:8300",
    }
    body = routes.get((seen.method, seen.path))
    if body is None:
        return 404, {}, ""
    return 200, index, json.dumps(body)


def every_call(client):
    """Each public ConsulClient call once, as the daemon and --check make them."""
    return [
        ("read_key", lambda: client.read_key()),
        ("blocking read_key", lambda: client.read_key(index=41, wait=1)),
        ("create_session", lambda: client.create_session(["serfHealth", "vip-http"])),
        ("renew_session", lambda: client.renew_session(SESSION)),
        ("acquire", lambda: client.acquire(SESSION)),
        ("delete_if_unchanged", lambda: client.delete_if_unchanged(41)),
        ("destroy_session", lambda: client.destroy_session(SESSION)),
        ("node_name", lambda: client.node_name()),
        ("check_states", lambda: client.check_states(["vip-http"])),
        ("can_write_key", lambda: client.can_write_key()),
        ("move_lock", lambda: client.move_lock(SESSION, SESSION)),
        ("raft_leader", lambda: client.raft_leader()),
    ]


@pytest.fixture
def serve():
    """serve(answer) -> (ConsulClient on a TinyServer playing `answer`, the server)."""
    running = []

    def make(answer, token=None):
        server = TinyServer(answer).__enter__()
        running.append(server)
        return ConsulClient(settings_for(server.addr, token)), server

    yield make
    for server in running:
        server.__exit__(None, None, None)


@pytest.fixture
def short_timeout(monkeypatch):
    """The adapter's per-request timeout, shortened if it is a module setting (5 s otherwise)."""
    if hasattr(adapter, "REQUEST_TIMEOUT"):
        monkeypatch.setattr(adapter, "REQUEST_TIMEOUT", 1.0)
        return 1.0
    return 5.0


def test_happy_path_answers(serve):
    client, server = serve(good_consul)
    index, key = client.read_key()
    assert index == 42 and key.value == "node-a" and key.session == SESSION
    assert key.modify_index == 41 and key.is_lock
    assert client.create_session(["serfHealth"]) == SESSION
    assert client.acquire(SESSION) is True
    client.renew_session(SESSION)
    assert client.node_name() == "node-1"
    assert client.check_states(["vip-http", "gone"]) == {"vip-http": "passing", "gone": None}
    acquire = [s for s in server.seen if s.method == "PUT" and s.path == "/v1/kv/" + KEY][0]
    assert acquire.query == {"acquire": SESSION, "flags": str(LOCK_FLAG)} and acquire.body == b"node-a"


# Consul's own error answers --------------------------------------------------------------

ERRORS = [
    # (call, status, body as Consul sends it, exception, what str() must show)
    ("read_key", 500, "rpc error making call: rpc error making call: No cluster leader",
     ConsulError, "No cluster leader"),
    ("acquire", 500, "rpc error making call: EOF", ConsulError, "EOF"),
    ("acquire", 403, "Permission denied", PermissionDenied, "Permission denied"),
    ("read_key", 403, "ACL not found", PermissionDenied, "ACL not found"),
    ("create_session", 500, "rpc error making call: Permission denied", PermissionDenied,
     "Permission denied"),
    ("acquire", 500, 'invalid session "%s"' % SESSION, InvalidSession, SESSION),
    ("renew_session", 404, "Session id '%s' not found" % SESSION, InvalidSession, SESSION),
    ("create_session", 500, "Check 'vip-http' is in critical state", CheckNotPassing, "vip-http"),
    ("create_session", 500, "Missing check 'nope' registration", CheckNotPassing, "nope"),
    ("create_session", 500, "Invalid Session TTL '5000000000', must be between [10s=24h0m0s]",
     InvalidSessionTTL, "Invalid Session TTL"),
    ("read_key", 429, "Your IP is issuing too many concurrent connections, please rate limit your calls",
     ConsulError, ""),
    ("renew_session", 500, "rpc error making call: rpc error getting client: failed to get conn: "
     "dial tcp 10.0.0.2:8300: connect: connection refused", ConsulError, ""),
]


@pytest.mark.parametrize("call, status, body, exception, shows", ERRORS,
                         ids=["%s-%d-%s" % (c, s, e.__name__) for c, s, _, e, _ in ERRORS])
def test_error_mapping(serve, call, status, body, exception, shows):
    client, _ = serve(lambda seen: (status, {"Content-Type": "text/plain"}, body))
    with pytest.raises(ConsulError) as raised:
        dict(every_call(client))[call]()
    error = raised.value
    assert isinstance(error, exception), "%r -> %r" % (body, error)
    if exception is ConsulError:
        assert not isinstance(error, SPECIAL), "%r must not look like %r" % (body, type(error).__name__)
    assert shows in str(error)
    assert "Traceback" not in str(error) and len(str(error)) < 400


def test_check_not_passing_names_the_check_and_its_state(serve):
    client, _ = serve(lambda seen: (500, {}, "Check 'vip-http' is in critical state"))
    with pytest.raises(CheckNotPassing) as critical:
        client.create_session(["serfHealth", "vip-http"])
    assert (critical.value.check_id, critical.value.state) == ("vip-http", "critical")
    client, _ = serve(lambda seen: (500, {}, "Missing check 'nope' registration"))
    with pytest.raises(CheckNotPassing) as missing:
        client.create_session(["serfHealth", "nope"])
    assert (missing.value.check_id, missing.value.state) == ("nope", None)


# Malformed and silent answers -------------------------------------------------------------

NOT_JSON = "<html><body>502 Bad Gateway</body></html>"


@pytest.mark.parametrize("call", ["read_key", "blocking read_key", "create_session", "renew_session",
                                  "node_name", "check_states"])
def test_body_that_is_not_json_is_a_consul_error(serve, call):
    client, _ = serve(lambda seen: (200, {"X-Consul-Index": "7", "Content-Type": "text/html"}, NOT_JSON))
    with pytest.raises(ConsulError) as raised:
        dict(every_call(client))[call]()
    assert not isinstance(raised.value, (PermissionDenied, InvalidSession, CheckNotPassing))


@pytest.mark.parametrize("body", ['{"Key": 1}', '"a string"', "[1, 2]", "null", '[{"Value": 5}]'])
def test_json_of_the_wrong_shape_is_a_consul_error_or_nothing(serve, body):
    """A key read that is JSON but not Consul's: a ConsulError, or "no key", never a crash."""
    client, _ = serve(lambda seen: (200, {"X-Consul-Index": "7"}, body))
    try:
        client.read_key()
    except ConsulError:
        pass


def test_server_that_never_answers_is_unreachable_within_the_timeout(serve, short_timeout):
    client, _ = serve(lambda seen: None)
    for name, call in [("read_key", lambda: client.read_key()),
                       ("acquire", lambda: client.acquire(SESSION))]:
        t0 = time.monotonic()
        with pytest.raises(ConsulUnreachable):
            call()
        elapsed = time.monotonic() - t0
        assert elapsed < short_timeout + 2.0, "%s took %.1fs" % (name, elapsed)


def test_answer_cut_in_the_middle_is_unreachable(serve):
    _, server = serve(good_consul)
    with FaultProxy(server.addr) as proxy:
        proxy.inject(Cut(), times=None)
        client = ConsulClient(settings_for(proxy.addr))
        t0 = time.monotonic()
        with pytest.raises(ConsulError):
            client.read_key()
        with pytest.raises(ConsulError):
            client.renew_session(SESSION)
        assert time.monotonic() - t0 < 3
        proxy.heal()
        assert client.read_key()[0] == 42, "the next request on a fresh connection works"


def test_connection_refused_is_unreachable():
    port, = free_ports(1)
    client = ConsulClient(settings_for("127.0.0.1:%d" % port))
    with pytest.raises(ConsulUnreachable) as raised:
        client.read_key()
    assert "refused" in str(raised.value)
    # Issue 19: names the address and asks whether the agent runs there.
    assert "127.0.0.1:%d" % port in str(raised.value), str(raised.value)
    assert "is the Consul agent running there" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("call, refused", [
    ("create_session", "PUT /v1/session/create"), ("acquire", "PUT /v1/kv/" + KEY),
    ("read_key", "GET /v1/kv/" + KEY), ("move_lock", "PUT /v1/txn"),
    ("renew_session", "PUT /v1/session/renew/" + SESSION)])
def test_permission_denied_says_which_call_was_refused(serve, call, refused):
    """Consul 1.8 answers a missing right with a bare "Permission denied": the
    refused call is what tells an operator (and --check) which rule is missing."""
    client, _ = serve(lambda seen: (403, {}, "Permission denied"), token=TOKEN)
    with pytest.raises(PermissionDenied) as raised:
        dict(every_call(client))[call]()
    assert raised.value.call == refused and raised.value.reason == "Permission denied"
    assert str(raised.value) == "Permission denied on " + refused
    assert TOKEN not in str(raised.value)


def test_server_that_closes_at_once_is_unreachable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    client = ConsulClient(settings_for("127.0.0.1:%d" % listener.getsockname()[1]))
    listener.close()      # nothing listens any more: refused
    with pytest.raises(ConsulUnreachable):
        client.read_key()


# The token ---------------------------------------------------------------------------------

def test_token_only_in_the_header_never_in_a_url(serve, monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token-must-not-win")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
    client, server = serve(good_consul, token=TOKEN)
    for name, call in every_call(client):
        call()
    assert len(server.seen) >= len(every_call(client))
    for seen in server.seen:
        assert TOKEN not in seen.target and "token" not in seen.query, seen.target
        assert seen.headers.get("X-Consul-Token") == TOKEN, (seen.target, seen.headers)
        assert TOKEN.encode() not in seen.body


def test_token_not_in_error_messages(serve):
    client, _ = serve(lambda seen: (403, {}, "Permission denied"), token=TOKEN)
    for name, call in every_call(client):
        try:
            call()
        except ConsulError as e:
            assert TOKEN not in str(e), name


@pytest.mark.consul
def test_move_lock_hands_the_key_to_another_session_in_one_step(consul):
    """The swap a session replacement relies on: value and flags kept, never free, all or nothing."""
    client = ConsulClient(settings_for(consul.http_addr))
    old = client.create_session(["serfHealth"])
    assert client.acquire(old)
    _, before = client.read_key()
    new = client.create_session(["serfHealth"])
    try:
        assert client.move_lock(old, new) is True
        _, after = client.read_key()
        assert (after.session, after.value, after.flags) == (new, before.value, LOCK_FLAG)
        # Nothing changes when the old session no longer holds it, or the new one is not valid.
        assert client.move_lock(old, new) is False
        assert client.move_lock(new, "00000000-0000-0000-0000-000000000000") is False
        _, unchanged = client.read_key()
        assert unchanged == after
    finally:
        for sid in (old, new):
            client.destroy_session(sid)
        client.close()


@pytest.mark.consul
def test_move_lock_needs_no_more_than_the_documented_acl_policy(consul_factory):
    """examples/consul-acl-policy.hcl (key write, session write, node read) allows the move."""
    from consul_agent import elector_rules
    agent = consul_factory(acl=True)
    client = ConsulClient(settings_for(agent.http_addr, token=agent.create_token(elector_rules(KEY, agent.node))))
    try:
        old = client.create_session(["serfHealth"])
        assert client.acquire(old)
        new = client.create_session(["serfHealth"])
        assert client.move_lock(old, new) is True
        assert client.read_key()[1].session == new
    finally:
        client.close()


@pytest.mark.consul
def test_raft_leader_of_a_real_agent(consul):
    client = ConsulClient(settings_for(consul.http_addr))
    try:
        leader = client.raft_leader()
    finally:
        client.close()
    assert leader and ":" in leader, leader   # "address:port"
