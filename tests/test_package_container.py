"""The Debian package, installed in a booted bookworm container (SPEC §7).

One container for the module, driven through the package's life in order:

  1. `apt-get install ./vip-elector_*.deb` on a node with no vip-manager
     configuration: no error, the system user exists, the conffile is
     0640 root:vip-elector, the unit is enabled, not running, not flapping,
     and `systemctl status` says why.
  2. Configured against a Consul agent on the host (the container shares the
     host's network): `systemctl restart` makes it the leader, the key holds
     the node's name, the status and the journal say so, it runs as
     vip-elector.
  3. `systemctl stop` deletes the key (planned stop hands over at once).
  4. Upgrade to a newer build whose /etc/default/vip-elector changed, over an
     untouched conffile: dpkg installs the new one, still 0640
     root:vip-elector; the running daemon is restarted.
  5. Upgrade again over a conffile the administrator changed: it is kept
     (content and mode) and the restarted daemon runs with its options.
  6. Reinstall over a deleted conffile (--force-confmiss): restored with
     0640 root:vip-elector.
  7. Purge: daemon stopped, key gone, user, group, conffile and unit gone.

Each step needs the previous ones; when one fails the later ones are
skipped, not failed again.

The .deb files are built from this source tree (a copy, so the tree stays
clean) with dpkg-buildpackage, DEB_BUILD_OPTIONS=nocheck (the unit tests run
in the normal test run): version 0.1.0 and two bumped versions. Set
VIP_ELECTOR_DEB to test an already built .deb as the first version.
"""

import json
import os
import re
import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.container, pytest.mark.consul]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFFILE = "/etc/default/vip-elector"
NAME = "pkg-node"                    # trigger-value of the container's node
MSG_ACQUIRED = "5167235c50a3439b965b74c3cb0102bc"
# A clean PATH for the build: a pyenv or virtualenv python3 first in PATH
# would make pybuild build for the wrong interpreter.
BUILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "DEB_BUILD_OPTIONS": "nocheck", "HOME": "/nonexistent"}


# --------------------------------------------------------------------- builds

def _source_files():
    """Paths (relative to REPO) of the source tree: git's view when it is a
    checkout (tracked and untracked-not-ignored files), else everything."""
    if os.path.exists(os.path.join(REPO, ".git")) and shutil.which("git"):
        res = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True, check=True)
        return [p for p in res.stdout.decode().split("\0")
                if p and os.path.lexists(os.path.join(REPO, p))]
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".pybuild", "__pycache__")]
        out += [os.path.relpath(os.path.join(root, f), REPO) for f in files]
    return out


def _copy_source(dest):
    for rel in _source_files():
        src, dst = os.path.join(REPO, rel), os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def _bump(src, version, default_comment):
    """Make the tree in src a newer version whose defaults file differs."""
    changelog = os.path.join(src, "debian", "changelog")
    with open(changelog) as f:
        old = f.read()
    trailer = re.search(r"^ -- .*$", old, re.M).group(0)
    entry = ("vip-elector (%s) unstable; urgency=medium\n\n"
             "  * Test build for the package upgrade test.\n\n%s\n\n" % (version, trailer))
    with open(changelog, "w") as f:
        f.write(entry + old)
    with open(os.path.join(src, "debian", "vip-elector.default"), "a") as f:
        f.write("# %s\n" % default_comment)


