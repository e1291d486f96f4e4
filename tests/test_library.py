"""Which Consul library runs, and whether it is one the tests run (issue 12):
`--check` warns plainly about any other (trixie-backports, a pip install)."""

import types

import pytest

from vip_elector.library import describe, untested_warning


def fake(version, path="/opt/lib/consul/__init__.py"):
    module = types.ModuleType("consul_fake_for_test")   # no distribution provides it
    module.__version__ = version
    module.__file__ = path
    return module


@pytest.mark.parametrize("version, distribution", [
    ("0.1.5", "python-consul2"), ("0.7.1", "python-consul"), ("1.5.5", "py-consul"),
    ("1.5.0", "py-consul")])
def test_tested_libraries_pass_quietly(version, distribution):
    lib = describe(fake(version))
    assert (lib.distribution, lib.version, lib.path) == (distribution, version, "/opt/lib/consul")
    assert lib.tested
    assert untested_warning(fake(version)) is None


@pytest.mark.parametrize("version", ["1.6.0", "1.4.2", "0.1.6", "1.0.0", "?"])
def test_other_versions_are_named_as_untested(version):
    text = untested_warning(fake(version))
    assert text and version in text and "/opt/lib/consul" in text, text
    assert "has not been tested" in text and "py-consul 1.5.x" in text, text
    assert "Traceback" not in text and "\n" not in text


# `--version` from a source checkout on a host without any Consul library
# (issue 19, item 8): the version, not a traceback. sys.modules["consul"] = None
# makes every `import consul` fail exactly as on such a host.
WITHOUT_CONSUL = ("import sys; sys.modules['consul'] = None; sys.modules['consul.base'] = None; "
                  "from vip_elector.cli import main; sys.exit(main(sys.argv[1:]))")


def run_without_consul(*args, tmp_path):
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": repo, "LANG": "C.UTF-8"}
    return subprocess.run([sys.executable, "-c", WITHOUT_CONSUL, *args], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=60)


def test_version_without_a_consul_library_prints_the_version(tmp_path):
    import vip_elector
    r = run_without_consul("--version", tmp_path=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith("vip-elector %s (" % vip_elector.__version__), r.stdout
    assert "no Consul library is installed" in r.stdout and "python3-consul" in r.stdout, r.stdout


def test_daemon_and_check_without_a_consul_library_say_so_in_one_line(tmp_path):
    config = tmp_path / "vip-manager.yml"
    config.write_text("dcs-type: consul\ntrigger-key: service/haproxy-vip/leader\ntrigger-value: node-a\n")
    daemon = run_without_consul("--vip-manager-config", str(config), tmp_path=tmp_path)
    assert daemon.returncode == 78 and "Traceback" not in daemon.stderr, daemon.stderr
    assert len(daemon.stderr.splitlines()) == 1 and "install python3-consul2" in daemon.stderr, daemon.stderr
    check = run_without_consul("--vip-manager-config", str(config), "--check", tmp_path=tmp_path)
    assert check.returncode == 1 and "Traceback" not in check.stdout + check.stderr, check.stderr
    assert "FAIL" in check.stdout and "install python3-consul2" in check.stdout, check.stdout
