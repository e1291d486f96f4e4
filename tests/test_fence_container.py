"""The example fencing hook and its drop-in under the real, sandboxed unit (SPEC §10.5).

A booted bookworm container with the built package, the host's Consul agent
and polkitd: what tests/test_fence_hook.py proves in a network namespace
(the hook keeps the VIP off against vip-manager), this proves under
systemd — that the default unit's sandbox plus the shipped drop-in give the
hook exactly what it needs and no more:

  * CAP_NET_ADMIN reaches the hook (a probe hook asks the kernel to delete
    an address that is not there: "Address not found" with the drop-in; a
    refused request without it; no address of the host is touched — the
    container shares the host's network);
  * the example hook, through the polkit rule, starts vip-manager.service
    (a stand-in unit here) when the node leads and stops it on `standby`
    (a planned stop of vip-elector), and the stop still hands the key over;
  * the exposure score with the drop-in is reported.
"""

import os
import re

import pytest

from helpers import no_internal_errors, wait_for
from debbuild import build_deb, build_unavailable
from package_steps import apt_install, set_options, unit, wait_leading

pytestmark = [pytest.mark.container, pytest.mark.consul]

NAME = "fence-node"
EXAMPLES = "/usr/share/doc/vip-elector/examples"
HOOK = "/usr/local/sbin/vip-elector-fence"
PROBE = "/usr/local/sbin/cap-probe"
DROPIN = "/etc/systemd/system/vip-elector.service.d/fence.conf"
# An address no interface has: deleting it proves the right without changing anything.
ABSENT = "192.0.2.254/32"


@pytest.fixture(scope="module")
def ct(request):
    # nspawn withholds CAP_NET_ADMIN from a container on the host's network;
    # the drop-in can only hand on what the container's systemd has.
    from container import container_fixture
    yield from container_fixture(request, nspawn_args=["--capability=CAP_NET_ADMIN"])


@pytest.fixture(scope="module")
def installed(ct, consul):
    reason = build_unavailable()
    if reason:
        pytest.skip(reason)
    if ct.run(["test", "-x", "/usr/lib/polkit-1/polkitd"], check=False).returncode != 0:
        pytest.skip("no polkitd in the container's rootfs (tests/tools/rootfs)")
    key = "service/fence-ct-%s/leader" % os.urandom(3).hex()
    ct.put("/etc/vip-manager.yml",
           "dcs-type: consul\ndcs-endpoints: [\"%s\"]\ntrigger-key: %s\ntrigger-value: %s\n"
           "ip: 192.0.2.77\nnetmask: 24\ninterface: lo\n" % (consul.url, key, NAME))
    # vip-manager's stand-in: the hook only starts and stops it.
    ct.put("/etc/systemd/system/vip-manager.service",
           "[Unit]\nDescription=stand-in for vip-manager\n[Service]\nExecStart=/bin/sleep infinity\n")
    res = apt_install(ct, build_deb())
    assert res.returncode == 0, res.stdout + res.stderr
    ct.run(["install", "-m", "0755", EXAMPLES + "/vip-elector-fence", HOOK])
    ct.run(["install", "-D", "-m", "0644", EXAMPLES + "/vip-elector-fence.conf", DROPIN])
    ct.run(["install", "-D", "-m", "0644", EXAMPLES + "/vip-elector-fence.rules",
            "/etc/polkit-1/rules.d/50-vip-elector-fence.rules"])
    ct.put(PROBE, '#!/bin/sh\nout=$(ip addr del %s dev lo 2>&1); echo "probe: rc=$? $out"\n'
           % ABSENT, mode=0o755)
    ct.run(["systemctl", "restart", "polkit"], check=False)
    return key


def hook_lines(ct, name, since=""):
    out = ct.journal("-u", "vip-elector", "-o", "cat", *(["--since", since] if since else []))
    return [line for line in out.splitlines() if line.startswith("hook %s" % name)]


@pytest.mark.parametrize("dropin", [False, True], ids=["default unit", "with the drop-in"])
def test_capability_reaches_the_hook_only_with_the_drop_in(ct, consul, installed, dropin):
    key = installed
    if not dropin:
        ct.run(["mv", DROPIN, DROPIN + ".off"])
    try:
        ct.run(["systemctl", "daemon-reload"])
        set_options(ct, "--vip-manager-config=/etc/vip-manager.yml --hook=%s" % PROBE)
        ct.systemctl("restart", "vip-elector")
        wait_leading(ct, consul, key, NAME)
        lines = wait_for(lambda: [l for l in hook_lines(ct, "cap-probe") if "probe: rc=" in l], 20,
                         message="the probe hook's answer in the journal")
        # The kernel answered "no such address" only when the request was allowed
        # (netlink socket and CAP_NET_ADMIN); without the drop-in, `ip` is refused.
        answered = any(word in lines[-1] for word in ("Address not found", "Cannot assign requested"))
        assert answered == dropin and "rc=0" not in lines[-1], lines
        ct.systemctl("stop", "vip-elector")
        assert consul.kv_get(key) is None, "the planned stop hands the key over"
    finally:
        if not dropin:
            ct.run(["mv", DROPIN + ".off", DROPIN])
            ct.run(["systemctl", "daemon-reload"])


def test_example_hook_starts_and_stops_vip_manager_under_the_sandbox(ct, consul, installed):
    key = installed
    set_options(ct, "--vip-manager-config=/etc/vip-manager.yml --hook=%s" % HOOK)
    ct.run(["systemctl", "stop", "vip-manager"], check=False)
    ct.systemctl("restart", "vip-elector")
    wait_leading(ct, consul, key, NAME)
    wait_for(lambda: unit_state(ct, "vip-manager") == "active", 20,
             message="the hook's `leader` call to start vip-manager (through polkit)")
    # The hook logs its exit a moment after the vip-manager it started is active.
    wait_for(lambda: any("leader: exited 0" in l for l in hook_lines(ct, "vip-elector-fence")), 20,
             message="the hook's `leader` call to exit 0")
    ct.systemctl("stop", "vip-elector")            # a planned stop: `standby` before the release
    assert unit_state(ct, "vip-manager") == "inactive", hook_lines(ct, "vip-elector-fence")
    lines = hook_lines(ct, "vip-elector-fence")
    assert any("standby: exited 0" in l for l in lines), lines
    assert consul.kv_get(key) is None
    assert unit(ct, "Result")["Result"] == "success"
    journal = ct.journal("-u", "vip-elector", "-o", "cat")
    no_internal_errors(journal)


def test_exposure_with_the_drop_in_is_reported(ct, installed):
    res = ct.run(["systemd-analyze", "security", "--no-pager", "vip-elector.service"])
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout).group(1))
    print("systemd-analyze security with the fencing drop-in: %s" % score)
    assert score <= 2.0, res.stdout[-2000:]


def unit_state(ct, name):
    return ct.show(name + ".service", "ActiveState")["ActiveState"]