def _build(workdir, version=None, default_comment=None):
    """Build the package from a copy of the tree in workdir; path of the .deb."""
    src = os.path.join(workdir, "src")
    _copy_source(src)
    if version:
        _bump(src, version, default_comment)
    res = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=BUILD_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert res.returncode == 0, "dpkg-buildpackage failed:\n" + res.stdout[-5000:]
    debs = [f for f in os.listdir(workdir) if f.endswith("_all.deb")]
    assert len(debs) == 1, debs
    return os.path.join(workdir, debs[0])


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    """{'v1': deb, 'v2': deb, 'v3': deb}, each newer than the one before."""
    missing = [t for t in ("dpkg-buildpackage", "dh", "pybuild") if not shutil.which(t, path=BUILD_ENV["PATH"])]
    if missing:
        pytest.skip("cannot build the package: %s missing (tests/tools/fetch-deps installs them)"
                    % ", ".join(missing))
    out = {}
    given = os.environ.get("VIP_ELECTOR_DEB")
    out["v1"] = given or _build(str(tmp_path_factory.mktemp("deb-v1")))
    v1 = subprocess.run(["dpkg-deb", "-f", out["v1"], "Version"], capture_output=True,
                        text=True, check=True).stdout.strip()
    out["v2"] = _build(str(tmp_path_factory.mktemp("deb-v2")), v1 + "+test1", "upgrade test 1")
    out["v3"] = _build(str(tmp_path_factory.mktemp("deb-v3")), v1 + "+test2", "upgrade test 2")
    return out


# ---------------------------------------------------------------- container

@pytest.fixture(scope="module")
def ct(request):
    # Imported here, not at the top: collecting this module (e.g. in the
    # package build, which deselects it) does not need the helper.
    from container import container_fixture
    yield from container_fixture(request)


STEPS = set()


@pytest.fixture
def step(request):
    """Declare the steps a test needs; records its own name when it passes."""
    def needs(*names):
        for name in names:
            if name not in STEPS:
                pytest.skip("an earlier step failed: %s" % name)
    yield needs
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        STEPS.add(request.node.name)


def apt_install(ct, deb, *options):
    """Install a .deb inside with apt-get, offline: everything it depends on is
    in the container's rootfs already. Returns the CompletedProcess."""
    inside = "/tmp/" + os.path.basename(deb)      # readable by apt's _apt user
    ct.copy_in(deb, inside)
    return ct.run(["apt-get", "install", "-y", "--no-install-recommends", "--allow-downgrades",
                   "-o", "Acquire::Retries=0", *options, inside],
                  env={"DEBIAN_FRONTEND": "noninteractive"}, check=False, timeout=300)


def stat(ct, path):
    return ct.run(["stat", "-c", "%U:%G %a", path]).stdout.strip()


def unit(ct, *props):
    return ct.show("vip-elector.service", *props)


def main_pid_user(ct):
    pid = unit(ct, "MainPID")["MainPID"]
    assert pid != "0", "vip-elector is not running"
    return ct.run(["ps", "-o", "user=", "-p", pid]).stdout.strip()


def wait_for(condition, timeout, message):
    from consul_agent import wait_for as poll
    return poll(condition, timeout, message=message)


def write_vip_manager_config(ct, consul, key):
    ct.put("/etc/vip-manager.yml",
           "dcs-type: consul\n"
           "dcs-endpoints:\n  - %s\n"
           "trigger-key: %s\n"
           "trigger-value: %s\n"
           "ip: 192.0.2.10\nnetmask: 24\ninterface: eth0\n" % (consul.url, key, NAME))


