"""Fixtures: real Consul agents and vip-elector subprocesses.

  consul        module-scoped dev agent (node "vip-test-node"); tests share it,
                each with its own `key` and its own check IDs. Don't stop it.
  fresh_consul  function-scoped agent a test may stop, kill, restart.
  consul_factory(node=..., acl=..., start=True, tls=..., verify_incoming=..., join=server)
                -> more agents (join=: a client agent of that server's cluster),
                killed at teardown.
  key           a trigger key no other test uses: "service/<test>-<hex>/leader".
  electors(args, env=None, name=None, wrapper=(), journal_stream=False) -> a started Elector,
                reaped at teardown
                (its log is printed when the test fails).
  write_config(addr, key, **fields) -> path of a vip-manager YAML file.
  notify_socket(abstract=False) -> a NotifySocket (tests/helpers.py), closed at teardown.

A dev agent starts in ~0.2 s, so per-test agents are cheap; the module agent
only saves the processes.
"""

import re
import uuid

import pytest
import yaml

from consul_agent import ConsulAgent, find_consul
from elector_process import Elector
from helpers import NotifySocket, no_internal_errors

NODE = "vip-test-node"


@pytest.fixture(scope="session")
def consul_binary():
    binary = find_consul()
    if not binary:
        pytest.skip("no consul binary: run tests/tools/fetch-deps (or set VIP_ELECTOR_CONSUL)")
    return binary


@pytest.fixture(scope="module")
def consul(consul_binary, tmp_path_factory):
    agent = ConsulAgent(tmp_path_factory.mktemp("consul"), node=NODE, binary=consul_binary)
    agent.start()
    yield agent
    agent.kill()


@pytest.fixture
def consul_factory(consul_binary, tmp_path):
    agents = []

    def make(node=NODE, acl=False, start=True, **options):
        agent = ConsulAgent(tmp_path / ("consul-%d" % len(agents)), node=node, acl=acl,
                            binary=consul_binary, **options)
        agents.append(agent)
        return agent.start() if start else agent

    yield make
    for agent in agents:
        agent.kill()


@pytest.fixture
def fresh_consul(consul_factory):
    return consul_factory()


@pytest.fixture
def key(request):
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return "service/%s-%s/leader" % (name, uuid.uuid4().hex[:6])


@pytest.fixture
def check_id(request):
    """A fresh check ID (not registered: register it on the agent you use)."""
    return "vip-check-" + uuid.uuid4().hex[:8]


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def electors(request):
    started = []

    def make(args, env=None, name=None, wrapper=(), journal_stream=False):
        e = Elector(args, env=env, name=name or "elector-%d" % len(started), wrapper=wrapper,
                    journal_stream=journal_stream)
        started.append(e)
        return e.start()

    yield make
    for e in started:
        e.reap()
    failed = any(getattr(request.node, "rep_" + w, None) is not None
                 and getattr(request.node, "rep_" + w).failed for w in ("setup", "call"))
    if failed:
        for e in started:
            print("----- %s (exit %s) stderr -----\n%s" % (e.name, e.returncode, e.log()))
    else:
        no_internal_errors(*started)


@pytest.fixture
def write_config(tmp_path):
    counter = [0]

    def write(addr=None, key=None, dcs_type="consul", **fields):
        """vip-manager YAML; keyword names use _ for -, None values are left out."""
        data = {"dcs-type": dcs_type}
        if addr is not None:
            data["dcs-endpoints"] = [addr if "://" in addr else "http://" + addr]
        if key is not None:
            data["trigger-key"] = key
        for name, value in fields.items():
            if value is not None:
                data[name.replace("_", "-")] = value
        counter[0] += 1
        path = tmp_path / ("vip-manager-%d.yml" % counter[0])
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


@pytest.fixture
def notify_socket(tmp_path):
    """notify_socket(abstract=False) -> a NotifySocket, closed at teardown."""
    made = []

    def make(abstract=False):
        path = ("@vip-elector-test-%s" % uuid.uuid4().hex if abstract
                else str(tmp_path / ("notify-%d.sock" % len(made))))
        made.append(NotifySocket(path))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def acl_node_a(consul_factory):
    """An agent with ACLs on (default deny), its node named as in the examples."""
    return consul_factory(node="node-a", acl=True)


@pytest.fixture
def example_token(acl_node_a, key):
    """A token with exactly examples/consul-acl-policy.hcl's rules, for this test's key."""
    from consul_agent import elector_rules
    return acl_node_a.create_token(elector_rules(key, acl_node_a.node), "vip-elector on node-a")
