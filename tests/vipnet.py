"""A private network namespace with Consul, vip-manager and vip-elector in it.

The end-to-end test, `tests/tools/bench` and `tests/tools/demo --vip-manager`
build the same small world with this module:

    with Lab(nodes="abc", interval_ms=100) as lab:   # netns, Consul, 3 vip-managers
        lab.start_elector("a"); lab.start_elector("b")
        lab.wait_leader()                            # -> ("a" or "b", time seen)
        lab.vip_monitor.holders()                    # {"veth-a"}: who has the VIP now
        lab.fail_check("a"); lab.pass_check("a")

`Lab(private_netns=False)` is the plain demo's world: no namespace, no
vip-manager, no root; Consul on free ports of the machine's loopback.

Layout, inside one network namespace of the lab's own (`unshare(CLONE_NEWNET)`;
the machine's interfaces are never touched):

  * `lo` up; a Consul -dev agent on 127.0.0.1:8500 with TTL checks
    check-a/b/c in its configuration file (so they come back, passing, when
    the agent restarts). Its HTTP API also listens on a unix socket in the
    lab's directory: the test process, which stays in the machine's network
    namespace, talks to Consul through that file.
  * one veth pair per node: `veth-X` is node X's interface; vip-manager X
    puts the VIP there when the trigger-key holds `node-X`.
  * `ip -ts -o monitor address`: an event stream of address changes with the
    timestamps `ip` gives them as it receives them, from which `VipMonitor`
    knows, at any moment of the run, which interfaces held the VIP (no polling).

Observers for the benchmark: `KeyWatcher` (every state of the key, through
blocking queries), `NotifySocket` (a NOTIFY_SOCKET to time READY=1),
`CountingProxy` (counts one elector's HTTP requests to Consul) and
`PacketTrace` (packets to Consul on the namespace's loopback, with kernel
timestamps, to split a handover into its steps).

Nothing here imports vip_elector or a Consul library: the daemon is observed
from outside, over plain HTTP.

Shared with the pytest harness: the Consul HTTP helpers (`ConsulHTTP` is
tests/consul_agent.py's `ConsulAPI` over the unix socket), the agent's
command line, `free_ports`, the daemon's environment (tests/elector_process.py),
and tests/helpers.py's `wait_for`, `KeyWatcher`, `NotifySocket` and `Process`:
`spawn()` starts a Process inside the namespace, its output logged with times.

Cleanup: every process the lab starts gets PR_SET_PDEATHSIG=SIGKILL (it dies
with the process that started it, even if that one is SIGKILLed), and the
namespace is anonymous: it disappears with the last process in it. `close()`
stops everything in order and is idempotent. Start processes from the main
thread only (PDEATHSIG follows the thread that forked).
"""

import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

from consul_agent import CACHE, ConsulAPI, ConsulError, agent_argv, find_consul, free_ports
from elector_process import PYTHON, REPO, elector_env
from helpers import KeyWatcher, NotifySocket, Process, wait_for  # noqa: F401  (vipnet.X for the tools)

CONSUL = find_consul() or os.path.join(CACHE, "consul/usr/bin/consul")
VIP_MANAGER = os.path.join(CACHE, "vip-manager/usr/bin/vip-manager")

# How to run the daemon: this tree's code by default; VIP_ELECTOR_COMMAND
# (split on blanks) runs another build, e.g. "/usr/bin/vip-elector".
ELECTOR_COMMAND = (os.environ.get("VIP_ELECTOR_COMMAND") or PYTHON + " -m vip_elector").split()

