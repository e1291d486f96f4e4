"""The sd_notify protocol and journald fallbacks, without a systemd (SPEC §6).

The daemon runs as a subprocess against a real Consul agent, with
NOTIFY_SOCKET pointing at an AF_UNIX datagram socket this test binds (a path,
and an abstract '@' name), so what is checked is exactly what systemd would
receive: READY=1 once, after the configuration is valid; STATUS= telling the
role; WATCHDOG=1 at half of WATCHDOG_USEC; STOPPING=1 on SIGTERM. Then the
broken environments a daemon meets in the wild (garbage WATCHDOG_USEC, a
NOTIFY_SOCKET nobody listens on, JOURNAL_STREAM without a journald): it keeps
working, exits 0 on SIGTERM and says so once.
"""

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from local_consul import LocalConsul, free_ports, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = '/usr/bin/python3' if os.path.exists('/usr/bin/python3') else sys.executable

pytestmark = pytest.mark.consul


@pytest.fixture(scope='module')
def consul(tmp_path_factory):
    agent = LocalConsul(str(tmp_path_factory.mktemp('consul')))
    yield agent
    agent.stop()




class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET would receive, with arrival times."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # '@name' is an abstract socket (the first byte NUL), as systemd allows.
        self.sock.bind('\0' + path[1:] if path.startswith('@') else path)
        self.sock.settimeout(0.2)
        self.path = path
        self.messages = []      # (monotonic time, 'KEY=value')
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._lock:
                for line in data.decode().split('\n'):
                    if line:
                        self.messages.append((now, line))

    def lines(self, prefix=''):
        with self._lock:
            return [m for _, m in self.messages if m.startswith(prefix)]

    def times(self, line):
        with self._lock:
            return [t for t, m in self.messages if m == line]

    def wait_for(self, line, timeout=15):
        return wait_for(lambda: line in self.lines(), timeout,
                        f'{line!r} on NOTIFY_SOCKET (got {self.lines()})')

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    made = []

    def make(abstract=False):
        path = (f'@vip-elector-test-{uuid.uuid4().hex}' if abstract
                else str(tmp_path / f'notify-{len(made)}.sock'))
        made.append(NotifySocket(path))
        return made[-1]
    yield make
    for s in made:
        s.close()


