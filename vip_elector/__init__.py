"""vip-elector: Consul leader election for vip-manager."""

#: The source tree's version. A package build records the version it builds
#: (the Debian version, e.g. 0.1.1 or 0.1.0~bpo12+1) in _version.py, and that
#: is what --version and the journal show (setup.py).
__version__ = "0.3.0"

try:
    from ._version import VERSION as __version__  # noqa: F811
except ImportError:
    pass
