"""The manage-vip drop-in and its helper unit, as shipped (pure: no root, no container).

The default unit keeps its exposure (tests/test_systemd_container.py checks
1.1); with the drop-in it stays at most 2.0, and the drop-in grants exactly
CAP_NET_ADMIN and CAP_NET_RAW. The package installs what the man page and
the error messages tell the operator to link.
"""

import os
import re
import shutil
import subprocess

import pytest

from vip_elector.address import DROP_IN, DROP_IN_TARGET

SOURCE = os.environ.get("VIP_ELECTOR_SOURCE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(SOURCE, *parts), encoding="utf-8") as f:
        return f.read()


def directives(text):
    return [tuple(ln.split("=", 1)) for ln in text.splitlines()
            if ln.strip() and not ln.startswith(("#", "[")) and "=" in ln]


def exposure(path):
    res = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", path],
                         capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
@pytest.mark.parametrize("unit,dropin", [("vip-elector.service", "manage-vip.conf"),
                                         ("vip-elector@.service", "manage-vip-instance.conf")])
def test_exposure_with_the_drop_in_at_most_2(tmp_path, unit, dropin):
    # A later assignment in a drop-in adds to (or sets) what the unit says: the
    # concatenation is what systemd runs.
    merged = tmp_path / unit.replace("@", "@x")
    merged.write_text(read("systemd", unit) + "\n" + read("systemd", dropin))
    score = exposure(str(merged))
    print("exposure of %s with %s: %s" % (unit, dropin, score))
    assert score <= 2.0
    assert exposure(os.path.join(SOURCE, "systemd", unit)) <= 1.1  # the unit as shipped


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_helper_unit_is_sandboxed():
    assert exposure(os.path.join(SOURCE, "systemd", "vip-elector-drop-vip@.service")) <= 2.0


@pytest.mark.parametrize("dropin", ["manage-vip.conf", "manage-vip-instance.conf"])
def test_drop_in_grants_exactly_the_vip_privileges(dropin):
    d = dict(directives(read("systemd", dropin)))
    assert d["AmbientCapabilities"] == d["CapabilityBoundingSet"] == "CAP_NET_ADMIN CAP_NET_RAW"
    assert d["PrivateUsers"] == "no"
    assert d["RestrictAddressFamilies"] == "AF_NETLINK AF_PACKET"
    assert d["Environment"] == "VIP_ELECTOR_MANAGE_VIP=yes"
    assert d["ExecStopPost"] == "-/usr/bin/vip-elector --drop-vip $VIP_ELECTOR_OPTS"
    assert d["OnFailure"].startswith("vip-elector-drop-vip@vip-elector")
    # The two differ only in the defaults file the helper reads.
    other = dict(directives(read("systemd", "manage-vip.conf")))
    assert {k: v for k, v in d.items() if k != "OnFailure"} == \
        {k: v for k, v in other.items() if k != "OnFailure"}


def test_package_installs_what_the_messages_name():
    install = read("debian", "vip-elector.install")
    assert "systemd/manage-vip.conf usr/share/vip-elector/" in install
    assert "systemd/manage-vip-instance.conf usr/share/vip-elector/" in install
    assert "systemd/vip-elector-drop-vip@.service usr/lib/systemd/system/" in install
    assert DROP_IN == "/usr/share/vip-elector/manage-vip.conf"
    assert DROP_IN_TARGET.startswith("/etc/systemd/system/vip-elector.service.d/")
    assert "python3-pyroute2" in read("debian", "control")
    assert DROP_IN.replace("-", "\\-") in read("debian", "vip-elector.8")


def test_setup_cfg_lists_every_package_of_the_source_tree():
    """pybuild installs only the packages setup.cfg names: a subpackage left out (vip_elector.address,
    vip_elector.election) would be missing from the .deb while every source-tree test passes."""
    listed = re.search(r"^packages\s*=\s*(.+)$", read("setup.cfg"), re.M).group(1)
    listed = {name.strip() for name in listed.split(",")}
    found = {os.path.relpath(root, SOURCE).replace(os.sep, ".")
             for root, _, files in os.walk(os.path.join(SOURCE, "vip_elector"))
             if "__init__.py" in files}
    assert "vip_elector.address" in found and listed == found, (listed, found)
