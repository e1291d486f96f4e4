"""A booted Debian container (bookworm, or trixie) with a real systemd, for tests.

    from container import Container, container_unavailable, container_fixture
    # (tests/ is on sys.path under pytest)

    @pytest.fixture(scope='module')           # boot once per module
    def ct(request):
        yield from container_fixture(request)  # skips if container_unavailable()

    ct.put('/etc/vip-manager.yml', 'dcs-type: consul\n', mode=0o640, group='vip-elector')
    ct.copy_in('vip_elector', '/usr/lib/python3/dist-packages/vip_elector')
    ct.run(['systemctl', 'start', 'vip-elector'])          # CompletedProcess; raises
    ct.run('systemctl is-active x', check=False).returncode  #   ContainerError if check
    ct.systemctl('stop', 'vip-elector')
    ct.show('vip-elector', 'ActiveState', 'NRestarts')     # {'ActiveState': ..., ...}
    ct.journal('-u', 'vip-elector', '-o', 'json')          # journalctl's stdout
    ct.read('/etc/passwd')

API:
  container_unavailable() -> None or the reason (not root, no nspawn/nsenter/
      unshare, no mount namespaces): the only reasons to skip.
  rootfs_path(build=True, suite='bookworm') -> the cached rootfs of that
      Debian release (tests/tools/rootfs builds it).
  Container(rootfs=None, prefix='vipe', boot_timeout=120, suite='bookworm')
      .boot() -> self (also `with Container() as ct:`); .boot_seconds
      .run(argv | shell string, input=None, check=True, timeout=60, env=None,
           text=True) -> subprocess.CompletedProcess (stdout, stderr captured)
      .systemctl(*args, check=True), .show(unit, *props) -> dict,
      .journal(*args, check=True) -> str, .read(path) -> str
      .put(path, data, mode=0o644, owner='root', group='root')   (names
           resolved inside, so a user created inside works)
      .copy_in(host_src, dest, owner='root', group='root')   (file or tree,
           replaces dest, modes kept, __pycache__ skipped)
      .nsenter_argv(argv, env=None) -> host argv running argv inside
      .stop()   idempotent, never raises; .name, .pid (host PID of its init)
  container_fixture(request, suite='bookworm'): generator body for a fixture
      of any scope.

The root filesystem comes from `tests/tools/rootfs`, built once and cached in
$VIP_ELECTOR_CACHE/rootfs-<hash>. Each Container boots a throwaway view of it:
an overlayfs (lower = the cached tree, upper in a temporary directory) mounted
in a private mount namespace of the container's own, so the cached tree is
never written and nothing stays mounted if the test process dies. systemd in
the container finishes booting in ~0.3 s.

systemd-nspawn runs with `--register=no --keep-unit`: no machined, no host bus
needed. The container shares the host's network, so it reaches a Consul agent
listening on 127.0.0.1. Commands run inside with `nsenter --all` into the
container's init, with a clean environment, in a session of their own.

Parallel runs: names are unique per process and call; on a host whose PID 1
is not systemd, nspawn would put every container in the same `payload`
cgroup below its own, so each Container starts nspawn in a cgroup of its own
(removed at teardown); on a systemd host, in a scope unit of its own.

stop() always tears everything down (poweroff, then SIGKILL, remove the
temporary directory and cgroups); it runs from __exit__, from the pytest
fixture's finaliser and at interpreter exit.
"""

import atexit
import io
import os
import secrets
import shlex
import shutil
import subprocess
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTFS_TOOL = os.path.join(REPO, 'tests', 'tools', 'rootfs')

# The environment commands get inside the container; nothing of the host's.
INNER_ENV = {
    'PATH': '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    'LANG': 'C.UTF-8',
    'TERM': 'dumb',
    'SYSTEMD_PAGER': '',
    'SYSTEMD_COLORS': '0',
    'SYSTEMD_LESS': '',
}


class ContainerError(Exception):
    """The container could not be booted or a command inside failed."""


