"""Build script; metadata lives in setup.cfg.

The version an operator sees (``vip-elector --version``, the start line in
the journal) must be the installed package's. A package build says which
version it builds in ``VIP_ELECTOR_VERSION`` (debian/rules passes the Debian
version from debian/changelog); build_py then records it in
``vip_elector/_version.py`` in the build tree only, never in the source tree.
Without it (a source checkout) the program reports ``__version__`` from
``vip_elector/__init__.py``.
"""

import os
import re

from setuptools import setup
from setuptools.command.build_py import build_py


def python_version(version):
    """A PEP 440 version for the Python metadata: the Debian version's leading release number
    (0.1.0~bpo12+1, 0.1.0+deb12u1, 0.1.0+local1 → 0.1.0), since setuptools refuses '~' and the like."""
    m = re.match(r"(?:\d+:)?(\d+(?:\.\d+)*)", version)  # an epoch ("1:") is not part of it
    return m.group(1) if m else None


class build_py_with_version(build_py):
    def run(self):
        super().run()
        version = os.environ.get("VIP_ELECTOR_VERSION", "").strip()
        if version:
            target = os.path.join(self.build_lib, "vip_elector", "_version.py")
            with open(target, "w", encoding="utf-8") as f:
                f.write('"""Written by setup.py at build time: the version of the package built."""\n'
                        "VERSION = %r\n" % version)


kwargs = {"cmdclass": {"build_py": build_py_with_version}}
_built = python_version(os.environ.get("VIP_ELECTOR_VERSION", ""))
if _built:
    kwargs["version"] = _built
setup(**kwargs)
