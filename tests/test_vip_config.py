"""--manage-vip's settings: vip-manager's ip/netmask/interface in both file forms (SPEC §12.5).

Unit tests: no Consul, no privilege. The interface must exist, so the tests
use `lo` (present in every network namespace) as the one that does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vip_elector.address import VipSettings, restart_coming
from vip_elector.config import ConfigError, Options, build_settings

BASE_YAML = "dcs-type: consul\ntrigger-key: service/pg/leader\ntrigger-value: pg-1\n"
BASE_ENV = "VIP_DCS_TYPE=consul\nVIP_TRIGGER_KEY=service/pg/leader\nVIP_TRIGGER_VALUE=pg-1\n"


def settings_of(tmp_path, text, manage_vip=True, name="vip-manager.yml"):
    path = tmp_path / name
    path.write_text(text)
    return build_settings(Options(vip_manager_config=str(path), manage_vip=manage_vip), {},
                          kernel_hostname="pg-1")


def error_of(tmp_path, text, name="vip-manager.yml"):
    with pytest.raises(ConfigError) as e:
        settings_of(tmp_path, text, name=name)
    message = str(e.value)
    assert str(tmp_path / name) in message  # names the file
    assert "\n" not in message
    return message


@pytest.mark.parametrize("lines,expected", [
    ("ip: 10.0.0.10\nnetmask: 24\ninterface: lo\n", VipSettings("10.0.0.10", 24, "lo")),
    ("ip: 10.0.0.10\nnetmask: '24'\ninterface: lo\n", VipSettings("10.0.0.10", 24, "lo")),
    ("ip: 10.0.0.10\ninterface: lo\n", VipSettings("10.0.0.10", 32, "lo")),      # no netmask: a host address
    ("ip: 10.0.0.10\nnetmask: -1\ninterface: lo\n", VipSettings("10.0.0.10", 32, "lo")),  # vip-manager's default
    ("ip: 'fd00:0::10'\nnetmask: 64\ninterface: lo\n", VipSettings("fd00::10", 64, "lo")),
    ("ip: 'fd00::10'\ninterface: lo\n", VipSettings("fd00::10", 128, "lo")),
])
def test_yaml_form(tmp_path, lines, expected):
    assert settings_of(tmp_path, BASE_YAML + lines).vip == expected


@pytest.mark.parametrize("lines", [
    "VIP_IP=10.0.0.10\nVIP_NETMASK=24\nVIP_INTERFACE=lo\n",
    "VIP_IP=10.0.0.10\nVIP_MASK=24\nVIP_IFACE=lo\n",        # Debian's legacy names
    "VIP_IP=\"10.0.0.10\"\nVIP_NETMASK='24'\nVIP_IFACE=lo\n",
])
def test_env_form_new_and_legacy_names(tmp_path, lines):
    vip = settings_of(tmp_path, BASE_ENV + lines, name="vip-manager.env").vip
    assert vip == VipSettings("10.0.0.10", 24, "lo")


def test_without_manage_vip_the_vip_settings_are_not_needed(tmp_path):
    assert settings_of(tmp_path, BASE_YAML, manage_vip=False).vip is None
    # ...nor checked: vip-manager may run on another interface set than ours.
    assert settings_of(tmp_path, BASE_YAML + "ip: nonsense\ninterface: nope0\n", manage_vip=False).vip is None


@pytest.mark.parametrize("lines,must_say", [
    ("netmask: 24\ninterface: lo\n", ["does not set ip", "ip: 10.0.0.10"]),
    ("ip: ''\ninterface: lo\n", ["does not set ip"]),
    ("ip: 10.0.0.300\ninterface: lo\n", ["ip '10.0.0.300' is not an IP address"]),
    ("ip: 10.0.0.10/24\ninterface: lo\n", ["is not an IP address", "netmask"]),
    ("ip: 10.0.0.10\nnetmask: 255.255.255.0\ninterface: lo\n",
     ["netmask '255.255.255.0' is not a prefix length", "write 24 for 255.255.255.0"]),
    ("ip: 10.0.0.10\nnetmask: abc\ninterface: lo\n", ["netmask 'abc' is not a prefix length"]),
    ("ip: 10.0.0.10\nnetmask: 33\ninterface: lo\n", ["netmask 33 is out of range", "1 to 32"]),
    ("ip: 10.0.0.10\nnetmask: 0\ninterface: lo\n", ["netmask 0 is out of range"]),
    ("ip: 'fd00::10'\nnetmask: 129\ninterface: lo\n", ["1 to 128"]),
    ("ip: 10.0.0.10\nnetmask: 24\n", ["does not set interface", "interface: eth0"]),
    ("ip: 10.0.0.10\nnetmask: 24\ninterface: nope0\n", ["interface 'nope0' does not exist", "lo"]),
    ("ip: 127.0.0.2\ninterface: lo\n", ["cannot be a virtual IP"]),
    ("ip: 224.0.0.5\ninterface: lo\n", ["cannot be a virtual IP"]),
    ("ip: [10.0.0.10]\ninterface: lo\n", ["'ip' must be a single value"]),
])
def test_yaml_errors_name_the_setting(tmp_path, lines, must_say):
    message = error_of(tmp_path, BASE_YAML + lines)
    for text in must_say:
        assert text in message


@pytest.mark.parametrize("lines,must_say", [
    ("VIP_NETMASK=24\nVIP_INTERFACE=lo\n", ["does not set VIP_IP", "VIP_IP=10.0.0.10"]),
    ("VIP_IP=10.0.0.10\nVIP_MASK=255.255.0.0\nVIP_IFACE=lo\n", ["VIP_MASK '255.255.0.0'", "write 16"]),
    ("VIP_IP=10.0.0.10\nVIP_NETMASK=40\nVIP_IFACE=lo\n", ["VIP_NETMASK 40 is out of range"]),
    ("VIP_IP=10.0.0.10\nVIP_NETMASK=24\n", ["does not set VIP_INTERFACE or VIP_IFACE", "VIP_INTERFACE=eth0"]),
    ("VIP_IP=10.0.0.10\nVIP_IFACE=nope0\n", ["VIP_IFACE 'nope0' does not exist"]),
])
def test_env_errors_name_the_variable(tmp_path, lines, must_say):
    message = error_of(tmp_path, BASE_ENV + lines, name="vip-manager.env")
    for text in must_say:
        assert text in message


def run_cli(*args, env=None):
    import os
    full_env = dict(os.environ)
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "vip_elector", *args], capture_output=True,
                          text=True, env=full_env, timeout=30)


def test_daemon_exits_78_naming_the_setting(tmp_path):
    path = tmp_path / "vip-manager.yml"
    path.write_text(BASE_YAML + "ip: 10.0.0.10\nnetmask: 24\ninterface: nope0\n")
    result = run_cli("--vip-manager-config", str(path), "--manage-vip")
    assert result.returncode == 78, result.stderr
    assert "interface 'nope0' does not exist" in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    # The drop-in's variable means the same as the flag.
    result = run_cli("--vip-manager-config", str(path), env={"VIP_ELECTOR_MANAGE_VIP": "yes"})
    assert result.returncode == 78 and "nope0" in result.stderr
    # --check reports it as a problem.
    result = run_cli("--vip-manager-config", str(path), "--manage-vip", "--check")
    assert result.returncode == 1 and "FAIL" in result.stdout and "nope0" in result.stdout


# --- ExecStopPost=: is systemd about to restart the daemon? -------------------------

@pytest.mark.parametrize("env,restart", [
    ({}, False),                                                        # not in ExecStopPost (OnFailure)
    ({"SERVICE_RESULT": "success", "EXIT_CODE": "exited", "EXIT_STATUS": "0"}, False),  # systemctl stop
    ({"SERVICE_RESULT": "success", "EXIT_CODE": "killed", "EXIT_STATUS": "TERM"}, False),
    ({"SERVICE_RESULT": "success", "EXIT_CODE": "killed", "EXIT_STATUS": "HUP"}, True),  # RestartForceExitStatus
    ({"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}, True),  # kill -9
    ({"SERVICE_RESULT": "core-dump", "EXIT_CODE": "dumped", "EXIT_STATUS": "SEGV"}, True),
    ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "1"}, True),
    ({"SERVICE_RESULT": "watchdog", "EXIT_CODE": "killed", "EXIT_STATUS": "ABRT"}, True),
    ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "78"}, False),  # RestartPreventExitStatus
    ({"SERVICE_RESULT": "exit-code", "EXIT_CODE": "exited", "EXIT_STATUS": "2"}, False),
])
def test_restart_coming(env, restart):
    assert bool(restart_coming(env)) is restart


def test_drop_vip_keeps_the_address_when_a_restart_is_coming(tmp_path):
    path = tmp_path / "vip-manager.yml"
    path.write_text(BASE_YAML + "ip: 10.0.0.10\nnetmask: 24\ninterface: lo\n")
    result = run_cli("--drop-vip", "--vip-manager-config", str(path),
                     env={"SERVICE_RESULT": "signal", "EXIT_CODE": "killed", "EXIT_STATUS": "KILL"})
    assert result.returncode == 0, result.stderr
    assert "keeping VIP 10.0.0.10/24 on lo" in result.stdout


def test_drop_vip_with_a_bad_configuration_says_so(tmp_path):
    path = tmp_path / "vip-manager.yml"
    path.write_text(BASE_YAML + "netmask: 24\ninterface: lo\n")
    result = run_cli("--drop-vip", "--vip-manager-config", str(path))
    assert result.returncode == 78 and "does not set ip" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_the_vip_and_whether_it_is_here(tmp_path):
    """--check names the address and says whether this node has it (here: lo has not)."""
    path = tmp_path / "vip-manager.yml"
    path.write_text(BASE_YAML + "ip: 10.0.0.10\nnetmask: 24\ninterface: lo\n")
    result = run_cli("--vip-manager-config", str(path), "--manage-vip", "--check",
                     "--addr", "127.0.0.1:1")          # no Consul there: that line fails, not this one
    assert "ok    VIP 10.0.0.10/24 on lo (--manage-vip, from %s) is not on this node now" % path \
        in result.stdout, result.stdout