def journal_entries(ct, *args):
    out = ct.journal("-u", "vip-elector.service", "-o", "json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


# -------------------------------------------------------------------- steps

def test_install_unconfigured(ct, debs, step):
    res = apt_install(ct, debs["v1"])
    assert res.returncode == 0, "apt-get install failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert "error" not in res.stderr.lower(), res.stderr
    # postinst: user and group, conffile mode.
    passwd = ct.run(["getent", "passwd", "vip-elector"]).stdout.split(":")
    assert passwd[5:7] == ["/nonexistent", "/usr/sbin/nologin\n"], passwd
    assert int(passwd[2]) < 1000, "not a system user: %s" % passwd
    ct.run(["getent", "group", "vip-elector"])
    assert stat(ct, CONFFILE) == "root:vip-elector 640"
    assert "\n#VIP_ELECTOR_OPTS=" in ct.read(CONFFILE), "the shipped conffile sets no options"
    conffiles = ct.read("/var/lib/dpkg/info/vip-elector.conffiles").split()
    assert conffiles == [CONFFILE]
    # Enabled, tried once by postinst (apt returns after the start job), and
    # not running, not failed, not restarting: nothing to do without a config.
    state = unit(ct, "UnitFileState", "ActiveState", "Result", "NRestarts",
                 "InactiveEnterTimestampMonotonic")
    assert state["UnitFileState"] == "enabled"
    assert state["ActiveState"] == "inactive", state
    assert state["NRestarts"] == "0", state
    assert state["InactiveEnterTimestampMonotonic"] != "0", "postinst did not try to start it"
    status = ct.systemctl("status", "vip-elector", check=False).stdout
    assert "/etc/vip-manager.yml" in status, status
    assert ct.systemctl("is-failed", "vip-elector", check=False).stdout.strip() != "failed"
    # The catalog reached journald's database through systemd's dpkg trigger.
    catalog = ct.run(["journalctl", "--list-catalog", MSG_ACQUIRED]).stdout
    assert MSG_ACQUIRED in catalog
    # The man page is there for `man vip-elector`.
    ct.run(["test", "-s", "/usr/share/man/man8/vip-elector.8.gz"])


def test_configured_leader(ct, consul, key, step, request):
    step("test_install_unconfigured")
    write_vip_manager_config(ct, consul, key)
    # The options from a drop-in, so the conffile stays untouched for the
    # upgrade below (EnvironmentFile= would win, but it sets nothing).
    ct.put("/etc/systemd/system/vip-elector.service.d/opts.conf",
           '[Service]\nEnvironment="VIP_ELECTOR_OPTS=--vip-manager-config=/etc/vip-manager.yml"\n')
    ct.systemctl("daemon-reload")
    ct.systemctl("restart", "vip-elector")
    wait_for(lambda: consul.kv_value(key) == NAME, 30, message="key %s = %s" % (key, NAME))
    holder = consul.holder(key)
    assert holder and holder[0] == NAME
    state = wait_for(lambda: (lambda s: s if s["StatusText"].startswith("leader:") else None)(
        unit(ct, "StatusText", "ActiveState", "NRestarts")), 15, message="leader status")
    assert state["ActiveState"] == "active"
    assert state["StatusText"] == "leader: holding %s as %s" % (key, NAME)
    assert "leader: holding" in ct.systemctl("status", "vip-elector").stdout
    assert main_pid_user(ct) == "vip-elector"
    acquired = [e for e in journal_entries(ct) if "LOCK ACQUIRED" in str(e.get("MESSAGE"))]
    assert acquired, "no LOCK ACQUIRED in the journal"
    e = acquired[-1]
    assert e.get("MESSAGE_ID") == MSG_ACQUIRED
    assert e.get("SYSLOG_IDENTIFIER") == "vip-elector"
    assert e.get("VIP_ELECTOR_ROLE") == "leader"
    assert e.get("VIP_ELECTOR_KEY") == key
    assert e.get("VIP_ELECTOR_VALUE") == NAME
    assert e.get("VIP_ELECTOR_SESSION") == holder[1]["ID"]
    # `journalctl -x` explains it from the package's catalog ("░░" lines).
    explained = ct.journal("-x", "MESSAGE_ID=" + MSG_ACQUIRED)
    assert "\u2591\u2591 " in explained, explained
    request.module.KEY = key


def test_stop_deletes_key(ct, consul, step, request):
    step("test_configured_leader")
    key = request.module.KEY
    ct.systemctl("stop", "vip-elector")
    assert consul.kv_get(key) is None, "the key outlived a planned stop"
    assert unit(ct, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
    ct.systemctl("start", "vip-elector")
    wait_for(lambda: consul.kv_value(key) == NAME, 30, message="leader again")


def test_upgrade_replaces_untouched_conffile_and_restarts(ct, consul, debs, step, request):
    step("test_stop_deletes_key")
    key = request.module.KEY
    before = unit(ct, "ExecMainStartTimestampMonotonic")
    res = apt_install(ct, debs["v2"])
    assert res.returncode == 0, "upgrade failed:\n%s\n%s" % (res.stdout, res.stderr)
    text = ct.read(CONFFILE)
    assert "# upgrade test 1" in text, "dpkg kept an untouched conffile"
    assert stat(ct, CONFFILE) == "root:vip-elector 640"
    after = unit(ct, "MainPID", "ActiveState", "ExecMainStartTimestampMonotonic")
    assert after["ActiveState"] == "active"
    assert after["ExecMainStartTimestampMonotonic"] != before["ExecMainStartTimestampMonotonic"], \
        "the daemon was not restarted by the upgrade"
    wait_for(lambda: consul.kv_value(key) == NAME, 30, message="leader after upgrade")


def test_upgrade_keeps_modified_conffile(ct, consul, debs, step, request):
    step("test_upgrade_replaces_untouched_conffile_and_restarts")
    key = request.module.KEY
    mine = ct.read(CONFFILE) + 'VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml --ttl=15s"\n'
    assert "--ttl=15s" in mine
    ct.put(CONFFILE, mine, mode=0o640, group="vip-elector")
    before = unit(ct, "ExecMainStartTimestampMonotonic")
    res = apt_install(ct, debs["v3"], "-o", "Dpkg::Options::=--force-confold")
    assert res.returncode == 0, "upgrade failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert ct.read(CONFFILE) == mine
    assert stat(ct, CONFFILE) == "root:vip-elector 640"
    ct.run(["test", "-f", CONFFILE + ".dpkg-dist"])      # the package's version, beside it
    after = unit(ct, "MainPID", "ActiveState", "ExecMainStartTimestampMonotonic")
    assert after["ActiveState"] == "active"
    assert after["ExecMainStartTimestampMonotonic"] != before["ExecMainStartTimestampMonotonic"]
    cmdline = ct.read("/proc/%s/cmdline" % after["MainPID"]).split("\0")
    assert "--ttl=15s" in cmdline, cmdline
    wait_for(lambda: consul.kv_value(key) == NAME, 30, message="leader after upgrade")


def test_reinstall_restores_deleted_conffile_with_mode(ct, debs, step):
    """dpkg keeps a conffile's mode across upgrades; a conffile it creates
    anew (here: deleted by the administrator, restored with --force-confmiss)
    comes out 0644 root:root, and postinst must make it 0640 root:vip-elector."""
    step("test_upgrade_keeps_modified_conffile")
    ct.run(["rm", CONFFILE])
    res = apt_install(ct, debs["v3"], "--reinstall", "-o", "Dpkg::Options::=--force-confmiss")
    assert res.returncode == 0, "reinstall failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert "# upgrade test 2" in ct.read(CONFFILE)
    assert stat(ct, CONFFILE) == "root:vip-elector 640"


def test_purge(ct, consul, step, request):
    step("test_reinstall_restores_deleted_conffile_with_mode")
    key = request.module.KEY
    res = ct.run(["apt-get", "purge", "-y", "vip-elector"],
                 env={"DEBIAN_FRONTEND": "noninteractive"}, check=False, timeout=300)
    assert res.returncode == 0, "purge failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert consul.kv_get(key) is None, "removing the package left the key behind"
    for cmd in (["getent", "passwd", "vip-elector"], ["getent", "group", "vip-elector"]):
        assert ct.run(cmd, check=False).returncode == 2, cmd
    for path in (CONFFILE, CONFFILE + ".dpkg-dist", "/lib/systemd/system/vip-elector.service",
                 "/etc/systemd/system/multi-user.target.wants/vip-elector.service",
                 "/usr/bin/vip-elector", "/usr/lib/python3/dist-packages/vip_elector"):
        assert ct.run(["test", "-e", path], check=False).returncode != 0, path + " left behind"
    res = ct.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "vip-elector"], check=False)
    assert res.returncode != 0 or res.stdout.startswith("pn"), res.stdout