# vip-manager's first look at the key: it is up.
VIP_MANAGER_READY = re.compile(r"state is (true|false), desired")

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _child_setup(netns_fd=None, new_netns=False):
    """preexec_fn: die with our parent; enter the lab's netns (or a new one)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if new_netns:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    if netns_fd is not None:
        _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns")


def missing_prerequisite():
    """Why the lab cannot run here (a string), or None."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for a network namespace)"
    for path in (CONSUL, VIP_MANAGER):
        if not os.access(path, os.X_OK):
            return "%s missing: run tests/tools/fetch-deps" % path
    if not shutil.which("ip"):
        return "iproute2's `ip` missing"
    try:
        subprocess.run(["true"], preexec_fn=lambda: _child_setup(new_netns=True), check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return "cannot create a network namespace: %s" % e
    return None


# --- processes -------------------------------------------------------------------

def spawn(name, argv, log_path, netns=None, env=None, cwd=None, on_line=None, pass_fds=()):
    """A started Process (tests/helpers.py) inside `netns` (else in the machine's
    namespace), stdout and stderr merged and logged to log_path with times, and
    dying with the process that started it (PR_SET_PDEATHSIG=SIGKILL)."""
    fd = netns.fd if netns else None
    return Process(name, argv, env=env, cwd=cwd, log_path=log_path, merge_output=True, on_line=on_line,
                   preexec_fn=lambda: _child_setup(netns_fd=fd),
                   pass_fds=tuple(pass_fds) + ((fd,) if fd is not None else ())).start()


# --- the network namespace -----------------------------------------------------

class Netns:
    """An anonymous network namespace, held open by a `sleep` process."""

    def __init__(self):
        self.holder = subprocess.Popen(
            ["sleep", "infinity"], stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _child_setup(new_netns=True))
        # Popen returns after the exec, so the unshare has happened.
        self.fd = os.open("/proc/%d/ns/net" % self.holder.pid, os.O_RDONLY | os.O_CLOEXEC)
        self.run(["ip", "link", "set", "lo", "up"])

    def run(self, argv, check=True):
        """Run a short command inside the namespace; return its stdout."""
        fd = self.fd
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           pass_fds=(fd,), preexec_fn=lambda: _child_setup(netns_fd=fd))
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (" ".join(argv), r.returncode, r.stderr.strip()))
        return r.stdout

    def socket(self, *args):
        """A socket created inside the namespace (usable from any thread)."""
        out = {}

        def make():
            try:
                _check(_libc.setns(self.fd, CLONE_NEWNET), "setns")
                out["sock"] = socket.socket(*args)
            except BaseException as e:  # handed to the caller below
                out["error"] = e

        t = threading.Thread(target=make, name="netns-socket")  # thread dies with its netns
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["sock"]

    def close(self):
        if self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# --- observing the VIP ---------------------------------------------------------

_ADDR_LINE = re.compile(
    r"^\[(?P<ts>[^\]]+)\]\s+(?P<deleted>Deleted\s+)?\d+:\s+(?P<ifname>[^\s@]+)\S*\s+"
    r"inet\s+(?P<addr>[0-9.]+)/\d+")


def parse_monitor_line(line):
    """(time, ifname, addr, added) from a line of `ip -ts -o monitor address`."""
    m = _ADDR_LINE.match(line)
    if not m:
        return None
    t = datetime.fromisoformat(m.group("ts")).timestamp()  # ip prints local time
    return t, m.group("ifname"), m.group("addr"), not m.group("deleted")


def overlaps(events, start=0.0, end=None):
    """Intervals (t_from, t_to, ifnames) during which two or more interfaces held the VIP.

    events: time-ordered (t, ifname, added) for the VIP only.
    """
    holders, result, since = set(), [], None
    for t, ifname, added in events:
        (holders.add if added else holders.discard)(ifname)
        if len(holders) >= 2 and since is None:
            since, who = t, set(holders)
        elif len(holders) >= 2:
            who |= holders
        elif since is not None:
            result.append((since, t, frozenset(who)))
            since = None
    if since is not None:
        result.append((since, end if end is not None else time.time(), frozenset(who)))
    return [(a, b, w) for a, b, w in result if b >= start and (end is None or a <= end)]