class Daemon:
    """vip-elector from this checkout, run the way systemd would run it.

    With journal_stream, JOURNAL_STREAM names the file stderr goes to (its
    device:inode), as systemd does when stderr is connected to the journal.
    """

    def __init__(self, tmp_path, args, env, argv_prefix=(), journal_stream=False):
        self.stderr_path = tmp_path / f'stderr-{uuid.uuid4().hex[:6]}.log'
        self.stderr = open(self.stderr_path, 'wb')
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(('NOTIFY_SOCKET', 'WATCHDOG_', 'JOURNAL_STREAM', 'CONSUL_'))}
        full_env.update(env)
        full_env['PYTHONPATH'] = REPO
        if journal_stream:
            st = os.fstat(self.stderr.fileno())
            full_env['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'
        self.proc = subprocess.Popen(
            list(argv_prefix) + [PYTHON, '-m', 'vip_elector', *args], cwd=REPO, env=full_env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr)

    def log(self):
        return self.stderr_path.read_text(errors='replace')

    def terminate(self, timeout=10):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f'no exit within {timeout}s of SIGTERM; log:\n{self.log()}')

    def reap(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


@pytest.fixture
def daemons(tmp_path):
    """start(args, env, argv_prefix=(), journal_stream=False) -> a running Daemon;
    killed at teardown, its stderr printed (pytest shows it when the test fails)."""
    started = []

    def start(args, env, argv_prefix=(), journal_stream=False):
        started.append(Daemon(tmp_path, args, env, argv_prefix, journal_stream))
        return started[-1]
    yield start
    for d in started:
        d.reap()
        print(f'----- {shlex.join(d.proc.args)}: exit {d.proc.returncode}\n{d.log()}')


@pytest.fixture
def config(tmp_path):
    def write(consul_addr, key, dcs_type='consul'):
        path = tmp_path / f'vip-manager-{uuid.uuid4().hex[:6]}.yml'
        path.write_text(f'dcs-type: {dcs_type}\ndcs-endpoints: ["http://{consul_addr}"]\n'
                        f'trigger-key: {key}\n')
        return str(path)
    return write


@pytest.fixture
def key():
    return f'service/notify-{uuid.uuid4().hex[:8]}/leader'


def args_for(cfg, name):
    return [f'--vip-manager-config={cfg}', '--hostname', name]


# ---------------------------------------------------------------------------

def test_ready_once_status_follows_role_stopping_on_sigterm(consul, key, config, notify_socket, daemons):
    cfg = config(consul.addr, key)
    sock_a, sock_b = notify_socket(), notify_socket(abstract=True)
    a = daemons(args_for(cfg, 'node-a'), {'NOTIFY_SOCKET': sock_a.path})
    sock_a.wait_for(f'STATUS=leader: holding {key} as node-a')
    assert consul.key(key)[0] == 'node-a'
    b = daemons(args_for(cfg, 'node-b'), {'NOTIFY_SOCKET': sock_b.path})
    sock_b.wait_for('STATUS=follower: leader is node-a')
    assert sock_b.lines('READY=') == ['READY=1']
    assert sock_b.lines('STOPPING') == []

    assert a.terminate() == 0
    assert sock_a.lines('STOPPING=') == ['STOPPING=1']
    assert sock_a.lines('READY=') == ['READY=1'], 'READY=1 is sent once per run'
    # The follower takes over and says so.
    sock_b.wait_for(f'STATUS=leader: holding {key} as node-b')
    assert b.terminate() == 0
    assert sock_b.lines('STOPPING=') == ['STOPPING=1']
    assert sock_b.lines('READY=') == ['READY=1']
    # Every status names a role.
    for line in sock_a.lines('STATUS=') + sock_b.lines('STATUS='):
        assert line.split('=', 1)[1].startswith(('starting', 'leader: ', 'follower: ', 'waiting',
                                                 'stopping')), line
    # READY=1 came before the role was known to be leader or follower only if
    # Consul had answered: the first STATUS after READY is a role, not 'starting'.
    assert consul.key(key) is None, 'the last leader deleted the key on SIGTERM'


def test_no_ready_on_configuration_error(consul, key, config, notify_socket, daemons):
    sock = notify_socket()
    d = daemons(args_for(config(consul.addr, key, dcs_type='etcd'), 'node-a'),
                {'NOTIFY_SOCKET': sock.path, 'WATCHDOG_USEC': '2000000'})
    assert d.proc.wait(15) == 78
    time.sleep(0.3)  # datagrams already sent are in the socket buffer: let the reader drain it
    assert sock.lines('READY=') == [], 'READY=1 only once the configuration is valid'
    assert 'etcd' in d.log()


def test_ready_when_consul_unreachable_and_status_says_why(key, config, notify_socket, daemons):
    """READY=1 after the first attempt to reach Consul, even a failed one (SPEC §6)."""
    port = free_ports(1)[0]
    sock = notify_socket()
    d = daemons(args_for(config(f'127.0.0.1:{port}', key), 'node-a'), {'NOTIFY_SOCKET': sock.path})
    sock.wait_for('READY=1')
    wait_for(lambda: any(s.startswith(f'STATUS=waiting for Consul at 127.0.0.1:{port}')
                         for s in sock.lines('STATUS=')), 10, 'a waiting-for-Consul status')
    assert d.proc.poll() is None
    assert d.terminate() == 0
    assert sock.lines('STOPPING=') == ['STOPPING=1']


@pytest.mark.parametrize('role', ['leader', 'follower'])
def test_watchdog_pings_at_half_of_watchdog_usec(consul, key, config, notify_socket, daemons, role):
    cfg = config(consul.addr, key)
    if role == 'follower':
        holder = daemons(args_for(cfg, 'node-x'), {})
        wait_for(lambda: consul.key(key), 15, 'node-x to lead')
    sock = notify_socket()
    # 3 s: pings due every 1.5 s. The loop's own work (renewals every few
    # seconds, blocking queries up to a minute) must not delay them.
    # WATCHDOG_PID is the daemon's own PID, as systemd sets it.
    d = daemons(args_for(cfg, 'node-a'), {'NOTIFY_SOCKET': sock.path, 'WATCHDOG_USEC': '3000000'},
                argv_prefix=('sh', '-c', 'WATCHDOG_PID=$$ exec "$@"', 'sh'))
    sock.wait_for('READY=1')
    wait_for(lambda: len(sock.times('WATCHDOG=1')) >= 6, 30, '6 watchdog pings')
    pings = sock.times('WATCHDOG=1')
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert max(gaps) < 2.7, f'a ping came late enough to be killed by systemd: {gaps}'
    assert 0.9 < sum(gaps) / len(gaps) < 2.1, f'pings not at half of WATCHDOG_USEC: {gaps}'
    assert min(gaps) > 0.45, f'pings much more often than needed: {gaps}'
    assert sock.lines('STATUS=')[-1].startswith(f'STATUS={role}: '), sock.lines('STATUS=')
    assert d.terminate() == 0
    if role == 'follower':
        assert holder.terminate() == 0


def test_watchdog_pid_of_another_process_is_not_ours(consul, key, config, notify_socket, daemons):
    sock = notify_socket()
    d = daemons(args_for(config(consul.addr, key), 'node-a'),
                {'NOTIFY_SOCKET': sock.path, 'WATCHDOG_USEC': '1000000', 'WATCHDOG_PID': '1'})
    sock.wait_for(f'STATUS=leader: holding {key} as node-a')
    # Leader with a 10 s TTL: the loop turns several times within 3 s.
    time.sleep(3)
    assert sock.lines('WATCHDOG=') == []
    assert d.terminate() == 0


# --- the daemon keeps working in broken environments, and says so once ---------

def _works_then_stops(consul, key, d, name='node-a'):
    wait_for(lambda: (consul.key(key) or ('',))[0] == name, 15, f'{name} to hold {key}')
    assert d.proc.poll() is None
    assert d.terminate() == 0
    assert consul.key(key) is None


@pytest.mark.parametrize('value', ['garbage', '0', '-5', ''])
def test_bad_watchdog_usec_is_ignored_with_one_warning(consul, key, config, notify_socket, daemons,
                                                       value):
    sock = notify_socket()
    d = daemons(args_for(config(consul.addr, key), 'node-a'),
                {'NOTIFY_SOCKET': sock.path, 'WATCHDOG_USEC': value})
    sock.wait_for('READY=1')
    _works_then_stops(consul, key, d)
    assert sock.lines('WATCHDOG=') == []
    assert sock.lines('STOPPING=') == ['STOPPING=1']
    assert d.log().count('WATCHDOG_USEC') == 1, d.log()


def test_notify_socket_nobody_listens_on(consul, key, config, tmp_path, daemons):
    for target in (str(tmp_path / 'no-such.sock'), f'@vip-elector-nobody-{uuid.uuid4().hex}'):
        d = daemons(args_for(config(consul.addr, key), 'node-a'),
                    {'NOTIFY_SOCKET': target, 'WATCHDOG_USEC': '1000000'})
        _works_then_stops(consul, key, d)
        warnings = [line for line in d.log().splitlines() if 'NOTIFY_SOCKET' in line]
        assert len(warnings) == 1, d.log()


def test_journal_stream_without_journald_falls_back_to_stderr(consul, key, config, tmp_path, daemons):
    """JOURNAL_STREAM says stderr is the journal, but no journald listens on
    /run/systemd/journal/socket: lines go to stderr, with one warning."""
    prefix = ()
    if os.path.exists('/run/systemd/journal/socket'):
        if os.geteuid() != 0 or shutil.which('unshare') is None:
            pytest.skip('a journald runs here and hiding it needs root (unshare -m)')
        prefix = ('unshare', '--mount', '--propagation', 'private', 'sh', '-c',
                  'mount -t tmpfs tmpfs /run/systemd/journal && exec "$@"', 'hide-journald')
    d = daemons(args_for(config(consul.addr, key), 'node-a'), {}, prefix, journal_stream=True)
    _works_then_stops(consul, key, d)
    log = d.log()
    assert 'LOCK ACQUIRED' in log, log
    journald_warnings = [line for line in log.splitlines() if 'journal' in line.lower()]
    assert len(journald_warnings) == 1, log
