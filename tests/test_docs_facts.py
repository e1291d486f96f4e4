"""The documents other than README tell one story with the code (issue 19, item 7).

Pure (no Consul, no root): the man page's footer is the package's version and
date, the check-poll interval is the one the election loop uses, the SYSTEMD
section says what a reload applies, the catalog's Support: points at
something the package installs, and both units say the same about who reads
the defaults file.
"""

import os
import re

import pytest

from vip_elector import reexec
from vip_elector.election import Timing

SOURCE = os.environ.get("VIP_ELECTOR_SOURCE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(SOURCE, *parts), encoding="utf-8") as f:
        return f.read()


def changelog_top():
    """(version, YYYY-MM-DD) of debian/changelog's newest entry."""
    text = read("debian", "changelog")
    version = re.match(r"vip-elector \(([^)]+)\) ", text).group(1)
    date = re.search(r"^ -- .*?  \w{3}, (\d{1,2}) (\w{3}) (\d{4}) ", text, re.M)
    months = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    return version, "%s-%02d-%02d" % (date.group(3), months.index(date.group(2)) + 1, int(date.group(1)))


def man_text():
    """The man page's text with roff's escaped hyphens plain and lines joined."""
    return " ".join(read("debian", "vip-elector.8").replace("\\-", "-").split())


def source_version():
    """vip_elector/__init__.py's literal: a package build replaces the imported one by its own."""
    return re.search(r'^__version__ = "([^"]+)"', read("vip_elector", "__init__.py"), re.M).group(1)


def test_man_page_footer_is_the_package_version_and_date():
    if os.environ.get("VIP_ELECTOR_IN_PACKAGE_BUILD"):
        pytest.skip("a package build may be of a bumped tree (dch -v, a backport, the upgrade "
                    "tests' builds): the release's man page stays; make unit checks the release")
    th = re.search(r'^\.TH VIP-ELECTOR 8 "([^"]+)" "vip-elector ([^"]+)"', read("debian", "vip-elector.8"), re.M)
    assert th and th.group(2) == source_version(), th and th.groups()
    version, date = changelog_top()
    assert version == source_version(), "debian/changelog %s, vip_elector/__init__.py %s" % (
        version, source_version())
    assert th.groups() == (date, version), th.groups()


def poll_words(seconds):
    return "every second" if seconds == 1 else "every %g seconds" % seconds


def test_check_poll_interval_is_the_loops():
    words = poll_words(Timing().health_poll)
    catalog = " ".join(read("systemd", "vip-elector.catalog").split())
    for name, text in (("man page", man_text()), ("catalog", catalog)):
        assert "looks again %s and competes as soon as the check passes" % words in text, name
        assert "every 2 seconds" not in text, name


def test_man_page_says_a_reload_applies_vip_elector_opts():
    """The unit's ExecReload= hands the environment systemd computes for it (the
    defaults file and drop-ins) to the daemon (vip_elector/reexec.py)."""
    assert reexec.OPTS_VAR == "VIP_ELECTOR_OPTS"
    for unit in ("vip-elector.service", "vip-elector@.service"):
        assert "\nExecReload=/usr/bin/vip-elector --reload-pid $MAINPID\n" in read("systemd", unit)
    systemd = man_text().split(".SH SYSTEMD", 1)[1].split(".SH ", 1)[0]
    assert "to change them, restart" not in systemd
    assert "A changed .B VIP_ELECTOR_OPTS (or token, or any other variable of the defaults file) " \
           "is applied by a reload; no restart is needed." in systemd, systemd


def test_catalog_support_points_at_the_installed_documentation():
    catalog = read("systemd", "vip-elector.catalog")
    entries = re.findall(r"^-- [0-9a-f]{32}$", catalog, re.M)
    supports = re.findall(r"^Support: (.*)$", catalog, re.M)
    assert len(supports) == len(entries) and set(supports) == {"file:///usr/share/doc/vip-elector/"}
    # What dh_installdocs and dh_installexamples put there.
    assert os.path.exists(os.path.join(SOURCE, "debian", "README.Debian"))
    assert read("debian", "vip-elector.examples").split() == ["examples/*"]


def sandbox_comment(unit):
    text = read("systemd", unit)
    return text[text.index("# Sandbox"):text.index("NoNewPrivileges=")]


def test_both_units_say_the_same_about_who_reads_the_defaults_file():
    for unit in ("vip-elector.service", "vip-elector@.service"):
        comment = " ".join(sandbox_comment(unit).replace("#", " ").split())
        assert "is read by systemd (as root) at every start and every reload, never by the daemon" \
            in comment, unit
    assert sandbox_comment("vip-elector.service") == sandbox_comment("vip-elector@.service")
    assert "the daemon never reads it itself" in man_text()