class VipMonitor:
    """Which interfaces hold the VIP, from `ip -ts -o monitor address` events."""

    SENTINEL = "192.0.2.254"

    def __init__(self, netns, vip, log_path, shared=None):
        """shared: the VipMonitor of another namespace; this one adds its events
        to that one's record, so either answers for all namespaces (the cluster
        lab, tests/cluster.py, has one namespace per node)."""
        self.vip = vip
        if shared is None:
            self.events = []           # (t, ifname, added) for the VIP, in arrival order
            self._holders = set()
            self._cond = threading.Condition()
        else:
            self.events, self._holders, self._cond = shared.events, shared._holders, shared._cond
        self._sentinel_seen = False
        self.proc = spawn("ip-monitor", ["ip", "-ts", "-o", "monitor", "address"],
                          log_path, netns=netns, on_line=self._on_line)
        # Make sure the monitor is subscribed before anything else happens.
        deadline = time.monotonic() + 10
        while not self._sentinel_seen:
            netns.run(["ip", "addr", "replace", self.SENTINEL + "/32", "dev", "lo"])
            with self._cond:
                self._cond.wait_for(lambda: self._sentinel_seen, 0.2)
            netns.run(["ip", "addr", "del", self.SENTINEL + "/32", "dev", "lo"], check=False)
            if time.monotonic() > deadline:
                raise TimeoutError("ip monitor did not report the sentinel address")

    def _on_line(self, proc, t_read, line):
        parsed = parse_monitor_line(line)
        if not parsed:
            return
        t, ifname, addr, added = parsed
        with self._cond:
            if addr == self.SENTINEL:
                self._sentinel_seen = True
            elif addr == self.vip:
                self.events.append((t, ifname, added))
                (self._holders.add if added else self._holders.discard)(ifname)
            self._cond.notify_all()

    def holders(self):
        with self._cond:
            return set(self._holders)

    def wait_holders(self, expected, timeout):
        """Wait until exactly the set `expected` holds the VIP; return the time it became so."""
        expected = set(expected)
        with self._cond:
            if not self._cond.wait_for(lambda: self._holders == expected, timeout):
                raise TimeoutError("VIP on %s, expected on %s after %.1fs"
                                   % (sorted(self._holders) or "no interface",
                                      sorted(expected) or "no interface", timeout))
            return max((e[0] for e in self.events), default=0.0)

    def first_add(self, ifname, since):
        """Time the VIP was first added to ifname at or after `since`, or None."""
        with self._cond:
            for t, name, added in self.events:
                if t >= since and name == ifname and added:
                    return t
        return None

    def ever_on(self, ifname, start, end=None):
        """Whether ifname held the VIP at any moment in [start, end]."""
        with self._cond:
            held_at_start = False
            for t, name, added in self.events:
                if name != ifname:
                    continue
                if t < start:
                    held_at_start = added
                elif end is not None and t > end:
                    break
                elif added:
                    return True
            return held_at_start

    def overlaps(self, start=0.0, end=None):
        with self._cond:
            return overlaps(sorted(self.events, key=lambda e: e[0]), start, end)

    def longest_overlap(self, start=0.0, end=None):
        """(seconds, interval) of the longest time two interfaces held the VIP at once."""
        found = self.overlaps(start, end)
        if not found:
            return 0.0, None
        best = max(found, key=lambda o: o[1] - o[0])
        return best[1] - best[0], best


# --- talking to Consul through its unix socket --------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class ConsulHTTP(ConsulAPI):
    """The lab agent's HTTP API (tests/consul_agent.py) over its unix socket."""

    def __init__(self, socket_path, node="lab", checks=()):
        self.socket_path = socket_path
        self.node = node
        self.checks = set(checks)

    def send(self, method, path, data, headers, timeout):
        conn = _UnixHTTPConnection(self.socket_path, timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def ready(self):
        try:
            leader = self.call("GET", "/v1/status/leader", timeout=1)
            if not leader:
                return False
            # serfHealth and the configured checks, as the servers see them
            # (the agent syncs its checks to the catalog a moment after start).
            passing = {c.get("CheckID") for c in self.call("GET", "/v1/health/node/" + self.node, timeout=1)
                       if c.get("Status") == "passing"}
            return passing >= {"serfHealth"} | self.checks
        except (OSError, ConsulError, http.client.HTTPException, ValueError):
            return False

    def check_update(self, check_id, status):
        """Set a TTL check's status at the agent (no wait for the catalog: the bench times this)."""
        self.call("PUT", "/v1/agent/check/%s/%s" % ({"passing": "pass", "critical": "fail",
                                                     "warning": "warn"}[status], check_id))


# --- counting HTTP requests ----------------------------------------------------

class CountingProxy:
    """A TCP listener inside the lab's netns that forwards to Consul's unix socket
    and counts the HTTP requests passing through (method, path, time)."""

    def __init__(self, netns, consul_socket):
        self.consul_socket = consul_socket
        self.requests = []
        self._lock = threading.Lock()
        self.listener = (netns.socket if netns else socket.socket)(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-%d" % self.port).start()

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.consul_socket)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, count):
        buf = b""
        skip = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                if not count:
                    continue
                buf += data
                while True:
                    if skip:
                        n = min(skip, len(buf))
                        buf, skip = buf[n:], skip - n
                        if skip:
                            break
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    head, buf = buf[:end].decode("latin-1"), buf[end + 4:]
                    first = head.split("\r\n", 1)[0].split(" ")
                    m = re.search(r"(?im)^content-length:\s*(\d+)", head)
                    skip = int(m.group(1)) if m else 0
                    with self._lock:
                        self.requests.append((time.time(), first[0], first[1] if len(first) > 1 else ""))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def count(self, start, end):
        with self._lock:
            return [r for r in self.requests if start <= r[0] <= end]

    def close(self):
        self._closed = True
        self.listener.close()


