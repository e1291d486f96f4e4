"""The package under ACLs, as production runs it, in a booted bookworm container (issue 19).

The host's Consul agent has ACLs on (default deny); the node's token is made
from examples/consul-acl-policy.hcl and set the way README tells operators:
CONSUL_HTTP_TOKEN in /etc/default/vip-elector (0640 root:vip-elector). Such a
token cannot read the agent's own node name; reload, reinstall and a kill -9
restart must still leave the key untouched for longer than Consul could keep
an orphaned session (2×TTL), and a reload the daemon refuses fails
`systemctl reload`. The tests run in file order and follow the node's life.
"""

import os

import pytest

from consul_agent import ConsulAgent, elector_rules, wait_for
from debbuild import series_or_skip
from package_steps import (CONFFILE, apt_install, assert_quiet, internal_errors, journal_entries,
                           key_untouched, main_pid, step, unit, wait_leading,
                           write_vip_manager_config)

pytestmark = [pytest.mark.container, pytest.mark.consul]

NAME = "acl-node"
TTL_S = 10
UNTOUCHED_S = 2 * TTL_S + 2
OPTS = "--vip-manager-config=/etc/vip-manager.yml --ttl=%ds --lock-delay=1s" % TTL_S

__all__ = ["step"]  # the fixture, imported for the tests below
TOKEN = {}          # the node's token, made by the first step


@pytest.fixture(scope="module")
def agent(consul_binary, tmp_path_factory):
    a = ConsulAgent(tmp_path_factory.mktemp("consul-acl"), node="acl-host-node", acl=True,
                    binary=consul_binary)
    a.start()
    yield a
    a.kill()


@pytest.fixture(scope="module")
def key():
    return "service/acl-ct-%d-%s/leader" % (os.getpid(), os.urandom(3).hex())


@pytest.fixture(scope="module")
def debs():
    return series_or_skip(1)


@pytest.fixture(scope="module")
def ct(request):
    from container import container_fixture
    yield from container_fixture(request)


def defaults(ct, token, opts=OPTS):
    ct.put(CONFFILE, 'VIP_ELECTOR_OPTS="%s"\nCONSUL_HTTP_TOKEN=%s\n' % (opts, token),
           mode=0o640, group="vip-elector")


def messages(ct, cursor_entries_before):
    return [str(e.get("MESSAGE")) for e in journal_entries(ct)][cursor_entries_before:]


def test_leads_with_the_example_token(ct, agent, key, debs, step):
    assert_quiet(apt_install(ct, debs["v1"]), "apt install")
    token = agent.create_token(elector_rules(key, agent.node), "vip-elector on the container")
    write_vip_manager_config(ct, agent, key, NAME)
    defaults(ct, token)
    ct.systemctl("restart", "vip-elector")
    wait_leading(ct, agent, key, NAME)
    TOKEN["secret"] = token


def test_reload_keeps_the_key_past_two_ttls(ct, agent, key, step):
    step("test_leads_with_the_example_token")
    pid, n = main_pid(ct), len(journal_entries(ct))
    with key_untouched(agent, key, settle=UNTOUCHED_S):
        ct.systemctl("reload", "vip-elector")
    assert main_pid(ct) == pid
    said = messages(ct, n)
    assert any(m.startswith("resumed leadership") for m in said), said
    assert not any("not this daemon's" in m or "following" in m for m in said), said
    assert not any("LOCK ACQUIRED" in m for m in said), said
    assert unit(ct, "StatusText")["StatusText"].startswith("leader: holding")


def test_reinstall_reloads_and_keeps_the_key(ct, agent, key, debs, step):
    step("test_reload_keeps_the_key_past_two_ttls")
    pid = main_pid(ct)
    with key_untouched(agent, key, settle=UNTOUCHED_S):
        assert_quiet(apt_install(ct, debs["v1"], "--reinstall"), "apt install --reinstall")
    assert main_pid(ct) == pid, "a reinstall reloads, never restarts"


def test_kill_9_restart_keeps_the_key(ct, agent, key, step):
    step("test_reinstall_reloads_and_keeps_the_key")
    pid = main_pid(ct)
    with key_untouched(agent, key, settle=UNTOUCHED_S):
        ct.run(["kill", "-9", pid])
        wait_for(lambda: unit(ct, "MainPID")["MainPID"] not in ("0", pid), 20,
                 message="systemd restarting the daemon")
    wait_leading(ct, agent, key, NAME)
    assert not internal_errors(ct)


def test_refused_reload_fails_systemctl_reload_and_keeps_leading(ct, agent, key, step):
    step("test_kill_9_restart_keeps_the_key")
    pid = main_pid(ct)
    defaults(ct, TOKEN["secret"], OPTS + " --check-id=vip-not-registered")
    with key_untouched(agent, key):
        res = ct.systemctl("reload", "vip-elector", check=False)
    assert res.returncode != 0, "systemctl reload succeeded although the daemon refused it"
    assert main_pid(ct) == pid
    status = unit(ct, "StatusText", "ActiveState")
    assert status["ActiveState"] == "active"
    assert "reload failed" in status["StatusText"] and "vip-not-registered" in status["StatusText"], status
    # Fixed again: the next reload applies and clears the note.
    defaults(ct, TOKEN["secret"])
    with key_untouched(agent, key):
        ct.systemctl("reload", "vip-elector")
    wait_for(lambda: "reload failed" not in unit(ct, "StatusText")["StatusText"], 20,
             message="the note cleared by a good reload")
    ct.systemctl("stop", "vip-elector")
    assert agent.kv_get(key) is None, "the planned stop released the key"
