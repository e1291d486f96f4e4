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