# --- a small tcpdump -------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"^[A-Z]+ /\S* HTTP/1")


class PacketTrace:
    """TCP segments with a payload to or from `port` on the lab's loopback,
    with the kernel's receive timestamps: (t, src_port, dst_port, payload head,
    request) where `request` is, for an answer, the head of the last request
    sent on that connection (None for a request).

    Used to split a handover into its steps (who sent what, when) without
    touching the processes involved.
    """

    SO_TIMESTAMPNS = 35
    ETH_P_ALL = 0x0003

    def __init__(self, netns, port=8500, keep=512):
        self.port = port
        self.keep = keep
        self.packets = []
        self.last_request = {}
        self._lock = threading.Lock()
        self.sock = netns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(self.ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMPNS, 1)
        threading.Thread(target=self._run, daemon=True, name="packet-trace").start()

    def _run(self):
        import struct
        while True:
            try:
                data, ancillary, _, addr = self.sock.recvmsg(65536, 64)
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING or data[12:14] != b"\x08\x00":
                continue
            t = None
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == self.SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    t = sec + nsec / 1e9
            ip = data[14:]
            if ip[9] != 6:  # TCP
                continue
            tcp = ip[(ip[0] & 15) * 4:]
            sport, dport = struct.unpack("!HH", tcp[:4])
            payload = tcp[(tcp[12] >> 4) * 4:]
            if payload and self.port in (sport, dport):
                head = bytes(payload[:self.keep])
                with self._lock:
                    if dport == self.port:
                        if _REQUEST_LINE.match(head):  # a new request, not a body
                            self.last_request[sport] = head
                        self.packets.append((t or time.time(), sport, dport, head, None))
                    else:
                        self.packets.append((t or time.time(), sport, dport, head,
                                             self.last_request.get(dport)))

    def between(self, start, end):
        with self._lock:
            return [p for p in self.packets if start <= p[0] <= end]

    def clear(self):
        with self._lock:
            self.packets = []

    def close(self):
        self.sock.close()


def proc_cpu_seconds(pid):
    """CPU time of a process's live threads, in seconds, to the nanosecond
    (/proc/PID/task/*/schedstat; utime+stime from /proc/PID/stat count in
    10 ms ticks, too coarse for an idle daemon)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def proc_status_kb(pid, field):
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM...)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


# --- the lab ---------------------------------------------------------------------

LAB_PREFIX = "vip-elector-lab-"


def remove_stale_labs():
    """Remove the directories of labs whose process died without cleaning up (SIGKILL)."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        path = os.path.join(tmp, name)
        if not name.startswith(LAB_PREFIX) or os.environ.get("VIP_ELECTOR_KEEP_LAB"):
            continue
        try:
            with open(os.path.join(path, "owner.pid")) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            continue
        if not os.path.exists("/proc/%d" % pid):
            shutil.rmtree(path, ignore_errors=True)


