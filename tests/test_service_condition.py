"""The units' start condition and --check-service's pure parts (fast, no systemd).

The booted-container proof is tests/test_operator_container.py.
"""

import pytest

from vip_elector import cli, service


def condition(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().out


def test_no_options_says_what_to_set_and_where(capsys):
    code, out = condition(["--service-condition"], capsys)
    assert code == 1
    assert out.count("\n") == 1, "one line in systemctl status"
    assert "set VIP_ELECTOR_OPTS in /etc/default/vip-elector" in out
    assert "--vip-manager-config=" in out and "--check-id=" in out
    assert "systemctl restart vip-elector" in out


def test_an_instance_names_its_own_file_and_unit(capsys):
    code, out = condition(["--service-condition=db1"], capsys)
    assert code == 1
    assert "/etc/default/vip-elector-db1" in out and "systemctl restart vip-elector@db1" in out
    assert "--check-service=db1" in out


def test_options_without_the_config_flag(capsys):
    code, out = condition(["--service-condition", "--check-id=x"], capsys)
    assert code == 1 and "has no --vip-manager-config" in out


@pytest.mark.parametrize("form", ["--vip-manager-config={path}", "--vip-manager-config {path}"])
def test_config_missing_empty_present(tmp_path, capsys, form):
    path = tmp_path / "vip-manager.yml"
    argv = ["--service-condition"] + form.format(path=path).split() + ["--check-id=x"]
    code, out = condition(argv, capsys)
    assert code == 1 and "%s (--vip-manager-config in /etc/default/vip-elector) does not exist" % path in out
    path.write_text("")
    code, out = condition(argv, capsys)
    assert code == 1 and "is empty" in out
    path.write_text("dcs-type: etcd\n")     # invalid, but the daemon says so (exit 78), not the condition
    assert condition(argv, capsys) == (0, "")


def test_condition_accepts_what_the_daemon_would_refuse(tmp_path, capsys):
    """Unknown flags are the daemon's to report (exit 2): the condition lets it start."""
    path = tmp_path / "vip-manager.yml"
    path.write_text("dcs-type: consul\n")
    assert condition(["--service-condition", "--vip-manager-config", str(path), "--bogus"], capsys) == (0, "")


def test_config_path_follows_argparse():
    assert service.config_path(["--vip-manager-config=/a", "--vip-manager-config", "/b"]) == "/b"
    assert service.config_path(["--check-id", "x"]) is None


def test_check_service_needs_root(capsys, monkeypatch):
    monkeypatch.setattr(service.os, "geteuid", lambda: 1000)
    assert cli.main(["--check-service"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "as root" in out and "/etc/default/vip-elector" in out


def test_check_service_never_shows_a_token():
    assert service._masked(["--token=s3cret", "--check-id", "x", "--token", "s3cret"]) == \
        ["--token=***", "--check-id", "x", "--token", "***"]