def container_unavailable():
    """None if a container can boot here, else the reason it cannot.

    Only what is truly impossible counts (not root, no systemd-nspawn, no
    mount namespaces); anything else that goes wrong later is an error.
    """
    if os.geteuid() != 0:
        return 'systemd-nspawn needs root'
    for tool in ('systemd-nspawn', 'nsenter', 'unshare'):
        if shutil.which(tool) is None:
            return f'{tool} is not installed (apt-get install systemd-container util-linux)'
    probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True, text=True)
    if probe.returncode != 0:
        return f'cannot create a mount namespace here: {probe.stderr.strip()}'
    return None


def rootfs_path(build=True, suite='bookworm'):
    """The cached rootfs of `suite`, built first if missing (tests/tools/rootfs)."""
    argv = [ROOTFS_TOOL, '--suite', suite] + ([] if build else ['--path'])
    res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise ContainerError(f'tests/tools/rootfs failed:\n{res.stderr}')
    return res.stdout.strip().splitlines()[-1]


def _host_has_systemd():
    return os.path.isdir('/run/systemd/system')


def _own_cgroup_dirs(name):
    """Directories for a cgroup of our own below ours, in every hierarchy
    systemd uses (name=systemd v1 and/or the unified v2 one)."""
    mine = {}
    with open('/proc/self/cgroup') as f:
        for line in f:
            num, controllers, path = line.rstrip('\n').split(':', 2)
            mine[controllers] = path
    dirs = []
    if 'name=systemd' in mine and os.path.exists('/sys/fs/cgroup/systemd/cgroup.procs'):
        dirs.append('/sys/fs/cgroup/systemd' + mine['name=systemd'])
    if '' in mine:
        for root in ('/sys/fs/cgroup/unified', '/sys/fs/cgroup'):
            if os.path.exists(os.path.join(root, 'cgroup.controllers')):
                dirs.append(root + mine[''])
                break
    return [os.path.join(d.rstrip('/'), name) for d in dirs]


def _rmdir_tree(path):
    """Remove a cgroup directory and its children, deepest first."""
    if not os.path.isdir(path):
        return
    for root, subdirs, _ in os.walk(path, topdown=False):
        for d in subdirs:
            try:
                os.rmdir(os.path.join(root, d))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


