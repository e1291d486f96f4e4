"""Which Consul library is installed, and whether this project is tested with it.

Three distributions install the same ``consul`` module and conflict with one
another: python-consul2 (bookworm's ``python3-consul2``), python-consul
(bookworm's ``python3-consul``, what Patroni uses) and py-consul (trixie's
``python3-consul``). The adapter works with each version the test suite runs;
a node with another one (trixie-backports, a local pip install) is told so by
``--check``, plainly, since its behaviour has not been proven here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

# (distribution, version prefix) the test suite runs (make test, make compat).
TESTED = (("python-consul2", "0.1.5"), ("python-consul", "0.7.1"), ("py-consul", "1.5."))
# The module's own version, when the distribution's metadata cannot be found.
_BY_VERSION = (("0.1.", "python-consul2"), ("0.", "python-consul"), ("1.", "py-consul"))


@dataclass(frozen=True)
class Library:
    distribution: str
    version: str
    path: str

    @property
    def tested(self) -> bool:
        return any(self.distribution == d and (self.version == v or
                                               (v.endswith(".") and self.version.startswith(v)))
                   for d, v in TESTED)

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} ({self.path})"


def _distribution(module: ModuleType, version: str) -> str:
    """The distribution that installed ``module``: its metadata, else a guess by version."""
    try:
        from importlib.metadata import packages_distributions
        names = packages_distributions().get(module.__name__.split(".")[0], [])
        if len(names) == 1:
            return names[0]
    except (ImportError, OSError, ValueError):
        pass
    for prefix, name in _BY_VERSION:
        if version.startswith(prefix):
            return name
    return "unknown"


def describe(module: ModuleType) -> Library:
    version = str(getattr(module, "__version__", "?"))
    path = os.path.dirname(getattr(module, "__file__", "") or "")
    return Library(_distribution(module, version), version, path)


#: What --version says, and the daemon's one line, when no Consul library can be imported.
MISSING = ("no Consul library is installed (Python module 'consul'): install python3-consul2 "
           "or python3-consul")


def installed() -> str:
    """The Consul library in use, in words, for ``--version``; works without one installed."""
    try:
        import consul
    except ImportError:
        return MISSING
    return str(describe(consul))


def untested_warning(module: ModuleType) -> Optional[str]:
    """One sentence for --check when the library is not one the tests run, else None."""
    lib = describe(module)
    if lib.tested:
        return None
    tested = ", ".join(f"{d} {v.rstrip('.')}{'.x' if v.endswith('.') else ''}" for d, v in TESTED)
    return (f"the Consul library {lib} has not been tested with vip-elector (tested: {tested}); "
            "if leadership misbehaves, install the distribution's python3-consul2 or "
            "python3-consul package instead")
