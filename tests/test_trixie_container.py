"""The bookworm-built package on Debian 13 trixie, in a booted container.

Trixie is the current stable: systemd 257, Python 3.13, a merged /usr that
its lintian and dpkg enforce, and `python3-consul` (py-consul 1.5) instead of
`python3-consul2`. One container for the module (tests/tools/rootfs --suite
trixie, with trixie's lintian in it), the steps in order:

  1. trixie's lintian finds no error and no warning in the package.
  2. `apt-get install` without a warning; configured against the host's
     Consul agent it leads, with trixie's Consul library; the sandbox scores
     the same under systemd 257.
  3. `systemctl reload` while leading: same PID, the key untouched.
  4. An upgrade to a higher version while leading: reloaded, key untouched,
     the new version runs.
  5. `systemctl stop` hands over (key deleted).
  6. Purge: the key gone, nothing left, not a word from dpkg (on trixie a
     unit under /lib made it warn `directory '/lib/systemd/system' not empty
     so not removed`).

Each step needs the previous ones (lintian excepted); when one fails the
later ones are skipped.
"""

import os
import re

import pytest

from debbuild import deb_field, series_or_skip
from package_steps import (apt_install, apt_purge, assert_quiet, internal_errors,  # noqa: F401
                           reloaded_in_place, set_options, step, unit, wait_leading,
                           write_vip_manager_config)

pytestmark = [pytest.mark.container, pytest.mark.consul]

NAME = "trixie-node"


@pytest.fixture(scope="module")
def debs():
    return series_or_skip(2)


@pytest.fixture(scope="module")
def ct(request):
    from container import container_fixture
    yield from container_fixture(request, suite="trixie")


@pytest.fixture(scope="module")
def key():
    return "service/trixie-ct-%d/leader" % os.getpid()


def test_trixie_lintian_is_clean(ct, debs):
    inside = "/tmp/" + os.path.basename(debs["v1"])
    ct.copy_in(debs["v1"], inside)
    res = ct.run(["lintian", "--fail-on", "error,warning", "--no-tag-display-limit", inside],
                 check=False, timeout=300)
    tags = [line for line in res.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert res.returncode == 0 and not tags, "trixie's lintian:\n%s\n%s" % (res.stdout, res.stderr)


def test_install_configure_lead(ct, consul, key, debs, step):
    assert int(ct.run(["systemctl", "--version"]).stdout.split()[1]) >= 257
    write_vip_manager_config(ct, consul, key, NAME)
    set_options(ct)
    assert_quiet(apt_install(ct, debs["v1"]), "apt-get install")
    wait_leading(ct, consul, key, NAME)
    version = ct.run(["vip-elector", "--version"]).stdout
    assert re.search(r"\(py-consul 1\.5\.\d+ \(/usr/lib/python3/dist-packages/consul\)", version), version
    res = ct.run(["systemd-analyze", "security", "--no-pager", "vip-elector.service"])
    score = float(re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout).group(1))
    print("exposure under trixie's systemd: %s" % score)
    assert score <= 1.1
    assert not internal_errors(ct)


def test_reload_leaves_key_untouched(ct, consul, key, debs, step):
    step("test_install_configure_lead")
    reloaded_in_place(ct, consul, key, NAME, deb_field(debs["v1"], "Version"),
                      lambda: ct.systemctl("reload", "vip-elector"), "systemctl reload")


def test_upgrade_reloads_and_runs_the_new_code(ct, consul, key, debs, step):
    step("test_reload_leaves_key_untouched")
    res = reloaded_in_place(ct, consul, key, NAME, deb_field(debs["v2"], "Version"),
                            lambda: apt_install(ct, debs["v2"]), "the upgrade")
    assert_quiet(res, "the upgrade")


def test_stop_hands_over(ct, consul, key, step):
    step("test_upgrade_reloads_and_runs_the_new_code")
    ct.systemctl("stop", "vip-elector")
    assert consul.kv_get(key) is None, "a planned stop deletes the key at once"
    assert unit(ct, "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}


def test_purge_without_a_word(ct, consul, key, step):
    step("test_stop_hands_over")
    ct.systemctl("start", "vip-elector")
    wait_leading(ct, consul, key, NAME)
    assert_quiet(apt_purge(ct), "apt-get purge")
    assert consul.kv_get(key) is None, "removing the package left the key behind"
    for path in ("/etc/default/vip-elector", "/usr/lib/systemd/system/vip-elector.service",
                 "/usr/bin/vip-elector", "/run/vip-elector"):
        assert ct.run(["test", "-e", path], check=False).returncode != 0, path + " left behind"
    assert ct.run(["getent", "passwd", "vip-elector"], check=False).returncode == 2
