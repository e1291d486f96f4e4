"""`vip-elector --check` says what is wrong and what to do (issue 10, points 2, 3, 9).

Real Consul agents (conftest.py); the ACL cases run a dev agent with ACLs
enabled and default deny, and tokens made from policies written here.
"""

import pytest

from consul_agent import ConsulAgent
from elector_process import run_elector

CHECK_ARGS = ("--hostname", "chk", "--check")


def check(config, *args, env=None):
    r = run_elector(["--vip-manager-config", config, *args, *CHECK_ARGS], env=env, timeout=60)
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "the token from none" not in out, out
    return r.returncode, out


def fail_lines(out):
    return [l for l in out.splitlines() if l.startswith("FAIL")]


def test_configuration_error_is_a_report_line_and_exit_1(tmp_path):
    """README: --check exits 0 when all is well, 1 otherwise, configuration errors included."""
    path = tmp_path / "vip-manager.yml"
    path.write_text("dcs-type: etcd\ntrigger-key: k\n")
    r = run_elector(["--vip-manager-config", str(path), "--check"], timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert fail_lines(r.stdout) and str(path) in fail_lines(r.stdout)[0] and "dcs-type" in r.stdout
    assert r.stdout.rstrip().endswith("1 problem(s) found")
    assert r.stderr == ""


@pytest.mark.consul
def test_key_held_by_another_programs_lock_names_the_holder(consul, key, write_config):
    session = consul.create_session(name="patroni-pg1")
    assert consul.acquire(key, session, b"pg1", flags=0) is True
    try:
        code, out = check(write_config(consul.http_addr, key))
        assert code == 1, out
        line = next(l for l in fail_lines(out) if key in l)
        assert "'patroni-pg1'" in line and consul.node in line, line
        assert "choose another trigger-key" in line
        assert "delete" not in out, "never advise deleting a key another program holds"
        assert consul.kv_get(key)["Session"] == session
    finally:
        consul.destroy_session(session)
        consul.kv_delete(key)


@pytest.mark.consul
def test_stale_plain_key_gets_the_delete_remedy_only_if_unused(consul, key, write_config):
    consul.kv_put(key, "old", flags=0)
    try:
        code, out = check(write_config(consul.http_addr, key))
        assert code == 1
        line = next(l for l in fail_lines(out) if key in l)
        assert "no session holds it" in line and "consul kv delete %s" % key in line, line
        assert consul.kv_value(key) == "old"
    finally:
        consul.kv_delete(key)


@pytest.mark.consul
def test_lock_held_by_an_elector_is_fine_and_named(consul, key, write_config):
    session = consul.create_session(name="vip-elector-node-b")
    assert consul.acquire(key, session, b"node-b") is True
    try:
        code, out = check(write_config(consul.http_addr, key))
        assert code == 0, out
        assert "'vip-elector-node-b'" in out
    finally:
        consul.destroy_session(session)
        consul.kv_delete(key)


# ------------------------------------------------------------------ ACLs

KEY_AND_SESSION = 'key "%(key)s" { policy = "write" }\nsession "%(node)s" { policy = "write" }\n'
NODE_READ = 'node "%(node)s" { policy = "read" }\n'


@pytest.fixture
def acl_agent(consul_factory):
    return consul_factory(node="acl-node", acl=True)


def token_env(token):
    return {"CONSUL_HTTP_TOKEN": token} if token else None


@pytest.mark.consul
def test_check_invisible_without_node_read_is_not_called_missing(acl_agent, key, check_id, write_config):
    """The check exists and passes; the token may take the key and make sessions
    but lacks node:read, so Consul hides the node's checks from it."""
    acl_agent.register_ttl_check(check_id)
    token = acl_agent.create_token(KEY_AND_SESSION % {"key": key, "node": acl_agent.node})
    code, out = check(write_config(acl_agent.http_addr, key), "--check-id", check_id, env=token_env(token))
    assert code == 1, out
    line = next(l for l in fail_lines(out) if check_id in l)
    assert "not registered" not in line, line
    assert "node:read" in line and acl_agent.node in line and "CONSUL_HTTP_TOKEN" in line, line


@pytest.mark.consul
def test_check_invisible_without_any_read_right(acl_agent, key, check_id, write_config):
    """Key write only: neither agent:read nor a session on the node."""
    acl_agent.register_ttl_check(check_id)
    token = acl_agent.create_token('key "%s" { policy = "write" }\n' % key)
    code, out = check(write_config(acl_agent.http_addr, key), "--check-id", check_id, env=token_env(token))
    line = next(l for l in fail_lines(out) if check_id in l)
    assert "not registered" not in line and "cannot be seen" in line and "agent:read" in line, line
    assert any("may not create sessions" in l and 'session_prefix ""' in l for l in fail_lines(out)), out


@pytest.mark.consul
def test_anonymous_is_called_anonymous(acl_agent, key, write_config):
    code, out = check(write_config(acl_agent.http_addr, key))
    assert code == 1
    assert "no token (anonymous)" in out, out
    assert "CONSUL_HTTP_TOKEN in /etc/default/vip-elector" in out, out


@pytest.mark.consul
def test_missing_check_lists_the_checks_that_exist(acl_agent, key, check_id, write_config):
    rules = (KEY_AND_SESSION + NODE_READ) % {"key": key, "node": acl_agent.node}
    token = acl_agent.create_token(rules)
    acl_agent.register_ttl_check("pg-replica")
    code, out = check(write_config(acl_agent.http_addr, key), "--check-id", check_id, env=token_env(token))
    assert code == 1
    line = next(l for l in fail_lines(out) if check_id in l)
    assert "not registered on the local agent" in line and "'pg-replica'" in line, line
    assert "'serfHealth'" in line


@pytest.mark.consul
def test_agent_has_the_check_but_the_catalog_does_not(consul_binary, tmp_path, key, check_id, write_config):
    """A check defined in the agent's configuration, synced with the agent's
    default token (here: none, anonymous) that may not write the node: the
    agent logs 'blocked by ACLs', lists the check as passing, and the catalog,
    which sessions are judged by, never gets it."""
    class AgentWithCheckFile(ConsulAgent):
        def command(self):
            return super().command() + ["-hcl", 'check { id = "%s" name = "%s" ttl = "10m" '
                                                'status = "passing" }' % (check_id, check_id)]

    agent = AgentWithCheckFile(tmp_path / "consul", node="acl-node", acl=True, binary=consul_binary)
    with agent:
        assert check_id in agent.get_json("/v1/agent/checks")
        rules = (KEY_AND_SESSION + NODE_READ) % {"key": key, "node": agent.node}
        token = agent.create_token(rules)
        code, out = check(write_config(agent.http_addr, key), "--check-id", check_id, env=token_env(token))
    assert code == 1, out
    assert "check '%s' is passing on the local agent" % check_id in out, out
    line = next(l for l in fail_lines(out) if "catalog does not" in l)
    assert check_id in line and "acl.tokens" in line and "blocked by ACLs" in line, line


# ------------------------------------------- service checks (issue 19, item 2)
#
# Found by experiment on Consul 1.8.7 (examples/consul-acl-policy.hcl says it):
# a session bound to a service's check needs session:write only; the agent shows
# a service's check only with service:read on that service (node:read does not
# show it), and a node's check only with node:read.

def register_service_check(agent, check_id, service="haproxy", status="passing"):
    """A service with a TTL check the test drives, as consul-service-check.hcl registers one."""
    agent.call("PUT", "/v1/agent/service/register",
               body={"Name": service, "Port": 5000,
                     "Check": {"CheckID": check_id, "Name": check_id, "TTL": "10m", "Status": status}})
    agent._wait_check(check_id, status)


@pytest.mark.consul
def test_service_check_hidden_by_a_missing_service_read_names_service_read(acl_agent, key, check_id,
                                                                           write_config):
    """The token has node:read (the example policy before issue 19) but not
    service:read: --check blamed node:read, which the token has."""
    register_service_check(acl_agent, check_id)
    token = acl_agent.create_token((KEY_AND_SESSION + NODE_READ) % {"key": key, "node": acl_agent.node})
    code, out = check(write_config(acl_agent.http_addr, key), "--check-id", check_id, env=token_env(token))
    assert code == 1, out
    line = next(l for l in fail_lines(out) if check_id in l)
    assert "lacks service:read" in line and 'service "NAME" { policy = "read" }' in line, line
    assert 'service "haproxy"' in line and "consul-acl-policy.hcl" in line, line
    assert "lacks node:read" not in line and "not registered" not in line, line
    assert "a session bound to the checks can be created" in out, out


@pytest.mark.consul
def test_critical_service_check_hidden_from_the_token_is_not_called_missing(acl_agent, key, check_id,
                                                                            write_config):
    register_service_check(acl_agent, check_id, status="critical")
    token = acl_agent.create_token((KEY_AND_SESSION + NODE_READ) % {"key": key, "node": acl_agent.node})
    code, out = check(write_config(acl_agent.http_addr, key), "--check-id", check_id, env=token_env(token))
    assert code == 1, out
    line = next(l for l in fail_lines(out) if check_id in l and "cannot see" in l)
    assert "registered and critical" in line and "service:read" in line, line
    assert not any("not registered" in l for l in fail_lines(out)), out


@pytest.mark.consul
def test_service_read_is_enough_to_see_a_service_check(acl_agent, key, check_id, write_config):
    """Key write, session write, service read: --check passes (node:read is not
    needed for a service's check, and agent:read never is)."""
    register_service_check(acl_agent, check_id)
    rules = KEY_AND_SESSION % {"key": key, "node": acl_agent.node} + 'service "haproxy" { policy = "read" }\n'
    code, out = check(write_config(acl_agent.http_addr, key), "--check-id", check_id,
                      env=token_env(acl_agent.create_token(rules)))
    assert code == 0, out
    assert "check '%s' is passing on the local agent" % check_id in out, out


@pytest.mark.consul
def test_refused_write_names_the_call_and_the_rule(acl_agent, key, write_config):
    rules = 'key "%(key)s" { policy = "read" }\nsession "%(node)s" { policy = "write" }\n' % {
        "key": key, "node": acl_agent.node}
    code, out = check(write_config(acl_agent.http_addr, key), env=token_env(acl_agent.create_token(rules)))
    assert code == 1, out
    line = next(l for l in fail_lines(out) if "write right" in l)
    assert "PUT /v1/kv/%s" % key in line, line
    assert 'key "%s" { policy = "write" }' % key in line and "consul-acl-policy.hcl" in line, line


@pytest.mark.consul
def test_refused_session_names_the_call_and_the_rule(acl_agent, key, write_config):
    token = acl_agent.create_token('key "%s" { policy = "write" }\n' % key)
    code, out = check(write_config(acl_agent.http_addr, key), env=token_env(token))
    line = next(l for l in fail_lines(out) if "may not create sessions" in l)
    assert "PUT /v1/session/create" in line and 'session_prefix "" { policy = "write" }' in line, line


@pytest.mark.consul
def test_unknown_token_is_told_apart_from_a_missing_right(acl_agent, key, write_config):
    code, out = check(write_config(acl_agent.http_addr, key),
                      env=token_env("11111111-2222-3333-4444-555555555555"))
    assert code == 1, out
    line = fail_lines(out)[0]
    assert "does not know" in line and "ACL not found" in line and "GET /v1/kv/%s" % key in line, line