class Container:
    """One booted throwaway container. See the module docstring."""

    def __init__(self, rootfs=None, prefix='vipe', boot_timeout=120, suite='bookworm',
                 nspawn_args=()):
        """nspawn_args: more systemd-nspawn options, e.g. --capability=CAP_NET_ADMIN
        (which nspawn withholds from a container sharing the host's network)."""
        self.rootfs = rootfs
        self.suite = suite
        self.nspawn_args = list(nspawn_args)
        self.name = f'{prefix}-{os.getpid()}-{secrets.token_hex(3)}'
        self.boot_timeout = boot_timeout
        self.tmpdir = None
        self.nspawn = None      # the systemd-nspawn Popen
        self.pid = None         # host PID of the container's init (systemd)
        self.boot_seconds = None
        self._cgroups = []
        self._log = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self):
        return self.boot()

    def __exit__(self, *exc):
        self.stop()

    def boot(self):
        """Start the container and wait until its systemd finished booting
        (`running` or `degraded`). Returns self. Tears down on failure."""
        if self.rootfs is None:
            self.rootfs = rootfs_path(suite=self.suite)
        started = time.monotonic()
        atexit.register(self.stop)
        try:
            self._spawn()
            self._wait_for_init(started + self.boot_timeout)
            self._wait_for_boot(started + self.boot_timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _spawn(self):
        self.tmpdir = tempfile.mkdtemp(prefix=f'{self.name}.')
        for d in ('upper', 'work', 'root'):
            os.mkdir(os.path.join(self.tmpdir, d))
        t = self.tmpdir
        overlay = (f'lowerdir={self.rootfs},upperdir={t}/upper,workdir={t}/work')
        nspawn = ['systemd-nspawn', '--quiet', '--register=no', '--keep-unit',
                  '--console=pipe', '--link-journal=no', '--timezone=off',
                  '--resolv-conf=off', '--boot', '--machine', self.name,
                  '--directory', f'{t}/root'] + self.nspawn_args
        outer = ['unshare', '--mount', '--propagation', 'private']
        if _host_has_systemd():
            # A scope unit of its own keeps containers apart; systemd-run
            # reaches PID 1 on its private socket, no D-Bus needed. (Not
            # exercised on the development machine, whose PID 1 is not systemd.)
            outer = ['systemd-run', '--scope', '--quiet', '--collect',
                     f'--unit=vip-elector-test-{self.name}'] + outer
        else:
            self._cgroups = _own_cgroup_dirs(f'vip-elector-ct-{self.name}')
            for d in self._cgroups:
                os.makedirs(d, exist_ok=True)
        # The overlay lives only in this mount namespace: it disappears with
        # nspawn even if we are killed before stop().
        script = (f'mount -t overlay overlay -o {shlex.quote(overlay)} {t}/root && '
                  f'exec {shlex.join(nspawn)}')
        self._log = open(os.path.join(t, 'console.log'), 'wb')
        cgroups = self._cgroups

        def enter_own_cgroup():
            for d in cgroups:
                try:
                    with open(os.path.join(d, 'cgroup.procs'), 'w') as f:
                        f.write(str(os.getpid()))
                except OSError:
                    pass
        self.nspawn = subprocess.Popen(
            outer + ['sh', '-c', script],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=enter_own_cgroup, env={'PATH': INNER_ENV['PATH'], 'LANG': 'C.UTF-8'})

    def console_log(self):
        try:
            with open(os.path.join(self.tmpdir, 'console.log'), errors='replace') as f:
                return f.read()
        except (OSError, TypeError):
            return ''

    def _wait_for_init(self, deadline):
        # (systemd-run execs) unshare execs sh, sh execs nspawn: same PID.
        # nspawn's child is the container's init (systemd), PID 1 inside.
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(f'systemd-nspawn exited with {self.nspawn.returncode}:\n'
                                     + self.console_log()[-3000:])
            for child in _children(self.nspawn.pid):
                if _comm(child) == 'systemd':
                    self.pid = child
                    return
            time.sleep(0.05)
        raise ContainerError('the container did not start systemd in time:\n'
                             + self.console_log()[-3000:])

    def _wait_for_boot(self, deadline):
        last = None
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(f'systemd-nspawn exited with {self.nspawn.returncode}:\n'
                                     + self.console_log()[-3000:])
            left = max(1, deadline - time.monotonic())
            res = self.run(['systemctl', 'is-system-running', '--wait'],
                           check=False, timeout=left)
            state = res.stdout.strip()
            if state in ('running', 'degraded'):
                return
            last = f'{state} {res.stderr.strip()}'
            if state in ('maintenance', 'stopping'):
                break
            time.sleep(0.1)
        raise ContainerError(f'the container did not finish booting: {last}\n'
                             + self.console_log()[-3000:])

    def stop(self, timeout=20):
        """Power the container off (SIGKILL if it does not), remove its
        temporary files and cgroups. Idempotent; never raises."""
        atexit.unregister(self.stop)
        p = self.nspawn
        if p is not None and p.poll() is None:
            if self.pid is not None:
                self.run(['systemctl', 'poweroff', '--no-block'], check=False, timeout=10)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                # Killing nspawn kills the container's init, and with it every
                # process in the container's PID namespace.
                if self.pid is not None:
                    _kill(self.pid)
                _kill(p.pid)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        self.nspawn = None
        self.pid = None
        if self._log is not None:
            self._log.close()
            self._log = None
        for d in self._cgroups:
            _rmdir_tree(d)
        self._cgroups = []
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None

    # -- commands --------------------------------------------------------------

    def nsenter_argv(self, argv, env=None):
        """The host argv that runs `argv` inside the container."""
        if self.pid is None:
            raise ContainerError('the container is not running')
        inner = dict(INNER_ENV, **(env or {}))
        return (['nsenter', '--target', str(self.pid), '--all', '--root', '--wd',
                 'env', '-i'] + [f'{k}={v}' for k, v in inner.items()] + list(argv))

    def run(self, argv, *, input=None, check=True, timeout=60, env=None, text=True):
        """Run argv (a list, or a string for /bin/sh -c) inside the container.

        The command runs in a session of its own: a `kill 0` inside cannot
        reach the test process. Returns subprocess.CompletedProcess with
        stdout and stderr captured;
        raises ContainerError when check is true and the exit status is not 0.
        """
        if isinstance(argv, str):
            argv = ['/bin/sh', '-c', argv]
        try:
            res = subprocess.run(self.nsenter_argv(argv, env), input=input, text=text,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            raise ContainerError(f'{shlex.join(argv)}: no answer within {timeout}s '
                                 f'(stdout: {e.stdout!r}, stderr: {e.stderr!r})') from None
        if check and res.returncode != 0:
            raise ContainerError(f'{shlex.join(argv)} exited with {res.returncode}:\n'
                                 f'stdout: {res.stdout}\nstderr: {res.stderr}')
        return res

    def systemctl(self, *args, check=True, timeout=60):
        return self.run(['systemctl', *args], check=check, timeout=timeout)

    def show(self, unit, *props):
        """`systemctl show -p ...` as a dict of strings."""
        res = self.run(['systemctl', 'show', unit] + [f'--property={p}' for p in props])
        out = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition('=')
            out[key] = value
        return out

    def journal(self, *args, check=True):
        """journalctl output (stdout text), e.g. journal('-u', 'x', '-o', 'verbose')."""
        return self.run(['journalctl', '--no-pager', *args], check=check).stdout

    # -- files -----------------------------------------------------------------

    def put(self, path, data, mode=0o644, owner='root', group='root'):
        """Create or replace the file `path` inside with `data` (str or bytes),
        with the given mode and owner (names, resolved inside the container)."""
        if isinstance(data, str):
            data = data.encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode='w') as tar:
            info = tarfile.TarInfo(path.lstrip('/'))
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            info.uname, info.gname = owner, group
            tar.addfile(info, io.BytesIO(data))
        self._untar(buf.getvalue())

    def copy_in(self, src, dest, owner='root', group='root'):
        """Copy a host file or directory tree to `dest` inside (created or
        replaced), owned by owner:group, modes kept."""
        buf = io.BytesIO()

        def reown(info):
            info.uname, info.gname, info.uid, info.gid = owner, group, 0, 0
            return None if '__pycache__' in info.name else info
        with tarfile.open(fileobj=buf, mode='w') as tar:
            tar.add(src, arcname=dest.lstrip('/'), filter=reown)
        self.run(['rm', '-rf', '--one-file-system', '--', dest])
        self._untar(buf.getvalue())

    def read(self, path):
        """The text of a file inside."""
        return self.run(['cat', '--', path]).stdout

    def _untar(self, data):
        res = subprocess.run(self.nsenter_argv(['tar', '-x', '-C', '/', '--same-owner',
                                                '--same-permissions']),
                             input=data, capture_output=True, timeout=60,
                             start_new_session=True)
        if res.returncode != 0:
            raise ContainerError(f'tar -x inside failed: {res.stderr.decode(errors="replace")}')


def _children(pid):
    out = []
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _comm(pid):
    try:
        with open(f'/proc/{pid}/comm') as f:
            return f.read().strip()
    except OSError:
        return None


def _kill(pid):
    try:
        os.kill(pid, 9)
    except OSError:
        pass


def container_fixture(request, suite='bookworm', nspawn_args=()):
    """Body for a pytest fixture (any scope) that yields a booted Container
    of the Debian release `suite`:

        @pytest.fixture(scope='module')
        def ct(request):
            yield from container_fixture(request)

    Skips the test when container_unavailable() says why it cannot run.
    """
    import pytest
    reason = container_unavailable()
    if reason:
        pytest.skip(reason)
    ct = Container(suite=suite, nspawn_args=nspawn_args)
    request.addfinalizer(ct.stop)
    ct.boot()
    yield ct
    ct.stop()