class Lab:
    """Network namespace + Consul + one vip-manager per node (+ electors on demand)."""

    def __init__(self, nodes="abc", key="service/e2e/leader", vip="10.77.0.100",
                 interval_ms=100, vip_manager=True, workdir=None, private_netns=True):
        """private_netns=False: no namespace, no vip-manager, no root needed;
        Consul on free ports of the machine's loopback (the plain demo)."""
        self.nodes = list(nodes)
        self.key = key
        self.vip = vip
        self.interval_ms = interval_ms
        self.private_netns = private_netns
        self.with_vip_manager = vip_manager and private_netns
        self.ports = {"http": 8500, "serf_lan": 8301, "serf_wan": 8302, "server": 8300}
        self._own_dir = workdir is None
        if self._own_dir:
            remove_stale_labs()
        self.dir = workdir or tempfile.mkdtemp(prefix=LAB_PREFIX)
        with open(os.path.join(self.dir, "owner.pid"), "w") as f:
            f.write("%d\n" % os.getpid())
        self.sock = os.path.join(self.dir, "consul.sock")
        self.consul = ConsulHTTP(self.sock, checks=[self.check_id(n) for n in self.nodes])
        self.netns = None
        self.vip_monitor = None
        self.agent = None
        self.watcher = None
        self.vip_managers = {}
        self.electors = {}
        self._retired = []
        self._proxies = []

    # names
    def name(self, node):
        return "node-" + node

    def check_id(self, node):
        return "check-" + node

    def iface(self, node):
        return "veth-" + node

    def node_of_iface(self, ifname):
        return ifname[len("veth-"):] if ifname.startswith("veth-") else None

    def node_of_value(self, value):
        return value[len("node-"):] if value and value.startswith("node-") else None

    def log(self, what):
        return os.path.join(self.dir, what + ".log")

    # lifecycle
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        if not self.private_netns:
            self.ports = dict(zip(self.ports, free_ports(len(self.ports))))
            self.write_consul_config()
            self.start_consul()
            self.watcher = KeyWatcher(self.consul, self.key)
            for node in self.nodes:
                self.write_elector_config(node)
            return
        self.netns = Netns()
        for node in self.nodes:
            self.netns.run(["ip", "link", "add", self.iface(node), "type", "veth",
                            "peer", "name", "peer-" + node])
            self.netns.run(["ip", "link", "set", self.iface(node), "up"])
            self.netns.run(["ip", "link", "set", "peer-" + node, "up"])
        self.vip_monitor = VipMonitor(self.netns, self.vip, self.log("ip-monitor"))
        self.write_consul_config()
        self.start_consul()
        self.watcher = KeyWatcher(self.consul, self.key)
        if self.with_vip_manager:
            for node in self.nodes:
                self.start_vip_manager(node)
        for node in self.nodes:
            self.write_elector_config(node)

    def close(self):
        # Followers first, so that the leadership does not bounce on the way out.
        leader = self.leader() if self.watcher else None
        for node, proc in sorted(self.electors.items(), key=lambda item: item[0] == leader):
            proc.stop(timeout=6)
        for proc in list(self.vip_managers.values()):
            proc.stop(timeout=3)
        if self.watcher:
            self.watcher.close()
        for proxy in self._proxies:
            proxy.close()
        if self.agent:
            self.agent.stop(timeout=10)
        if self.vip_monitor:
            self.vip_monitor.proc.stop(timeout=2)
        if self.netns:
            self.netns.close()
        if self._own_dir and not os.environ.get("VIP_ELECTOR_KEEP_LAB"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # Consul
    def write_consul_config(self):
        config = {
            "addresses": {"http": "127.0.0.1 unix://" + self.sock},
            "checks": [{"id": self.check_id(n), "name": "health of node-" + n,
                        "ttl": "24h", "status": "passing"} for n in self.nodes],
            "log_level": "info",
        }
        with open(os.path.join(self.dir, "consul.json"), "w") as f:
            json.dump(config, f)

    def start_consul(self, timeout=30):
        argv = agent_argv(CONSUL, "lab", self.ports["http"], self.ports["serf_lan"], self.ports["serf_wan"],
                          self.ports["server"]) + ["-config-file", os.path.join(self.dir, "consul.json")]
        self.agent = spawn("consul", argv, self.log("consul"), netns=self.netns, cwd=self.dir)
        try:
            wait_for(self.consul.ready, timeout, interval=0.02, message="Consul to be ready")
        except TimeoutError:
            raise TimeoutError("Consul not ready:\n" + self.agent.tail())

    def restart_consul(self):
        """Stop the agent (SIGTERM) and start it again; return (t_stopped, t_ready)."""
        self.agent.stop(timeout=10)
        t_stopped = time.time()
        self.start_consul()
        return t_stopped, time.time()

    def pass_check(self, node):
        self.consul.check_update(self.check_id(node), "passing")

    def fail_check(self, node):
        self.consul.check_update(self.check_id(node), "critical")

    def counting_proxy(self):
        proxy = CountingProxy(self.netns, self.sock)
        self._proxies.append(proxy)
        return proxy

    # vip-manager
    def vip_manager_config(self, node):
        return os.path.join(self.dir, "vip-manager-%s.yml" % node)

    def write_elector_config(self, node):
        """The vip-manager YAML of node (also the elector's --vip-manager-config)."""
        with open(self.vip_manager_config(node), "w") as f:
            f.write("# vip-manager (%s) configuration for node %s\n"
                    "ip: %s\nnetmask: 24\ninterface: %s\n"
                    "trigger-key: %s\ntrigger-value: %s\n"
                    "dcs-type: consul\ndcs-endpoints:\n  - http://%s\n"
                    "interval: %d\n"
                    % ("1.0.1", node, self.vip, self.iface(node), self.key, self.name(node),
                       self.http_addr, self.interval_ms))

    def start_vip_manager(self, node):
        self.write_elector_config(node)
        proc = spawn("vip-manager-" + node, [VIP_MANAGER, "--config", self.vip_manager_config(node)],
                     self.log("vip-manager-" + node), netns=self.netns, cwd=self.dir)
        self.vip_managers[node] = proc
        proc.wait_for_line(VIP_MANAGER_READY, 10)
        return proc

    # vip-elector
    @property
    def http_addr(self):
        return "127.0.0.1:%d" % self.ports["http"]

    def elector_argv(self, node, addr=None, extra=()):
        addr = addr or self.http_addr
        return ELECTOR_COMMAND + ["--vip-manager-config", self.vip_manager_config(node),
                "--hostname", self.name(node), "--check-id", self.check_id(node),
                "--addr", addr, "--state-dir", self.state_dir(node)] + list(extra)

    def state_dir(self, node):
        """The node's --state-dir, as systemd's RuntimeDirectory= would be: kept across restarts."""
        path = os.path.join(self.dir, "state-" + node)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def start_elector(self, node, addr=None, extra=(), env=None, on_line=None):
        if node in self.electors:
            self._retired.append(self.electors.pop(node))
        proc = spawn("elector-" + node, self.elector_argv(node, addr, extra),
                     self.log("elector-" + node), netns=self.netns, cwd=REPO,
                     env=elector_env(env), on_line=on_line)
        self.electors[node] = proc
        return proc

    def leader(self):
        """The node whose name the key holds (with a session), or None."""
        state = self.watcher.current()
        if state and state[1] is not None and state[2]:
            return self.node_of_value(state[1])
        return None

    def wait_leader(self, timeout=30, among=None, since=None):
        """Wait for the key to be held by a node (of `among`); return (node, t_seen).

        since=None: the key's current state; else the first state seen at or
        after `since` (a time.time()).
        """
        among = set(among or self.nodes)
        state = self.watcher.wait(
            lambda s: s[2] and self.node_of_value(s[1]) in among, timeout, since=since,
            message="a leader among %s" % sorted(among))
        return self.node_of_value(state[1]), state[0]

    def sessions_of(self, node):
        name = "vip-elector-" + self.name(node)
        return [s for s in self.consul.sessions() if s["Name"] == name]

    def wait_competing(self, node, timeout=30):
        """Wait until node's elector has a session (it is up and competing)."""
        return wait_for(lambda: self.sessions_of(node), timeout, interval=0.02,
                        message="node-%s to have a session" % node)

    def wait_vip_on(self, node, timeout=15):
        """Wait until the VIP is on node's interface and no other; return the time."""
        return self.vip_monitor.wait_holders({self.iface(node)} if node else set(), timeout)

    def vip_holders_now(self):
        """Nodes holding the VIP according to a fresh `ip -o addr` (cross-check of the monitor)."""
        out = self.netns.run(["ip", "-o", "-4", "addr", "show"])
        nodes = set()
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[3].split("/")[0] == self.vip:
                nodes.add(self.node_of_iface(fields[1]))
        return nodes


def median(values):
    s = sorted(values)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


if __name__ == "__main__":  # smoke test: drive the key by hand, watch the VIP move
    reason = missing_prerequisite()
    if reason:
        sys.exit("vipnet: " + reason)
    with Lab() as lab:
        for node in "abcb":
            t0 = time.time()
            lab.consul.kv_put(lab.key, lab.name(node))
            t = lab.wait_vip_on(node)
            print("key=%s: VIP on %s after %.1f ms" % (lab.name(node), sorted(lab.vip_holders_now()),
                                                     (t - t0) * 1000))
        t0 = time.time()
        lab.consul.kv_delete(lab.key)
        t = lab.wait_vip_on(None)
        print("key deleted: VIP on no node after %.1f ms" % ((t - t0) * 1000))
        print("longest overlap: %.1f ms" % (lab.vip_monitor.longest_overlap()[0] * 1000))
