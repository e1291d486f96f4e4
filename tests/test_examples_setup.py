"""The shipped examples are one working setup (issue 19, item 2).

examples/vip-manager.yml (and .env), consul-service-check.hcl,
consul-acl-policy.hcl, debian/vip-elector.default, the man page and
README.Debian name the same key, node, service and check; and with a real
agent (ACLs on, default deny) the example policy, taken verbatim, is enough
for `--check` and for the daemon with the example's check.
"""

import os
import re

import pytest

from consul_agent import ConsulAgent, wait_for
from elector_process import run_elector
from tiny_http import TinyServer
from vip_elector import service
from vip_elector.config import Options, build_settings

SOURCE = os.environ.get("VIP_ELECTOR_SOURCE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KEY, NODE, SERVICE, CHECK = "service/haproxy-vip/leader", "node-a", "haproxy", "vip-haproxy"


def read(*parts):
    with open(os.path.join(SOURCE, *parts), encoding="utf-8") as f:
        return f.read()


def policy_rules():
    """{(kind, name): policy} of examples/consul-acl-policy.hcl."""
    rules = re.findall(r'^(\w+)\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(\w+)"\s*\}', read("examples", "consul-acl-policy.hcl"),
                       re.M)
    return {(kind, name): policy for kind, name, policy in rules}


def service_check():
    """(service name, check id) of examples/consul-service-check.hcl's active block."""
    text = read("examples", "consul-service-check.hcl")
    active = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    return (re.search(r'^\s*name\s*=\s*"([^"]+)"', active, re.M).group(1),
            re.search(r'^\s*id\s*=\s*"([^"]+)"', active, re.M).group(1))


def default_opts():
    """The worked example's VIP_ELECTOR_OPTS in debian/vip-elector.default, as systemd splits it."""
    found = re.findall(r'^#VIP_ELECTOR_OPTS="([^"]*)"$', read("debian", "vip-elector.default"), re.M)
    assert len(found) == 1, found
    return found[0].split()


def test_the_examples_name_one_key_node_service_and_check():
    yml = build_settings(Options(vip_manager_config=os.path.join(SOURCE, "examples", "vip-manager.yml")), {})
    env = build_settings(Options(vip_manager_config=os.path.join(SOURCE, "examples", "vip-manager.env")), {})
    assert (yml.trigger_key, yml.value) == (env.trigger_key, env.value) == (KEY, NODE)
    assert service_check() == (SERVICE, CHECK)
    assert policy_rules() == {("key", KEY): "write", ("key_prefix", KEY + "/"): "write",  # SPEC §11
                              ("session", NODE): "write", ("service", SERVICE): "read",
                              ("node_prefix", ""): "read"}
    opts = default_opts()
    assert "--check-id=%s" % CHECK in opts and "--vip-manager-config=/etc/vip-manager.yml" in opts
    assert "--check-id=%s" % CHECK in service.EXAMPLE_OPTS
    assert "--check-id=%s" % CHECK in read("examples", "consul-service-check.hcl")
    assert "--check-id=%s" % CHECK in read("debian", "README.Debian")
    man = read("debian", "vip-elector.8").replace("\\-", "-")
    assert "--check-id=%s" % CHECK in man and "consul kv get %s" % KEY in man


OLD_NAMES = ("pgcluster", "pg-primary", "pg-db1", "vip-postgresql")


@pytest.mark.parametrize("path", [
    "examples/consul-acl-policy.hcl", "examples/vip-manager.yml", "examples/vip-manager.env",
    "debian/vip-elector.default", "debian/vip-elector.8", "debian/README.Debian",
    "systemd/vip-elector.service", "systemd/vip-elector@.service", "systemd/vip-elector.catalog",
    "vip_elector/service.py", "vip_elector/check.py"])
def test_no_other_example_names_left(path):
    text = read(*path.split("/"))
    assert not [name for name in OLD_NAMES if name in text], path


@pytest.mark.consul
def test_example_policy_is_enough_for_the_example_check_with_a_real_agent(consul_binary, tmp_path,
                                                                           electors):
    """Agent node-a with ACLs on (default deny) runs consul-service-check.hcl
    (its HTTP check pointed at a stand-in HAProxy); a token made from
    consul-acl-policy.hcl verbatim passes --check with the defaults file's
    options, and the daemon with it takes the key."""
    with TinyServer(lambda seen: (200, {}, "ok") if seen.path == "/healthz" else (404, {}, "")) as haproxy:
        check_file = tmp_path / "haproxy.hcl"

        class ExampleAgent(ConsulAgent):
            def command(self):
                return super().command() + ["-config-file", str(check_file)]

        agent = ExampleAgent(tmp_path / "consul", node=NODE, acl=True, binary=consul_binary)
        text = read("examples", "consul-service-check.hcl")
        assert "http://127.0.0.1:8404/healthz" in text
        # The agent registers the service with the servers using this token (the
        # test agent has no default token; a real one has acl.tokens.default or this).
        text = text.replace("http://127.0.0.1:8404/healthz", "http://%s/healthz" % haproxy.addr)
        text = text.replace("service {", 'service {\n  token = "%s"' % agent.master_token, 1)
        check_file.write_text(text)
        with agent:
            wait_for(lambda: agent.check_status(CHECK) == "passing", 30,
                     message="the example's HTTP check to pass in the catalog")
            policy = agent.call("PUT", "/v1/acl/policy",
                                body={"Name": "vip-elector-node-a", "Rules": read("examples", "consul-acl-policy.hcl")})
            token = agent.call("PUT", "/v1/acl/token", body={"Policies": [{"ID": policy["ID"]}]})["SecretID"]
            config = tmp_path / "vip-manager.yml"
            config.write_text(read("examples", "vip-manager.yml").replace("http://127.0.0.1:8500", agent.url))
            opts = [o.replace("/etc/vip-manager.yml", str(config)) for o in default_opts()]
            env = {"CONSUL_HTTP_TOKEN": token}
            r = run_elector(opts + ["--check"], env=env, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "check '%s' is passing on the local agent" % CHECK in r.stdout, r.stdout
            # The daemon with the same token and options takes the key.
            daemon = electors(opts, env=env, name=NODE)
            wait_for(lambda: agent.kv_value(KEY) == NODE, 30, message="node-a to take the example key")
            daemon.terminate()
            assert daemon.wait(10) == 0
            assert agent.kv_get(KEY) is None, "a planned stop releases the key"
            # Each rule is needed: without the service rule, --check names it.
            without = re.sub(r'service "haproxy" \{[^}]*\}', "", read("examples", "consul-acl-policy.hcl"))
            r = run_elector(opts + ["--check"], env={"CONSUL_HTTP_TOKEN": agent.create_token(without)},
                            timeout=60)
            assert r.returncode == 1 and "lacks service:read" in r.stdout, r.stdout
