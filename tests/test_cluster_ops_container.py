"""`vip-elector list` and `switchover` from the installed package, as root and as the
service user, with nothing but the service's own configuration (issue 16, SPEC §11).

A booted bookworm container runs the package under ACLs (the example policy's token in
/etc/default/vip-elector, 0640 root:vip-elector); a second candidate runs on the host.
The commands are given no option at all: they take VIP_ELECTOR_OPTS and the token from
the defaults file, as an operator types them.
"""

import json
import os

import pytest

from consul_agent import ConsulAgent, elector_rules, wait_for
from debbuild import series_or_skip
from package_steps import CONFFILE, apt_install, assert_quiet, internal_errors, wait_leading, \
    write_vip_manager_config

pytestmark = [pytest.mark.container, pytest.mark.consul]

NAME = "ct-node"
OPTS = "--vip-manager-config=/etc/vip-manager.yml --ttl=10s --lock-delay=1s --priority=150"


@pytest.fixture(scope="module")
def agent(consul_binary, tmp_path_factory):
    a = ConsulAgent(tmp_path_factory.mktemp("consul-ops"), node="ops-host-node", acl=True,
                    binary=consul_binary)
    a.start()
    yield a
    a.kill()


@pytest.fixture(scope="module")
def key():
    return "service/ops-ct-%d-%s/leader" % (os.getpid(), os.urandom(3).hex())


@pytest.fixture(scope="module")
def ct(request):
    from container import container_fixture
    yield from container_fixture(request)


def holder(agent, key):
    held = agent.holder(key)
    return held[0] if held else None


def test_list_and_switchover_as_root_and_as_the_service_user(ct, agent, key, electors, write_config):
    debs = series_or_skip(1)
    assert_quiet(apt_install(ct, debs["v1"]), "apt install")
    token = agent.create_token(elector_rules(key, agent.node), "vip-elector in the container")
    write_vip_manager_config(ct, agent, key, NAME)
    ct.put(CONFFILE, 'VIP_ELECTOR_OPTS="%s"\nCONSUL_HTTP_TOKEN=%s\n' % (OPTS, token),
           mode=0o640, group="vip-elector")
    ct.systemctl("restart", "vip-elector")
    wait_leading(ct, agent, key, NAME)
    electors(["--vip-manager-config", write_config(agent.http_addr, key), "--hostname", "host-node"],
             env={"CONSUL_HTTP_TOKEN": token}, name="host-node")
    wait_for(lambda: agent.kv_get(key + "/candidates/host-node"), 20, message="the host's candidate key")

    res = ct.run(["vip-elector", "list"], check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "%s: held by %s" % (key, NAME)
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:]}
    assert rows[NAME][2:4] == ["leader", "150"] and rows["host-node"][2:4] == ["standby", "100"], res.stdout

    res = ct.run(["runuser", "-u", "vip-elector", "--", "vip-elector", "list", "--json"], check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["holder"] == NAME

    res = ct.run(["runuser", "-u", "vip-elector", "--", "vip-elector", "switchover", "--to", "host-node"],
                 check=False, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "switched over: host-node holds" in res.stdout
    assert holder(agent, key) == "host-node"
    assert ct.show("vip-elector", "ActiveState")["ActiveState"] == "active"

    res = ct.run(["runuser", "-u", "nobody", "--", "vip-elector", "list"], check=False)
    assert res.returncode == 2 and "member of the vip-elector group" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1

    res = ct.run(["vip-elector", "switchover"], check=False, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert holder(agent, key) == NAME
    assert not internal_errors(ct)
