"""What the package tests do in a booted container, shared by the bookworm
(tests/test_package_container.py) and trixie (tests/test_trixie_container.py)
runs: install with apt, configure against the host's Consul agent, see the
node lead, and watch the key through an operation that must not touch it.
"""

import contextlib
import json
import os
import re
import time

import pytest

from helpers import INTERNAL_ERROR, wait_for

UNIT = "vip-elector.service"
CONFFILE = "/etc/default/vip-elector"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def apt_install(ct, deb, *options):
    """Install a .deb inside with apt-get, offline: everything it depends on is
    in the container's rootfs already. Returns the CompletedProcess."""
    inside = "/tmp/" + os.path.basename(deb)      # readable by apt's _apt user
    ct.copy_in(deb, inside)
    return ct.run(["apt-get", "install", "-y", "--no-install-recommends", "--allow-downgrades",
                   "-o", "Acquire::Retries=0", *options, inside],
                  env=APT_ENV, check=False, timeout=300)


def apt_purge(ct):
    return ct.run(["apt-get", "purge", "-y", "vip-elector"], env=APT_ENV, check=False, timeout=300)


ALARMS = ("warning", "error", "not removed", "failed", "deluser:", "skipping")


def assert_quiet(res, what, allow=()):
    """apt/dpkg succeeded and neither they nor the maintainer scripts said
    anything alarming (dpkg's warnings, e.g. `directory '/lib/systemd/system'
    not empty so not removed`, or deluser's). Lines containing one of `allow`
    are let through."""
    assert res.returncode == 0, "%s failed:\n%s\n%s" % (what, res.stdout, res.stderr)
    for line in (res.stdout + "\n" + res.stderr).splitlines():
        if any(a in line for a in allow):
            continue
        alarms = [w for w in ALARMS if w in line.lower()]
        assert not alarms, "%s said %r:\n%s\n%s" % (what, line, res.stdout, res.stderr)


def stat(ct, path):
    return ct.run(["stat", "-c", "%U:%G %a", path]).stdout.strip()


def unit(ct, *props):
    return ct.show(UNIT, *props)


def main_pid(ct):
    pid = unit(ct, "MainPID")["MainPID"]
    assert pid != "0", "vip-elector is not running"
    return pid


def write_vip_manager_config(ct, consul, key, name):
    ct.put("/etc/vip-manager.yml",
           "dcs-type: consul\n"
           "dcs-endpoints:\n  - %s\n"
           "trigger-key: %s\n"
           "trigger-value: %s\n"
           "ip: 192.0.2.10\nnetmask: 24\ninterface: eth0\n" % (consul.url, key, name))


def set_options(ct, options="--vip-manager-config=/etc/vip-manager.yml"):
    """VIP_ELECTOR_OPTS from a drop-in: the conffile ships none (the unit stays
    skipped until set) and stays untouched for the upgrade steps."""
    ct.put("/etc/systemd/system/vip-elector.service.d/opts.conf",
           '[Service]\nEnvironment="VIP_ELECTOR_OPTS=%s"\n' % options)
    if ct.run(["test", "-d", "/run/systemd/system"], check=False).returncode == 0:
        ct.run(["systemctl", "daemon-reload"], check=False)


def journal_entries(ct, *args):
    out = ct.journal("-u", UNIT, "-o", "json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_leading(ct, consul, key, name, timeout=30):
    """Wait until `name` holds the key with a session and the unit says it
    leads; the (value, session, ModifyIndex) it holds the key with."""
    def held():
        entry = consul.kv_get(key)
        if entry and entry.get("Session") and entry["Value"] == name.encode():
            return entry["Value"].decode(), entry["Session"], entry["ModifyIndex"]
        return None
    wait_for(held, timeout, message="%s to hold %s" % (name, key))
    want = "leader: holding %s as %s" % (key, name)
    wait_for(lambda: unit(ct, "StatusText")["StatusText"] == want, timeout,
             message="the unit's status %r" % want)
    return held()


START_LINE = re.compile(r"^vip-elector (\S+) (starting|reloaded): key ")


def started_lines(ct, since_cursor=None):
    """The daemon's start lines ('vip-elector VERSION starting: key ...', or
    'reloaded' after a re-execution) as (_PID, version, how), oldest first."""
    args = ("--after-cursor", since_cursor) if since_cursor else ()
    return [(e.get("_PID"),) + START_LINE.match(e["MESSAGE"]).groups()
            for e in journal_entries(ct, *args)
            if isinstance(e.get("MESSAGE"), str) and START_LINE.match(e["MESSAGE"])]


def journal_cursor(ct):
    """A cursor at the end of the unit's journal, to read what comes after."""
    entries = journal_entries(ct, "-n", "1")
    return entries[-1]["__CURSOR"] if entries else None


def internal_errors(ct):
    return [e["MESSAGE"] for e in journal_entries(ct)
            if INTERNAL_ERROR in str(e.get("MESSAGE", ""))]


@contextlib.contextmanager
def key_untouched(consul, key, settle=3.0):
    """Watch the key (blocking queries) for the whole `with` block and
    `settle` seconds after it: it must keep exactly the state it had at the
    start — same value, same session, same ModifyIndex. Yields the watcher."""
    from helpers import KeyWatcher
    watcher = KeyWatcher(consul, key)
    try:
        before = watcher.current()
        assert before[1] is not None and before[2], "nobody holds %s to begin with: %r" % (key, before)
        yield watcher
        try:    # returns early only when the key changes: then fail below
            watcher.wait(lambda s: s[1:] != before[1:], settle, since=before[0],
                         message="a change of the key")
        except TimeoutError:
            pass
        changes = [s for s in watcher.history if s[1:] != before[1:]]
        assert not changes, "the key changed (value, session, ModifyIndex): %r -> %r" % (
            before[1:], [s[1:] for s in changes])
    finally:
        watcher.close()


def runs_version(ct, version, pid, cursor, how="starting"):
    """The daemon with this PID logged a start line naming `version` (`how`:
    starting, or reloaded after a re-execution) after the journal cursor, and
    the installed program says it is that version."""
    wait_for(lambda: (pid, version, how) in started_lines(ct, cursor), 30,
             message="'vip-elector %s %s' from PID %s" % (version, how, pid))
    out = ct.run(["vip-elector", "--version"]).stdout
    assert out.startswith("vip-elector %s " % version), out


def reloaded_in_place(ct, consul, key, name, version, action, what):
    """Run `action()` (a reload, an upgrade) on the leader: the process stays
    (same PID), re-executes itself into `version` and leads again, and the
    key is untouched throughout. Returns what action returned."""
    pid, cursor = main_pid(ct), journal_cursor(ct)
    with key_untouched(consul, key):
        started = time.monotonic()
        result = action()
        took = time.monotonic() - started
        assert main_pid(ct) == pid, "%s did not keep the process (restarted?)" % what
        runs_version(ct, version, pid, cursor, how="reloaded")
        wait_leading(ct, consul, key, name)
    print("%s: %.0f ms, same process, key untouched" % (what, took * 1000))
    assert unit(ct, "ActiveState")["ActiveState"] == "active"
    assert not internal_errors(ct)
    return result


PASSED = set()      # (module, test name) of the steps that passed


@pytest.fixture
def step(request):
    """Declare the earlier steps (tests of the same module) a test needs: it
    is skipped, not failed again, when one of them did not pass. Import it
    into the test module to use it."""
    module = request.module.__name__

    def needs(*names):
        for name in names:
            if (module, name) not in PASSED:
                pytest.skip("an earlier step failed: %s" % name)
    yield needs
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        PASSED.add((module, request.node.name))
