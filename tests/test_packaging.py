"""The Debian packaging agrees with the program (pure: no Consul, no root).

The man page documents exactly the options the CLI has, with its defaults;
/etc/default/vip-elector holds options the CLI accepts; the shipped examples
are valid configurations that say the same in both forms; the package version
is the program's. These also run inside `dpkg-buildpackage` (debian/rules
points VIP_ELECTOR_SOURCE at the source tree, since pybuild runs the tests
from its build directory, which has no debian/ or examples/).
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

import vip_elector
from vip_elector import cli
from vip_elector.config import Options, build_settings

SOURCE = os.environ.get("VIP_ELECTOR_SOURCE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source(*parts):
    path = os.path.join(SOURCE, *parts)
    assert os.path.exists(path), "%s missing (set VIP_ELECTOR_SOURCE to the source tree)" % path
    return path


def read(*parts):
    with open(source(*parts), encoding="utf-8") as f:
        return f.read()


def man_options():
    """{option: text of its paragraph} from the OPTIONS section of the man page."""
    roff = read("debian", "vip-elector.8")
    section = roff.split("\n.SH OPTIONS\n", 1)[1].split("\n.SH ", 1)[0]
    found = {}
    for block in section.split("\n.TP\n")[1:]:
        tag, _, body = block.partition("\n")
        names = re.findall(r"\\-\\-([a-z][a-z\\-]*)", tag)
        assert names, "an OPTIONS paragraph without an option: %r" % tag
        for name in names:
            found["--" + name.replace("\\-", "-")] = body
    return found


def cli_options(capsys):
    assert cli.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    return set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z-]*)", help_text, re.M))


def test_man_page_documents_exactly_the_cli_options(capsys):
    assert set(man_options()) == cli_options(capsys)


def test_man_page_gives_the_cli_defaults():
    args = cli.parse_args(["--vip-manager-config", "/dev/null"])
    documented = man_options()
    for option in ("--ttl", "--lock-delay"):
        default = getattr(args, option[2:].replace("-", "_"))
        assert re.search(r"Default:\n\.BR %s \.$" % re.escape(default), documented[option]), \
            "%s: the man page does not give the default %s" % (option, default)


def test_man_page_renders_without_warnings():
    res = subprocess.run(["groff", "-man", "-ww", "-z", source("debian", "vip-elector.8")],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr


def environment_file(text):
    """NAME=value lines as systemd's EnvironmentFile= reads them (comments skipped)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = " ".join(shlex.split(value))
    return values


def test_defaults_file_sets_nothing_and_its_example_is_valid():
    """SPEC §7: no active VIP_ELECTOR_OPTS (the unit stays skipped until the
    operator sets it); the commented worked example is options the CLI accepts."""
    text = read("debian", "vip-elector.default")
    assert environment_file(text) == {}, "the shipped defaults file must set nothing"
    assert re.search(r"^#CONSUL_HTTP_TOKEN=$", text, re.M)
    assert "vip-elector --check-service" in text
    example = re.findall(r"^#(VIP_ELECTOR_OPTS=.*)$", text, re.M)
    assert len(example) == 1, example
    env = environment_file(example[0])
    # ExecStart=/usr/bin/vip-elector $VIP_ELECTOR_OPTS: systemd splits it at whitespace.
    args = cli.parse_args(env["VIP_ELECTOR_OPTS"].split())
    assert args.vip_manager_config == "/etc/vip-manager.yml" and args.check_id
    cli.options_from(args)


UNITS = ("vip-elector.service", "vip-elector@.service")


