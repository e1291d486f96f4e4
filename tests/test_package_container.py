"""The Debian package, installed in a booted bookworm container (SPEC §7, §8).

One container for the module, driven through the package's life in order:

  0. bookworm's lintian finds no error and no warning in the package.
  1. `apt-get install ./vip-elector_*.deb` on a node with no vip-manager
     configuration: no error, the system user exists, the conffile is
     0640 root:vip-elector, the unit (under /usr/lib, nothing under the
     aliased /lib, /bin, /sbin) is enabled, not running, not flapping, and
     `systemctl status` says why.
  2. Configured against a Consul agent on the host (the container shares the
     host's network): `systemctl restart` makes it the leader, the key holds
     the node's name, the status and the journal say so, it runs as
     vip-elector, its runtime directory is 0700 vip-elector.
  3. `systemctl stop` deletes the key (planned stop hands over at once).
  4. `systemctl reload` while leading: same PID, the key untouched (same
     session, same ModifyIndex, watched with blocking queries throughout).
  5. `kill -9` of the daemon: systemd restarts it within RestartSec, it
     resumes its session from /run/vip-elector, the key untouched.
  6. Upgrade to a newer build whose /etc/default/vip-elector changed, over an
     untouched conffile, while leading: dpkg installs the new conffile, still
     0640 root:vip-elector; the daemon is reloaded, not restarted (same PID,
     key untouched) and runs the new version's code.
  7. Upgrade again over a conffile the administrator changed: it is kept
     (content and mode), the daemon reloaded again; a restart then applies
     its options.
  8. Reinstall over a deleted conffile (--force-confmiss): restored with
     0640 root:vip-elector, the daemon reloaded, the key untouched.
  9. `systemctl stop` after all that still hands over (key deleted).
 10. Purge: daemon stopped, key gone, user, group, conffile, unit and runtime
     directory gone, no warning from dpkg; an enabled instance of the
     template unit stopped, its enable link, defaults file and runtime
     directory gone, and a reinstall starts no old instance.
 11. Upgrade from 0.1.0 (built from git history; its unit was in /lib):
     the unit survives the move to /usr/lib, the daemon is restarted once
     (0.1.0 cannot reload) and leads again.

Each step needs the previous ones; when one fails the later ones are
skipped, not failed again.

The .deb files are built from this source tree by tests/debbuild.py: this
version and two bumped ones. Set VIP_ELECTOR_DEB to test an already built
.deb as the first version.
"""

import os
import shutil
import subprocess
import time

import pytest

from debbuild import build_release, deb_field, deb_files, release_unavailable, series_or_skip
from package_steps import (CONFFILE, apt_install, apt_purge, assert_quiet, internal_errors,  # noqa: F401
                           journal_cursor, journal_entries, key_untouched, main_pid,
                           reloaded_in_place, runs_version, set_options, stat, step, unit,
                           wait_leading, write_vip_manager_config)

pytestmark = [pytest.mark.container, pytest.mark.consul]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "pkg-node"                    # trigger-value of the container's node
MSG_ACQUIRED = "5167235c50a3439b965b74c3cb0102bc"
MSG_RELEASED = "071fe3546e774ce5958b0e1e1225c17d"
ALIASED = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
UNIT_PATHS = ("/usr/lib/systemd/system/vip-elector.service", "/lib/systemd/system/vip-elector.service")


@pytest.fixture(scope="module")
def debs():
    """{'v1': deb, 'v2': deb, 'v3': deb}, each newer than the one before."""
    return series_or_skip(3)


# ---------------------------------------------------------------- container

@pytest.fixture(scope="module")
def ct(request):
    # Imported here, not at the top: collecting this module (e.g. in the
    # package build, which deselects it) does not need the helper.
    from container import container_fixture
    yield from container_fixture(request)


def main_pid_user(ct):
    return ct.run(["ps", "-o", "user=", "-p", main_pid(ct)]).stdout.strip()


def wait_for(condition, timeout, message):
    from consul_agent import wait_for as poll
    return poll(condition, timeout, message=message)


def installed_paths(ct):
    return ct.run(["dpkg", "-L", "vip-elector"]).stdout.split()


# -------------------------------------------------------------------- steps

