"""The test harness itself, against the real Consul agent: the other tests
rely on each of these behaviours, so each is checked here first."""

import signal
import time

import pytest

from consul_agent import LOCK_FLAG, ConsulError, elector_rules
from helpers import wait_for

pytestmark = pytest.mark.consul


def test_start_is_fast_and_restart_keeps_ports_and_loses_state(fresh_consul):
    agent = fresh_consul
    addr = agent.http_addr
    agent.kv_put("harness/x", "1")
    assert agent.kv_value("harness/x") == "1"
    agent.stop()
    assert not agent.running
    with pytest.raises(OSError):
        agent.request("GET", "/v1/status/leader", timeout=2)
    t = time.monotonic()
    agent.start()
    startup = time.monotonic() - t
    assert agent.http_addr == addr
    assert agent.kv_get("harness/x") is None, "a -dev agent keeps nothing across a restart"
    assert startup < 20, "agent took %.1fs to start" % startup
    agent.kill()
    assert not agent.running
    agent.start()
    assert agent.get_json("/v1/status/leader")


def test_kv_helpers(consul, key):
    assert consul.kv_get(key) is None
    consul.kv_put(key, "plain", flags=7)
    entry = consul.kv_get(key)
    assert entry["Value"] == b"plain" and entry["Flags"] == 7 and entry["ModifyIndex"] > 0
    assert consul.kv_all()[key][:2] == (b"plain", 7)
    consul.kv_delete(key)
    assert consul.kv_get(key) is None and key not in consul.kv_all()


def test_check_states_decide_sessions(consul, key, check_id):
    with pytest.raises(ConsulError, match="Missing check"):
        consul.create_session(checks=["serfHealth", check_id])
    consul.register_ttl_check(check_id, status="critical")
    with pytest.raises(ConsulError, match="critical state"):
        consul.create_session(checks=["serfHealth", check_id])
    consul.pass_check(check_id)
    sid = consul.create_session(checks=["serfHealth", check_id], ttl="10s", behavior="delete")
    assert consul.acquire(key, sid, b"me") is True
    value, session = consul.holder(key)
    assert value == "me" and session["ID"] == sid
    consul.warn_check(check_id)
    assert consul.session_info(sid) is not None, "warning does not invalidate a session"
    consul.fail_check(check_id)
    wait_for(lambda: consul.session_info(sid) is None, 10, message="session invalidated")
    wait_for(lambda: consul.kv_get(key) is None, 10, message="behaviour delete removes the key")
    consul.deregister_check(check_id)
    assert consul.check_status(check_id) is None


def test_acl_minimal_token(consul_factory, key):
    agent = consul_factory(acl=True)
    assert agent.request("GET", "/v1/kv/" + key, token=None)[0] == 403
    agent.register_ttl_check("vip-http")
    token = agent.create_token(elector_rules(key, agent.node))
    checks = agent.call("GET", "/v1/agent/checks", token=token)
    assert "vip-http" in checks, "node read is what lets the token see the node's checks"
    sid = agent.call("PUT", "/v1/session/create", token=token,
                     body={"Name": "x", "Checks": ["serfHealth", "vip-http"], "TTL": "10s",
                           "Behavior": "delete", "LockDelay": "1s"})["ID"]
    assert agent.call("PUT", "/v1/kv/" + key, body=b"n", token=token,
                      params={"acquire": sid, "flags": LOCK_FLAG}) is True
    agent.call("PUT", "/v1/session/renew/" + sid, token=token)
    index = agent.kv_get(key)["ModifyIndex"]
    assert agent.call("DELETE", "/v1/kv/" + key, params={"cas": index}, token=token) is True
    agent.call("PUT", "/v1/session/destroy/" + sid, token=token)
    # One less right and something vip-elector needs fails.
    no_node = agent.create_token('key "%s" { policy = "write" }\nsession "%s" { policy = "write" }'
                                 % (key, agent.node))
    assert agent.call("GET", "/v1/agent/checks", token=no_node) == {}, "checks hidden without node read"
    no_session = agent.create_token('key "%s" { policy = "write" }\nnode "%s" { policy = "read" }'
                                    % (key, agent.node))
    assert agent.request("PUT", "/v1/session/create", body={"Name": "x"}, token=no_session)[0] == 403
    other_key = agent.create_token(elector_rules(key + "x", agent.node))
    assert agent.request("GET", "/v1/kv/" + key, token=other_key)[0] == 403


def test_consul_lock_peer(consul, key):
    prefix = key.rsplit("/", 1)[0]
    lock = consul.consul_lock(prefix, "sleep 300")
    try:
        entry = wait_for(lambda: consul.kv_get(prefix + "/.lock"), 20, message="consul lock to hold the key")
        assert entry["Flags"] == LOCK_FLAG and entry["Session"]
        # Another session cannot take it while consul lock holds it.
        sid = consul.create_session(name="other")
        assert consul.acquire(prefix + "/.lock", sid) is False
        lock.send_signal(signal.SIGTERM)
        lock.wait(20)
        wait_for(lambda: not (consul.kv_get(prefix + "/.lock") or {}).get("Session"), 20,
                 message="consul lock to release")
        wait_for(lambda: consul.acquire(prefix + "/.lock", sid), 20, message="acquire after release")
        consul.destroy_session(sid)
    finally:
        if lock.poll() is None:
            lock.kill()
        lock.wait()


def test_tls_endpoint(consul_factory):
    import ssl
    import urllib.request
    agent = consul_factory(tls=True, verify_incoming=True)
    ctx = ssl.create_default_context(cafile=agent.ca_file)
    ctx.load_cert_chain(agent.client_cert, agent.client_key)
    with urllib.request.urlopen(agent.https_url + "/v1/status/leader", context=ctx, timeout=10) as r:
        assert r.status == 200
    with pytest.raises(Exception):        # no client certificate: refused
        urllib.request.urlopen(agent.https_url + "/v1/status/leader",
                               context=ssl.create_default_context(cafile=agent.ca_file), timeout=10)


def test_client_agents_join_a_server(consul_factory):
    server = consul_factory(node="server")
    client = consul_factory(node="node-1", join=server)
    assert {m["Name"] for m in server.get_json("/v1/agent/members")} == {"server", "node-1"}
    sid = client.create_session(name="on-node-1")
    assert server.session_info(sid)["Node"] == "node-1"
    client.kill()
    wait_for(lambda: server.get_json("/v1/health/node/node-1")[0]["Status"] == "critical", 30,
             message="node-1 serfHealth critical once its agent is gone")
    wait_for(lambda: server.session_info(sid) is None, 10, message="its session invalidated")
    client.start()
    assert client.check_status("serfHealth") == "passing"