def unit_directives(text):
    """[(name, value)] of a unit file, comments and section headers left out."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            name, _, value = line.partition("=")
            out.append((name, value))
    return out


@pytest.mark.parametrize("name", UNITS)
def test_debian_installs_the_units_of_systemd_dir(name):
    assert read("debian", name) == read("systemd", name)


def test_unit_runs_the_daemon_with_the_defaults_file():
    unit = read("debian", "vip-elector.service")
    for line in ("Type=notify", "EnvironmentFile=-/etc/default/vip-elector",
                 "ExecCondition=/usr/bin/vip-elector --service-condition $VIP_ELECTOR_OPTS",
                 "ExecStart=/usr/bin/vip-elector $VIP_ELECTOR_OPTS", "User=vip-elector"):
        assert re.search(r"^%s$" % re.escape(line), unit, re.M), "unit lacks " + line


#: What an instance of the template has of its own; everything else is the plain unit's.
PER_INSTANCE = {
    "Description": "Consul leader election for vip-manager's virtual IP (%i)",
    "EnvironmentFile": "-/etc/default/vip-elector-%i",
    "ExecCondition": "/usr/bin/vip-elector --service-condition=%i $VIP_ELECTOR_OPTS",
    "SyslogIdentifier": "vip-elector-%i",
    "RuntimeDirectory": "vip-elector-%i",
    "Environment": "VIP_ELECTOR_INSTANCE=%i",
}


def test_template_unit_is_the_plain_unit_per_instance():
    plain = unit_directives(read("systemd", "vip-elector.service"))
    template = unit_directives(read("systemd", "vip-elector@.service"))
    for name, value in PER_INSTANCE.items():
        assert (name, value) in template, "template lacks %s=%s" % (name, value)
    if "ExecReload" not in dict(plain):
        pytest.skip("the plain unit cannot reload yet (the pkg branch adds it): compare after the merge")
    shared = lambda directives: [(n, v) for n, v in directives if n not in PER_INSTANCE]
    assert shared(template) == shared(plain)


def test_examples_are_one_valid_configuration_in_both_forms():
    yml = build_settings(Options(vip_manager_config=source("examples", "vip-manager.yml")), {},
                         kernel_hostname="node-a.example.org")
    env = build_settings(Options(vip_manager_config=source("examples", "vip-manager.env")), {},
                         kernel_hostname="node-a.example.org")
    same = ("trigger_key", "value", "scheme", "host", "port", "token", "ttl", "lock_delay")
    assert [getattr(yml, f) for f in same] == [getattr(env, f) for f in same]
    assert yml.warnings == () and env.warnings == (), "the examples set trigger-value explicitly"
    check_ids = re.findall(r'^\s*id\s*=\s*"([^"]+)"', read("examples", "consul-service-check.hcl"), re.M)
    assert check_ids, "the Consul check example has no explicit check id"
    assert "--check-id=%s" % check_ids[0] in read("examples", "consul-service-check.hcl")


def changelog_version():
    first = read("debian", "changelog").splitlines()[0]
    return re.match(r"vip-elector \(([^)]+)\) ", first).group(1)


def test_package_version_is_the_program_version():
    """Inside a package build (debian/rules sets VIP_ELECTOR_VERSION), the code
    under test is the built one: it must call itself by the changelog's version."""
    built = os.environ.get("VIP_ELECTOR_VERSION")
    if not built:
        pytest.skip("not a package build: test_build_records_the_package_version covers the mechanism")
    assert built == changelog_version()
    assert vip_elector.__version__ == built
    assert cli._version().startswith("vip-elector %s (" % built)


@pytest.mark.parametrize("version", ["0.1.1", "0.1.0~bpo12+1", "0.1.0+local1", "0.1.0+deb12u1", "1:2.0~rc1-3"])
def test_build_records_the_package_version(tmp_path, version):
    """What debian/rules does: setup.py's build_py writes the given version into
    the built code, and --version prints it; the source tree is left alone."""
    env = dict(os.environ, VIP_ELECTOR_VERSION=version)
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path)],
                         cwd=SOURCE, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(os.path.join(SOURCE, "vip_elector", "_version.py"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "vip_elector", "--version"], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("vip-elector %s (" % version), res.stdout
    meta = subprocess.run([sys.executable, "setup.py", "--version"], cwd=SOURCE,
                          env=dict(os.environ, VIP_ELECTOR_VERSION=version),
                          capture_output=True, text=True)
    assert meta.returncode == 0 and meta.stdout.split()[-1] == re.match(r"(\d+:)?([\d.]+)", version).group(2)


@pytest.mark.parametrize("script", ["vip-elector.postinst", "vip-elector.prerm", "vip-elector.postrm"])
def test_maintainer_scripts_are_valid_sh_with_debhelper_token(script):
    path = source("debian", script)
    assert subprocess.run(["sh", "-n", path]).returncode == 0
    assert "\n#DEBHELPER#\n" in read("debian", script)


# ------------------------------------------------- unit and maintainer scripts

def unit_settings():
    """{Name: [values]} of the shipped unit's [Service] section."""
    settings = {}
    section = None
    for line in read("systemd", "vip-elector.service").replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings.setdefault(name, []).append(value)
    return settings


def seconds(value):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)?", value)
    assert m, value
    return float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)


