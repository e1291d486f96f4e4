"""Build the Debian package from this source tree, for the tests.

    from debbuild import build_deb, deb_files, deb_control_file, build_unavailable
    deb = build_deb()                                   # this tree as it is
    newer = build_deb('0.2.0+test1', 'upgrade test 1')  # a higher version
    old = build_release('0.1.0')                        # a release, from git history

Each build runs `dpkg-buildpackage -us -uc -b` with DEB_BUILD_OPTIONS=nocheck
(the unit tests run in the normal test run) on a copy of the tree, so the
tree stays clean; a bumped build gets a changelog entry, the program's
__version__ and a line in the defaults file (a changed conffile), so an
upgrade test can see that the new code runs. Builds are cached for the
life of the test process: the package tests, the trixie test and the
packaging test share them. A build takes a few seconds.

Set VIP_ELECTOR_DEB to use an already built .deb as the unbumped build.
"""

import atexit
import os
import re
import shutil
import subprocess
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A clean PATH for the build: a pyenv or virtualenv python3 first in PATH
# would make pybuild build for the wrong interpreter.
BUILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "DEB_BUILD_OPTIONS": "nocheck", "HOME": "/nonexistent"}

_built = {}       # (version, note) -> path of the .deb
_workdir = None


def build_unavailable():
    """None if the package can be built here, else why not."""
    missing = [t for t in ("dpkg-buildpackage", "dh", "pybuild")
               if not shutil.which(t, path=BUILD_ENV["PATH"])]
    if missing:
        return ("cannot build the package: %s missing (tests/tools/fetch-deps installs them)"
                % ", ".join(missing))
    return None


def source_files():
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
    for rel in source_files():
        src, dst = os.path.join(REPO, rel), os.path.join(dest, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def _bump(src, version, note):
    """Make the tree in src the given (higher) version: changelog, program
    version, and a defaults file that differs (a conffile dpkg must handle)."""
    changelog = os.path.join(src, "debian", "changelog")
    with open(changelog) as f:
        old = f.read()
    trailer = re.search(r"^ -- .*$", old, re.M).group(0)
    entry = ("vip-elector (%s) unstable; urgency=medium\n\n"
             "  * Test build for the package upgrade test.\n\n%s\n\n" % (version, trailer))
    with open(changelog, "w") as f:
        f.write(entry + old)
    init = os.path.join(src, "vip_elector", "__init__.py")
    with open(init) as f:
        text = f.read()
    with open(init, "w") as f:
        f.write(re.sub(r'__version__\s*=\s*"[^"]*"', '__version__ = "%s"' % version, text))
    with open(os.path.join(src, "debian", "vip-elector.default"), "a") as f:
        f.write("# %s\n" % note)


def _git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, check=True).stdout


def release_commit(version):
    """The last commit whose debian/changelog is at `version` (the parent of
    the one that moved on from it), or None."""
    newer = "HEAD"
    for commit in _git("log", "--format=%H", "--", "debian/changelog").decode().split():
        first = _git("show", "%s:debian/changelog" % commit).decode().split("\n", 1)[0]
        if first.startswith("vip-elector (%s) " % version):
            return newer
        newer = commit + "^"
    return None


def release_unavailable(version):
    """None if `version` can be built from git history here, else why not."""
    if not (os.path.exists(os.path.join(REPO, ".git")) and shutil.which("git")):
        return "no git checkout: cannot build an earlier release"
    if release_commit(version) is None:
        return "no commit of version %s in git history" % version
    return build_unavailable()


def build_release(version):
    """Path of the .deb of an earlier release, built from its commit."""
    key = ("release", version)
    if key not in _built:
        archive = _git("archive", "--format=tar", release_commit(version))
        _built[key] = _build(lambda src: subprocess.run(["tar", "-x", "-C", src], input=archive,
                                                        check=True))
    return _built[key]


def _build(populate):
    """Build the tree `populate(src)` writes; the path of the .deb."""
    global _workdir
    if _workdir is None:
        _workdir = tempfile.mkdtemp(prefix="vip-elector-debs.")
        atexit.register(shutil.rmtree, _workdir, True)
    workdir = tempfile.mkdtemp(dir=_workdir)
    src = os.path.join(workdir, "src")
    os.mkdir(src)
    populate(src)
    res = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src, env=BUILD_ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert res.returncode == 0, "dpkg-buildpackage failed:\n" + res.stdout[-5000:]
    debs = [f for f in os.listdir(workdir) if f.endswith("_all.deb")]
    assert len(debs) == 1, debs
    return os.path.join(workdir, debs[0])


def build_deb(version=None, note=None):
    """Path of the .deb built from this tree, or from it bumped to `version`
    (with `note` added to the defaults file). Cached per test process."""
    if version is None and os.environ.get("VIP_ELECTOR_DEB"):
        return os.environ["VIP_ELECTOR_DEB"]
    key = (version, note)
    if key not in _built:
        def populate(src):
            _copy_source(src)
            if version:
                _bump(src, version, note or "version %s" % version)
        _built[key] = _build(populate)
    return _built[key]


def series_or_skip(count):
    """{'v1': this tree, 'v2': a higher version, ...} for upgrade tests, each
    bumped build with a changed defaults file ('upgrade test N'); skips the
    test when the package cannot be built here."""
    reason = build_unavailable()
    if reason:
        import pytest
        pytest.skip(reason)
    v1 = build_deb()
    version = deb_field(v1, "Version")
    out = {"v1": v1}
    for n in range(1, count):
        out["v%d" % (n + 1)] = build_deb("%s+test%d" % (version, n), "upgrade test %d" % n)
    return out


def deb_field(deb, field):
    return subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True,
                          check=True).stdout.strip()


def deb_files(deb):
    """The paths the package installs, as '/usr/bin/x' (directories too)."""
    res = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True)
    listing = subprocess.run(["tar", "-t"], input=res.stdout, capture_output=True, check=True)
    paths = []
    for line in listing.stdout.decode().splitlines():
        path = "/" + line.lstrip("./").rstrip("/")
        if path != "/":
            paths.append(path)
    return paths


def deb_control_file(deb, name):
    """The text of a control member (postinst, prerm, conffiles...), '' if absent."""
    res = subprocess.run(["dpkg-deb", "--ctrl-tarfile", deb], capture_output=True, check=True)
    out = subprocess.run(["tar", "-xO", "./" + name], input=res.stdout, capture_output=True)
    return out.stdout.decode() if out.returncode == 0 else ""