def test_bookworm_lintian_is_clean(debs):
    """The host's (bookworm's) lintian; trixie's runs in tests/test_trixie_container.py."""
    if not shutil.which("lintian"):
        pytest.skip("lintian is not installed (tests/tools/fetch-deps installs it)")
    res = subprocess.run(["lintian", "--fail-on", "error,warning", "--no-tag-display-limit",
                          debs["v1"]], capture_output=True, text=True, timeout=600,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    tags = [line for line in res.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert res.returncode == 0 and not tags, "lintian:\n%s\n%s" % (res.stdout, res.stderr)


def test_install_unconfigured(ct, debs, step):
    res = apt_install(ct, debs["v1"])
    assert res.returncode == 0, "apt-get install failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert "error" not in res.stderr.lower(), res.stderr
    assert "warning" not in res.stdout.lower() + res.stderr.lower(), res.stdout + res.stderr
    # Nothing in the aliased directories of a merged /usr (trixie rejects it).
    paths = installed_paths(ct)
    assert "/usr/lib/systemd/system/vip-elector.service" in paths, paths
    assert not [p for p in paths if p.startswith(tuple(a + "/" for a in ALIASED))], paths
    # (systemd 252 names it by /lib, first in its search path: the same file.)
    assert unit(ct, "FragmentPath")["FragmentPath"] in UNIT_PATHS
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
    write_vip_manager_config(ct, consul, key, NAME)
    # The options from a drop-in, so the conffile stays untouched for the
    # upgrade below (EnvironmentFile= would win, but it sets nothing).
    set_options(ct)
    ct.systemctl("restart", "vip-elector")
    wait_leading(ct, consul, key, NAME)
    holder = consul.holder(key)
    assert holder and holder[0] == NAME
    state = unit(ct, "StatusText", "ActiveState", "NRestarts")
    assert state["ActiveState"] == "active"
    assert "leader: holding" in ct.systemctl("status", "vip-elector").stdout
    assert main_pid_user(ct) == "vip-elector"
    # The runtime directory the daemon keeps its state in (SPEC §8.1).
    assert stat(ct, "/run/vip-elector") == "vip-elector:vip-elector 700"
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
    wait_leading(ct, consul, key, NAME)


def test_reload_leaves_key_untouched(ct, consul, debs, step, request):
    """`systemctl reload` re-executes the daemon in place (SPEC §8.3)."""
    step("test_stop_deletes_key")
    key = request.module.KEY
    version = deb_field(debs["v1"], "Version")
    reloaded_in_place(ct, consul, key, NAME, version,
                      lambda: ct.systemctl("reload", "vip-elector"), "systemctl reload")


def test_kill_9_restarts_and_resumes(ct, consul, step, request):
    """A crash: systemd restarts it after RestartSec (1 s), and it resumes its
    session from /run/vip-elector long before the session could expire."""
    step("test_reload_leaves_key_untouched")
    key = request.module.KEY
    before = unit(ct, "MainPID", "NRestarts")
    with key_untouched(consul, key):
        started = time.monotonic()
        ct.run(["kill", "-9", before["MainPID"]])
        wait_for(lambda: int(unit(ct, "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1,
                 15, message="systemd to restart the killed daemon")
        wait_for(lambda: unit(ct, "ActiveState")["ActiveState"] == "active", 15,
                 message="active again")
        assert main_pid(ct) != before["MainPID"]
        wait_leading(ct, consul, key, NAME)
        print("kill -9: leading again (same session) after %.0f ms"
              % ((time.monotonic() - started) * 1000))
    assert not internal_errors(ct)


def test_upgrade_reloads_and_runs_the_new_code(ct, consul, debs, step, request):
    step("test_kill_9_restarts_and_resumes")
    key = request.module.KEY
    res = reloaded_in_place(ct, consul, key, NAME, deb_field(debs["v2"], "Version"),
                            lambda: apt_install(ct, debs["v2"]), "the upgrade")
    assert res.returncode == 0, "upgrade failed:\n%s\n%s" % (res.stdout, res.stderr)
    text = ct.read(CONFFILE)
    assert "# upgrade test 1" in text, "dpkg kept an untouched conffile"
    assert stat(ct, CONFFILE) == "root:vip-elector 640"
    assert unit(ct, "ActiveState")["ActiveState"] == "active"


def test_upgrade_keeps_modified_conffile(ct, consul, debs, step, request):
    step("test_upgrade_reloads_and_runs_the_new_code")
    key = request.module.KEY
    opts = 'VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager.yml"\n'
    mine = ct.read(CONFFILE) + "# changed by the administrator\n" + opts
    ct.put(CONFFILE, mine, mode=0o640, group="vip-elector")
    res = reloaded_in_place(ct, consul, key, NAME, deb_field(debs["v3"], "Version"),
                            lambda: apt_install(ct, debs["v3"], "-o",
                                                "Dpkg::Options::=--force-confold"), "the upgrade")
    assert res.returncode == 0, "upgrade failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert ct.read(CONFFILE) == mine
    assert stat(ct, CONFFILE) == "root:vip-elector 640"
    ct.run(["test", "-f", CONFFILE + ".dpkg-dist"])      # the package's version, beside it
    # systemd gives the main process its options only at start; the unit's
    # ExecReload= hands the current ones over, so a reload applies an edit
    # of the defaults file (here a new TTL: a new session, same process).
    pid = main_pid(ct)
    ct.put(CONFFILE, mine.replace(opts, opts.replace('.yml"', '.yml --ttl=15s"')), mode=0o640,
           group="vip-elector")
    ct.systemctl("reload", "vip-elector")
    assert main_pid(ct) == pid
    cmdline = ct.read("/proc/%s/cmdline" % pid).split("\0")
    assert "--ttl=15s" in cmdline, cmdline
    wait_leading(ct, consul, key, NAME)
    assert consul.session_info(consul.kv_get(key)["Session"])["TTL"] == "15s"
    ct.put(CONFFILE, mine, mode=0o640, group="vip-elector")   # back, for the steps below
    ct.systemctl("reload", "vip-elector")
    wait_for(lambda: consul.session_info((consul.kv_get(key) or {}).get("Session") or "x") and
             consul.session_info(consul.kv_get(key)["Session"])["TTL"] == "10s", 20,
             message="leading with the TTL of the restored options")


def test_reinstall_restores_deleted_conffile_with_mode(ct, consul, debs, step, request):
    """dpkg keeps a conffile's mode across upgrades; a conffile it creates
    anew (here: deleted by the administrator, restored with --force-confmiss)
    comes out 0644 root:root, and postinst must make it 0640 root:vip-elector.
    A reinstall reloads the daemon like an upgrade."""
    step("test_upgrade_keeps_modified_conffile")
    key = request.module.KEY
    ct.run(["rm", CONFFILE])
    res = reloaded_in_place(ct, consul, key, NAME, deb_field(debs["v3"], "Version"),
                            lambda: apt_install(ct, debs["v3"], "--reinstall", "-o",
                                                "Dpkg::Options::=--force-confmiss"), "the reinstall")
    assert res.returncode == 0, "reinstall failed:\n%s\n%s" % (res.stdout, res.stderr)
    assert "# upgrade test 2" in ct.read(CONFFILE)
    assert stat(ct, CONFFILE) == "root:vip-elector 640"


def test_restart_is_a_planned_stop(ct, consul, step, request):
    """SPEC §8.5: `systemctl restart` still hands over: the key is deleted,
    then taken again with a new session (on a single node, after a gap)."""
    step("test_reinstall_restores_deleted_conffile_with_mode")
    from vipnet import KeyWatcher
    key = request.module.KEY
    watcher = KeyWatcher(consul, key)
    try:
        before = watcher.current()
        assert before[2], before
        ct.systemctl("restart", "vip-elector")
        gone = watcher.wait(lambda s: s[1] is None, 15, since=before[0], message="the key deleted")
        back = watcher.wait(lambda s: s[1] == NAME and s[2], 30, since=gone[0],
                            message="the key taken again")
        assert back[2] != before[2], "a restart keeps no session"
        print("systemctl restart: key absent for %.0f ms" % ((back[0] - gone[0]) * 1000))
    finally:
        watcher.close()
    wait_leading(ct, consul, key, NAME)


def test_stop_still_hands_over(ct, consul, step, request):
    """After reloads, a crash and upgrades, a planned stop still deletes the key."""
    step("test_restart_is_a_planned_stop")
    key = request.module.KEY
    ct.systemctl("stop", "vip-elector")
    assert consul.kv_get(key) is None, "the key outlived a planned stop"
    released = [e for e in journal_entries(ct) if e.get("MESSAGE_ID") == MSG_RELEASED]
    assert released and "LOCK RELEASED" in released[-1]["MESSAGE"], released
    ct.run(["test", "!", "-e", "/run/vip-elector/state.json"])   # nothing to resume
    ct.systemctl("start", "vip-elector")
    wait_leading(ct, consul, key, NAME)
    assert not internal_errors(ct)


INSTANCE = "web"
INSTANCE_DEFAULTS = "/etc/default/vip-elector-" + INSTANCE
INSTANCE_LINK = "/etc/systemd/system/multi-user.target.wants/vip-elector@%s.service" % INSTANCE
FENCE_SETTINGS = "/etc/default/vip-elector-fence"


def test_purge(ct, consul, debs, step, request):
    """Purge leaves nothing of the template's instances either (issue 19): an
    enabled, running instance is stopped (its key released), its enable link,
    defaults file and runtime directory are removed, so a later install starts
    no old instance; the example fencing hook's settings file is not an
    instance's and stays."""
    step("test_stop_still_hands_over")
    key = request.module.KEY
    web_key = key + "-" + INSTANCE
    ct.put("/etc/vip-manager-web.yml", ct.read("/etc/vip-manager.yml").replace(key, web_key))
    ct.put(INSTANCE_DEFAULTS, 'VIP_ELECTOR_OPTS="--vip-manager-config=/etc/vip-manager-web.yml"\n',
           mode=0o640, group="vip-elector")
    ct.put(FENCE_SETTINGS, "VIP=192.0.2.10\n")
    ct.systemctl("enable", "--now", "vip-elector@" + INSTANCE)
    wait_for(lambda: consul.kv_value(web_key) == NAME, 30, message="the instance to lead its key")
    ct.run(["test", "-L", INSTANCE_LINK])
    ct.run(["test", "-d", "/run/vip-elector-" + INSTANCE])
    res = apt_purge(ct)
    assert_quiet(res, "apt-get purge")
    assert consul.kv_get(key) is None, "removing the package left the key behind"
    assert consul.kv_get(web_key) is None, "removing the package left the instance's key behind"
    for path in (INSTANCE_DEFAULTS, INSTANCE_LINK, "/run/vip-elector-" + INSTANCE):
        assert ct.run(["test", "-e", path], check=False).returncode != 0, path + " left behind"
    assert ct.read(FENCE_SETTINGS) == "VIP=192.0.2.10\n", "the fencing hook's settings were removed"
    ct.run(["rm", FENCE_SETTINGS, "/etc/vip-manager-web.yml"])
    for cmd in (["getent", "passwd", "vip-elector"], ["getent", "group", "vip-elector"]):
        assert ct.run(cmd, check=False).returncode == 2, cmd
    for path in (CONFFILE, CONFFILE + ".dpkg-dist", "/usr/lib/systemd/system/vip-elector.service",
                 "/etc/systemd/system/multi-user.target.wants/vip-elector.service",
                 "/usr/bin/vip-elector", "/usr/lib/python3/dist-packages/vip_elector",
                 "/run/vip-elector"):
        assert ct.run(["test", "-e", path], check=False).returncode != 0, path + " left behind"
    res = ct.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "vip-elector"], check=False)
    assert res.returncode != 0 or res.stdout.startswith("pn"), res.stdout
    # A reinstall starts no old instance.
    assert apt_install(ct, debs["v1"]).returncode == 0
    instance = ct.show("vip-elector@%s.service" % INSTANCE, "UnitFileState", "ActiveState")
    assert instance == {"UnitFileState": "disabled", "ActiveState": "inactive"}, instance
    assert_quiet(apt_purge(ct), "apt-get purge")


def test_upgrade_from_0_1_0_moves_the_unit_to_usr(ct, consul, key, debs, step):
    """0.1.0 shipped its unit in /lib/systemd/system. On a merged /usr that is
    the same file as the new /usr/lib one: dpkg must not delete it when the
    old path disappears from the package. 0.1.0 cannot reload: the upgrade
    restarts it once, then it leads again running the new code."""
    step("test_install_unconfigured")
    reason = release_unavailable("0.1.0")
    if reason:
        pytest.skip(reason)
    old = build_release("0.1.0")
    assert "/lib/systemd/system/vip-elector.service" in deb_files(old)
    ct.run(["dpkg", "--purge", "vip-elector"], check=False)   # whatever an earlier step left
    write_vip_manager_config(ct, consul, key, NAME)
    res = apt_install(ct, old)
    assert res.returncode == 0, "install of 0.1.0 failed:\n%s\n%s" % (res.stdout, res.stderr)
    wait_leading(ct, consul, key, NAME)
    pid, cursor = main_pid(ct), journal_cursor(ct)
    res = apt_install(ct, debs["v1"])
    assert_quiet(res, "the upgrade from 0.1.0")
    ct.run(["test", "-f", "/usr/lib/systemd/system/vip-elector.service"])
    state = unit(ct, "FragmentPath", "UnitFileState", "NeedDaemonReload", "ActiveState")
    assert state.pop("FragmentPath") in UNIT_PATHS
    assert state == {"UnitFileState": "enabled", "NeedDaemonReload": "no",
                     "ActiveState": "active"}, state
    new_pid = main_pid(ct)
    assert new_pid != pid, "0.1.0 was not restarted"
    runs_version(ct, deb_field(debs["v1"], "Version"), new_pid, cursor)
    wait_leading(ct, consul, key, NAME)
    assert_quiet(apt_purge(ct), "apt-get purge")
    assert consul.kv_get(key) is None