def test_debian_unit_is_the_shipped_unit():
    assert os.path.realpath(source("debian", "vip-elector.service")) == \
        os.path.realpath(source("systemd", "vip-elector.service")) or \
        read("debian", "vip-elector.service") == read("systemd", "vip-elector.service")


def test_unit_reloads_keeps_its_state_and_restarts_fast():
    """SPEC §8.4: reload by SIGHUP, a runtime directory kept across restarts,
    a crashed daemon restarted within 2 s (well inside the session's TTL)."""
    unit = unit_settings()
    assert unit["ExecReload"] == ["/usr/bin/vip-elector --reload-pid $MAINPID"]
    assert unit["RuntimeDirectory"] == ["vip-elector"]
    assert unit["RuntimeDirectoryMode"] == ["0700"]
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]
    assert unit["Restart"] == ["on-failure"]
    assert seconds(unit["RestartSec"][-1]) <= 2


def test_postinst_reloads_on_upgrade_without_calling_systemctl_directly():
    """Upgrades reload (SPEC §8.6) through deb-systemd-invoke, as debhelper
    does; lintian flags any other systemctl call in a maintainer script."""
    for script in ("vip-elector.postinst", "vip-elector.postrm"):
        for line in read("debian", script).splitlines():
            if re.match(r"^(?:.+;)?\s*systemctl\b", line):
                assert "daemon-reload" in line, "%s calls systemctl: %s" % (script, line)
    postinst = read("debian", "vip-elector.postinst")
    assert re.search(r'deb-systemd-invoke "\$action" vip-elector\.service', postinst)
    assert "action=try-reload-or-restart" in postinst
    rules = read("debian", "rules")
    assert re.search(r"dh_installsystemd .*--no-stop-on-upgrade", rules)
    assert re.search(r"dh_installsystemd .*--no-restart-after-upgrade", rules)


# ------------------------------------------------------- the built package

@pytest.fixture(scope="module")
def built_deb():
    """The package built from this tree (a few seconds, DEB_BUILD_OPTIONS=nocheck).
    Not inside dpkg-buildpackage itself, where these tests also run."""
    if os.environ.get("VIP_ELECTOR_IN_PACKAGE_BUILD"):
        pytest.skip("inside the package build: the built package is checked by make unit")
    from debbuild import build_deb, build_unavailable
    reason = build_unavailable()
    if reason:
        pytest.skip(reason)
    return build_deb()


ALIASED = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


def test_built_package_has_nothing_in_aliased_locations(built_deb):
    """trixie's merged /usr: a file under /lib, /bin or /sbin is an
    aliased-location error for its lintian and a warning on purge."""
    from debbuild import deb_files
    files = deb_files(built_deb)
    assert "/usr/lib/systemd/system/vip-elector.service" in files, files
    assert "/usr/bin/vip-elector" in files, files
    aliased = [f for f in files if f in ALIASED or f.startswith(tuple(a + "/" for a in ALIASED))]
    assert not aliased, aliased


def test_built_package_never_stops_or_restarts_on_upgrade(built_deb):
    """debhelper's part of the maintainer scripts: no stop before an upgrade
    (preinst), a stop only on removal (prerm), no restart after (postinst)."""
    from debbuild import deb_control_file
    assert "deb-systemd-invoke stop" not in deb_control_file(built_deb, "preinst")
    prerm = deb_control_file(built_deb, "prerm")
    stops = [line for line in prerm.splitlines() if "deb-systemd-invoke stop" in line]
    assert stops, "removal must stop the daemon (a planned stop)"
    assert re.search(r'\[ "\$1" = remove \][^\n]*\n\s*deb-systemd-invoke stop', prerm), prerm
    postinst = deb_control_file(built_deb, "postinst")
    assert not re.search(r"deb-systemd-invoke\s+(\$_dh_action|restart|stop)", postinst), postinst
    assert "deb-systemd-invoke start 'vip-elector.service'" in postinst
    # The reload comes before debhelper's start: a stopped daemon is started, not reloaded.
    assert postinst.index('deb-systemd-invoke "$action"') < \
        postinst.index("deb-systemd-invoke start 'vip-elector.service'")
