"""A real Consul cluster in network namespaces, with vip-elector and vip-manager on every node.

The lab of SPEC §9.6, a sibling of tests/vipnet.py (whose processes,
namespaces and observers it reuses):

    with ClusterLab() as lab:                 # 3 servers, 3 nodes, 3 vip-managers
        lab.start_electors()
        leader = lab.settle(60)               # one claimer, the key names it, sessions = electors
        lab.partition(leader); ...; lab.heal_link(leader)
        lab.claim_overlaps(t0)                # two electors claiming leadership at once
        lab.vip_monitor.overlaps(t0)          # the VIP on two nodes at once

Layout (10.77.1.0/24, addresses of namespaces the lab creates):

  * "hub": a network namespace of the lab's own holding the bridge `br0`.
  * three Consul servers s1..s3 (10.77.1.1-3): `server`, `bootstrap_expect`
    3, their own data directories, production raft timing
    (`raft_multiplier` 1), `retry_join` on each other every second.
  * nodes a, b, c (10.77.1.11-13): a Consul client agent (HTTP on
    127.0.0.1:8500 in its namespace) with the TTL check `check-X` in its
    configuration file (it comes back, passing, when the agent restarts),
    vip-elector (`--check-id check-X`, `--state-dir`, NOTIFY_SOCKET of its own)
    and vip-manager 1.0.1 putting the VIP 10.77.1.100 on `veth-X`.
  * every Consul process is in a namespace of its own, linked to the bridge by
    a veth pair: `veth-NAME` inside, `hub-NAME` on the bridge. A partition is
    `ip link set hub-NAME down` (this kernel has no netem and no nftables).
  * every agent's HTTP API also listens on a unix socket in the lab's
    directory: the test process, in the machine's namespace, talks to Consul
    through those files. Observers (the key through blocking queries, the
    session list, the raft leader) go through a server the lab is not
    disturbing (`ObserverHTTP`), with `stale` reads so that they keep seeing
    the replicated state while the raft leader is stalled or quorum is lost.

What the lab records for the invariants of §9.6: each elector's STATUS
(its own notify socket) and lifecycle (start, exit, SIGSTOP, SIGCONT) give
when it claimed leadership (`claims`); one `ip monitor address all-nsid` in
the hub gives where the VIP was, every node's events in the kernel's order
(OrderedVipMonitor); `KeyWatcher` gives the key's history.

Cleanup as in vipnet: PDEATHSIG on every process, anonymous namespaces held
by a `sleep`, `close()` idempotent. Start processes from the main thread.
"""

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Dict, List, Optional, Tuple

from consul_agent import ConsulError
from elector_process import PYTHON, REPO, elector_env
from helpers import INTERNAL_ERROR, KeyWatcher, NotifySocket, Process, wait_for
from vipnet import (CONSUL, VIP_MANAGER, VIP_MANAGER_READY, ConsulHTTP, Lab, Netns, VipMonitor, spawn,
                    _UnixHTTPConnection, missing_prerequisite, overlaps)

__all__ = ["ClusterLab", "missing_prerequisite", "claim_intervals", "gaps"]

SUBNET = "10.77.1."
SERVERS = ("s1", "s2", "s3")
NODE_IPS = {"a": 11, "b": 12, "c": 13, "d": 14, "e": 15}
RAFT_PORT = 8300
LAB_UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "lab-unit")


@dataclass
class Member:
    """One Consul agent (server or a node's client) and its namespace."""
    name: str                   # "s1" or "node-a"
    key: str                    # "s1" or "a": the lab's handle, also in interface names
    ip: str
    server: bool
    netns: Netns
    sock: str                   # its HTTP API's unix socket
    config: str
    api: ConsulHTTP
    proc: Optional[Process] = None
    paused: bool = False
    link_up: bool = True
    elector_paused: bool = False   # (nodes) its vip-elector is SIGSTOPped

    @property
    def running(self) -> bool:
        """Alive and not stopped: able to answer."""
        return self.proc is not None and self.proc.alive and not self.paused


def find_fence_hook():
    """The example fencing hook of SPEC §10.5 in this tree (examples/*fence*,
    executable, not a unit drop-in), or None while there is none."""
    examples = os.path.join(REPO, "examples")
    for name in sorted(os.listdir(examples)):
        path = os.path.join(examples, name)
        if "fence" in name and not name.endswith((".conf", ".md")) and os.path.isfile(path) \
                and os.access(path, os.X_OK):
            return path
    return None


class UnitServer:
    """A stand-in for `systemctl start|stop vip-manager`, for the fencing hook.

    The example hook runs in a node's namespace as vip-elector's child and
    starts or stops vip-manager with a command of the operator's choice; here
    that is tests/tools/lab-unit, which asks this server over a unix socket
    in the lab's directory. The lab's own vip-manager processes are started
    and stopped (SIGTERM, as systemd does), so they keep their logs and their
    cleanup. One thread serves the requests in order and starts the
    processes: PDEATHSIG ties them to it, and it lives as long as the lab.
    """

    def __init__(self, lab):
        self.lab = lab
        self.path = os.path.join(lab.dir, "units.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True, name="units")
        self._thread.start()

    def command(self, verb, node):
        return "%s %s %s %s %s" % (PYTHON, LAB_UNIT, self.path, verb, node)

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(30)
                    verb, node = conn.makefile().readline().split()
                    self.lab.note("lab-unit %s vip-manager-%s" % (verb, node))
                    if verb == "start":
                        self.lab.ensure_vip_manager(node)
                    else:
                        self.lab.stop_vip_manager(node)
                    answer = "ok"
                except Exception as e:  # noqa: BLE001 - told to the hook, which logs it
                    answer = "error: %s" % e
                try:
                    conn.sendall((answer + "\n").encode())
                except OSError:
                    pass

    def close(self):
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self._thread.join(10)


# --- where the VIP is: every node's address events, in the kernel's order ----------

# A line of `ip -ts -o monitor address all-nsid`: the index and name after the
# nsid are resolved in the monitor's namespace (wrong for another's), the
# label before the `\` of -o is the interface's own name in its namespace.
_NSID_ADDR_LINE = re.compile(
    r"^\[(?P<ts>[^\]]+)\]\s+\[nsid [^\]]+\]\s*(?P<deleted>Deleted\s+)?\d+:\s+\S+\s+"
    r"inet\s+(?P<addr>[0-9.]+)/\d+\s+(?P<rest>[^\\]*)")


class OrderedVipMonitor(VipMonitor):
    """The VIP on every node, from one `ip monitor address all-nsid` in the hub.

    One netlink socket receives the address events of every namespace the hub
    has an nsid for (each member's, given by its veth pair) in the order the
    kernel made them, so a handover is never seen out of order: one monitor
    per node namespace stamps each event when its own process reads it, and a
    monitor scheduled a few ms late makes a removal look later than the next
    node's add — two holders that never were. Node interfaces' names
    (`veth-X`) are unique across the lab.
    """

    def __init__(self, hub, vip, log_path):
        self.vip = vip
        self.events = []
        self._holders = set()
        self._cond = threading.Condition()
        self._sentinel_seen = False
        self.proc = spawn("ip-monitor", ["ip", "-ts", "-o", "monitor", "address", "all-nsid"],
                          log_path, netns=hub, on_line=self._on_line)
        deadline = time.monotonic() + 10
        while not self._sentinel_seen:
            hub.run(["ip", "addr", "replace", self.SENTINEL + "/32", "dev", "lo"])
            with self._cond:
                self._cond.wait_for(lambda: self._sentinel_seen, 0.2)
            hub.run(["ip", "addr", "del", self.SENTINEL + "/32", "dev", "lo"], check=False)
            if time.monotonic() > deadline:
                raise TimeoutError("ip monitor all-nsid did not report the sentinel address")

    def _on_line(self, proc, t_read, line):
        m = _NSID_ADDR_LINE.match(line)
        if not m:
            return
        t = datetime.fromisoformat(m.group("ts")).timestamp()
        words = m.group("rest").split()
        ifname = words[-1] if words else ""
        added = not m.group("deleted")
        with self._cond:
            if m.group("addr") == self.SENTINEL:
                self._sentinel_seen = True
            elif m.group("addr") == self.vip:
                self.events.append((t, ifname, added))
                (self._holders.add if added else self._holders.discard)(ifname)
            self._cond.notify_all()


# --- observing through a server the lab is not disturbing ------------------------

class ObserverHTTP(ConsulHTTP):
    """The cluster's HTTP API through whichever server is up and not stopped.

    Reads are `stale` (any server answers from its replica): the observers
    keep seeing the committed state during a raft election or a quorum loss.
    `drop(server)` cuts the requests in flight to a server the lab is about to
    stop, so that no observer hangs on it.
    """

    def __init__(self, lab):
        super().__init__(socket_path=None)
        self.lab = lab
        self._open = set()
        self._lock = threading.Lock()

    def send(self, method, path, data, headers, timeout):
        member = self.lab.observer_server()
        if method == "GET" and "stale" not in path and not path.startswith("/v1/status/"):
            path += ("&" if "?" in path else "?") + "stale"
        conn = _UnixHTTPConnection(member.sock, timeout)
        entry = (member.key, conn)
        with self._lock:
            self._open.add(entry)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            with self._lock:
                self._open.discard(entry)
            conn.close()

    def drop(self, server):
        with self._lock:
            victims = [conn for key, conn in self._open if key == server]
        for conn in victims:
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# --- claims: who said it leads, when ------------------------------------------------

def claim_intervals(statuses, life, now):
    """Intervals (start, end) during which one node's elector claimed leadership.

    statuses: (t, text) of its STATUS messages; life: (t, kind) with kind in
    start, exit, pause, cont. It claims from a STATUS starting with `leader:`
    until the next STATUS, its exit, or a SIGSTOP (a stopped process says
    nothing; its last claim stands again at SIGCONT until it corrects it).
    """
    order = {"exit": 0, "start": 1, "pause": 2, "cont": 3, "status": 4}
    events = sorted([(t, "status", text) for t, text in statuses] + [(t, kind, None) for t, kind in life],
                    key=lambda e: (e[0], order[e[1]]))
    said, alive, paused, since, out = False, False, False, None, []
    for t, kind, text in events:
        if kind == "status":
            said = text.startswith("leader:")
        elif kind == "start":
            alive, said, paused = True, False, False
        elif kind == "exit":
            alive, said = False, False
        elif kind == "pause":
            paused = True
        elif kind == "cont":
            paused = False
        claiming = said and alive and not paused
        if claiming and since is None:
            since = t
        elif not claiming and since is not None:
            out.append((since, t))
            since = None
    if since is not None:
        out.append((since, now))
    return out


def _as_events(intervals_by_node):
    events = []
    for node, intervals in intervals_by_node.items():
        for a, b in intervals:
            events += [(a, node, True), (b, node, False)]
    return sorted(events, key=lambda e: (e[0], e[2]))   # an end before a start at the same instant


def gaps(intervals_by_node, start, end):
    """Intervals within [start, end] during which no node claimed."""
    holders, out, since = set(), [], start
    for t, node, added in _as_events(intervals_by_node):
        if t > end:
            break
        before = bool(holders)
        (holders.add if added else holders.discard)(node)
        t = max(t, start)
        if before and not holders:
            since = t
        elif not before and holders and since is not None:
            if t > since:
                out.append((since, t))
            since = None
    if not holders and since is not None and end > since:
        out.append((since, end))
    return out


# --- the lab -----------------------------------------------------------------------

class ClusterLab(Lab):
    """Three Consul servers and, per node, a client agent, vip-elector and vip-manager,
    each Consul in a network namespace of its own on a bridge."""

    def __init__(self, nodes="abc", key="service/cluster/leader", vip=SUBNET + "100", interval_ms=1000,
                 vip_manager=True, hook=None, elector_args=(), workdir=None, consul_log_level=None,
                 manage_vip=False):
        """interval_ms: vip-manager's `interval` (its default, 1000, unless told).
        manage_vip: every elector runs with --manage-vip (SPEC §12) and holds the
        VIP on its node's bridge interface itself; no vip-manager runs.
        hook: the example fencing hook (SPEC §10.5); each elector runs it through
        a wrapper with its node's settings (hook_for).
        consul_log_level: every Consul agent's `log_level` (default: the
        environment's VIP_ELECTOR_LAB_CONSUL_LOG_LEVEL, else info); `debug` also
        logs the servers' serf/memberlist probes, session timers and HTTP requests."""
        super().__init__(nodes=nodes, key=key, vip=vip, interval_ms=interval_ms,
                         vip_manager=vip_manager and not manage_vip, workdir=workdir, private_netns=True)
        self.hook = hook
        self.manage_vip = manage_vip
        self.elector_args = (["--manage-vip"] if manage_vip else []) + list(elector_args)
        self.consul_log_level = consul_log_level or os.environ.get("VIP_ELECTOR_LAB_CONSUL_LOG_LEVEL") or "info"
        self.hub = None
        self.servers: Dict[str, Member] = {}
        self.agents: Dict[str, Member] = {}
        self.consul = ObserverHTTP(self)
        self.vip_monitors: List[VipMonitor] = []
        self.notify: Dict[str, NotifySocket] = {}
        self.life: Dict[str, List[Tuple[float, str]]] = {n: [] for n in self.nodes}
        self.units = None             # UnitServer, for the fencing hook
        self._vm_lock = threading.RLock()
        self._asked = set()           # id() of elector Procs the lab stopped or killed on purpose
        self.actions: List[Tuple[float, str]] = []

    # names
    def member(self, name) -> Member:
        return self.servers.get(name) or self.agents[name]

    def note(self, what):
        t = time.time()
        self.actions.append((t, what))
        with open(self.log("actions"), "a") as f:
            f.write("%.6f %s\n" % (t, what))
        return t

    # lifecycle
    def start(self):
        self.hub = Netns()
        # a fixed MAC: a bridge's own follows its lowest port's, which a port added
        # or removed would change under every agent's ARP cache
        self.hub.run(["ip", "link", "add", "br0", "address", "02:90:00:00:00:fe", "type", "bridge",
                      "forward_delay", "0"])
        self.hub.run(["ip", "link", "set", "br0", "up"])
        for i, name in enumerate(SERVERS):
            self._add_member(name, name, SUBNET + str(i + 1), server=True)
        for node in self.nodes:
            self._add_member(self.name(node), node, SUBNET + str(NODE_IPS[node]), server=False)
        self.vip_monitors.append(OrderedVipMonitor(self.hub, self.vip, self.log("ip-monitor")))
        self.vip_monitor = self.vip_monitors[0]   # answers for every node
        for m in list(self.servers.values()) + list(self.agents.values()):
            self._start_agent(m)
        for m in list(self.servers.values()) + list(self.agents.values()):
            self._wait_ready(m, 60)
        self.watcher = KeyWatcher(self.consul, self.key)
        self.units = UnitServer(self)
        for node in self.nodes:
            self.write_elector_config(node)
            if self.with_vip_manager:
                self.start_vip_manager(node)

    def close(self):
        leader = None
        try:
            leader = self.claimers()
        except Exception:   # noqa: BLE001 - closing whatever state the lab is in
            pass
        for node, proc in sorted(self.electors.items(), key=lambda item: item[0] in (leader or ())):
            self._asked.add(id(proc))
            m = self.agents.get(node)
            if m and m.elector_paused:
                proc.send(signal.SIGCONT)
            proc.stop(timeout=6)
        with self._vm_lock:
            for proc in list(self.vip_managers.values()):
                proc.stop(timeout=3)
        if self.units:
            self.units.close()
            self.units = None
        if self.watcher:
            self.watcher.close()
        for m in list(self.agents.values()) + list(self.servers.values()):
            if m.proc:
                m.proc.send(signal.SIGCONT)
                m.proc.stop(timeout=5, sig=signal.SIGKILL)
        for mon in self.vip_monitors:
            mon.proc.stop(timeout=2)
        for notify in self.notify.values():
            notify.close()
        for m in list(self.agents.values()) + list(self.servers.values()):
            m.netns.close()
        if self.hub:
            self.hub.close()
        self.servers, self.agents, self.vip_monitors, self.notify = {}, {}, [], {}
        self.hub = None
        super().close()   # the directory (the rest is already closed)

    # Consul agents
    def _add_member(self, name, key, ip, server):
        ns = Netns()
        self.hub.run(["ip", "link", "add", "hub-" + key, "type", "veth",
                      "peer", "name", "veth-" + key, "netns", str(ns.holder.pid)])
        self.hub.run(["ip", "link", "set", "hub-" + key, "master", "br0", "up"])
        ns.run(["ip", "addr", "add", ip + "/24", "dev", "veth-" + key])
        ns.run(["ip", "link", "set", "veth-" + key, "up"])
        sock = os.path.join(self.dir, "consul-%s.sock" % key)
        checks = [] if server else [self.check_id(key)]
        m = Member(name=name, key=key, ip=ip, server=server, netns=ns, sock=sock,
                   config=os.path.join(self.dir, "consul-%s.json" % key),
                   api=ConsulHTTP(sock, node=name, checks=checks))
        config = {
            "node_name": name, "data_dir": os.path.join(self.dir, "data-" + key),
            "bind_addr": ip, "client_addr": "127.0.0.1",
            "addresses": {"http": "127.0.0.1 unix://" + sock},
            "ports": {"dns": -1, "grpc": -1},
            "retry_join": [SUBNET + str(i + 1) for i in range(len(SERVERS))], "retry_interval": "1s",
            "disable_host_node_id": True, "log_level": self.consul_log_level,
        }
        if server:
            config.update(server=True, bootstrap_expect=len(SERVERS), performance={"raft_multiplier": 1})
        else:
            config["checks"] = [{"id": self.check_id(key), "name": "health of " + name,
                                 "ttl": "24h", "status": "passing"}]
        with open(m.config, "w") as f:
            json.dump(config, f)
        (self.servers if server else self.agents)[key] = m

    def _start_agent(self, m):
        m.proc = spawn(m.name + "-consul", [CONSUL, "agent", "-config-file", m.config],
                       self.log("consul-" + m.key), netns=m.netns, cwd=self.dir)
        m.paused = False

    def _wait_ready(self, m, timeout):
        def ready():
            if not m.proc.alive:
                raise AssertionError("consul %s exited:\n%s" % (m.name, m.proc.tail()))
            if m.server:
                return m.api.call("GET", "/v1/status/leader", timeout=1)
            return m.api.ready()
        try:
            wait_for(ready, timeout, interval=0.1, message="Consul %s to be ready" % m.name)
        except TimeoutError:
            raise TimeoutError("Consul %s not ready in %ds:\n%s" % (m.name, timeout, m.proc.tail()))
        return time.time()

    def observer_server(self) -> Member:
        for m in self.servers.values():
            if m.running and m.link_up:
                return m
        return next(iter(self.servers.values()))

    def raft_leader(self) -> Optional[str]:
        """The server that is raft leader (as an undisturbed server sees it), or None."""
        try:
            addr = self.consul.call("GET", "/v1/status/leader", timeout=2)
        except (OSError, ConsulError, http.client.HTTPException, ValueError):
            return None
        for m in self.servers.values():
            if addr == "%s:%d" % (m.ip, RAFT_PORT):
                return m.key
        return None

    def wait_raft_leader(self, timeout, exclude=()):
        return wait_for(lambda: (lambda s: s if s and s not in exclude else None)(self.raft_leader()),
                        timeout, interval=0.2, message="a raft leader (not %s)" % (list(exclude),))

    def kill_agent(self, name, sig=signal.SIGKILL):
        """SIGKILL (or SIGTERM: a graceful leave) a Consul agent; return when it is gone."""
        m = self.member(name)
        self.consul.drop(m.key)
        t = self.note("%s %s" % (signal.Signals(sig).name, m.name))
        if m.paused:
            m.proc.send(signal.SIGCONT)
        m.proc.stop(timeout=15, sig=sig)
        m.paused = False
        return t

    def restart_agent(self, name, timeout=60):
        """Start a stopped agent again (same data directory); return when it is ready."""
        m = self.member(name)
        self.note("start %s" % m.name)
        self._start_agent(m)
        return self._wait_ready(m, timeout)

    def pause_agent(self, name):
        m = self.member(name)
        m.paused = True
        self.consul.drop(m.key)
        m.proc.send(signal.SIGSTOP)
        return self.note("SIGSTOP %s" % m.name)

    def resume_agent(self, name):
        m = self.member(name)
        m.proc.send(signal.SIGCONT)
        m.paused = False
        return self.note("SIGCONT %s" % m.name)

    def partition(self, name):
        """Take the member's link to the bridge down (node letter or server name)."""
        m = self.member(name)
        m.link_up = False
        self.consul.drop(m.key)
        self.hub.run(["ip", "link", "set", "hub-" + m.key, "down"])
        return self.note("partition %s" % m.name)

    def heal_link(self, name):
        """Link up again; return the time it is up."""
        m = self.member(name)
        self.hub.run(["ip", "link", "set", "hub-" + m.key, "up"])
        m.link_up = True
        return self.note("heal %s" % m.name)

    def wait_rejoined(self, name, timeout=60):
        """Wait until the servers see the member alive again (a node: serfHealth
        passing in the catalog); return the time. After a partition, serf takes
        up to its reconnect interval (30 s) to bring a failed member back."""
        m = self.member(name)
        if m.server:
            ok = lambda: any(x["Name"] == m.name and x["Status"] == 1  # noqa: E731
                             for x in self.consul.call("GET", "/v1/agent/members", timeout=2))
            wait_for(ok, timeout, interval=0.2, message="%s to rejoin" % m.name)
            t = time.time()
        else:
            t = self._wait_ready(m, timeout)
        self.note("%s back in the cluster" % m.name)
        return t

    def set_check(self, node, status):
        self.agents[node].api.check_update(self.check_id(node), status)
        return self.note("check %s %s" % (self.check_id(node), status))

    def pass_check(self, node):
        return self.set_check(node, "passing")

    def fail_check(self, node):
        return self.set_check(node, "critical")

    # vip-manager
    def start_vip_manager(self, node, wait=True):
        self.write_elector_config(node)
        with self._vm_lock:
            proc = spawn("vip-manager-" + node, [VIP_MANAGER, "--config", self.vip_manager_config(node)],
                         self.log("vip-manager-" + node), netns=self.agents[node].netns, cwd=self.dir)
            self.vip_managers[node] = proc
        if wait:
            proc.wait_for_line(VIP_MANAGER_READY, 30)
        return proc

    def ensure_vip_manager(self, node):
        """Start node's vip-manager unless it runs (systemctl start: no wait for its work)."""
        with self._vm_lock:
            proc = self.vip_managers.get(node)
            if proc is None or not proc.alive:
                self.start_vip_manager(node, wait=False)

    def stop_vip_manager(self, node):
        """systemctl stop: SIGTERM (vip-manager 1.0.1 then leaves its VIP in place)."""
        with self._vm_lock:
            proc = self.vip_managers.get(node)
            if proc is not None:
                proc.stop(timeout=5)

    def hook_for(self, node):
        """The --hook of node's elector: the example fencing hook through a
        wrapper naming its settings file (the hook gets no environment from
        the daemon): this node's vip-manager configuration, and lab-unit to
        start and stop vip-manager."""
        conf = os.path.join(self.dir, "fence-%s.conf" % node)
        with open(conf, "w") as f:
            f.write('VIP_MANAGER_CONFIG=%s\nSTART_COMMAND="%s"\nSTOP_COMMAND="%s"\n'
                    % (self.vip_manager_config(node), self.units.command("start", node),
                       self.units.command("stop", node)))
        os.chmod(conf, 0o644)
        wrapper = os.path.join(self.dir, "fence-hook-%s" % node)
        with open(wrapper, "w") as f:
            f.write('#!/bin/sh\n# node %s\'s fencing hook in the cluster lab\n'
                    'exec env VIP_ELECTOR_FENCE_CONFIG=%s %s "$@"\n' % (node, conf, self.hook))
        os.chmod(wrapper, 0o755)
        return wrapper

    @property
    def tracks_vip(self) -> bool:
        """Someone puts the VIP on the leader's node: vip-manager, or the electors themselves."""
        return self.with_vip_manager or self.manage_vip

    def vip_holders_now(self):
        nodes = set()
        for node, m in self.agents.items():
            for line in m.netns.run(["ip", "-o", "-4", "addr", "show"]).splitlines():
                fields = line.split()
                if len(fields) >= 4 and fields[3].split("/")[0] == self.vip:
                    nodes.add(node)
        return nodes

    def vip_nodes(self):
        """Nodes holding the VIP now, by the monitors."""
        return {self.node_of_iface(i) for i in self.vip_monitor.holders()}

    # vip-elector
    def start_elector(self, node, addr=None, extra=(), env=None, on_line=None):
        """Start (or restart, same --state-dir) node's elector in its namespace."""
        if node in self.electors:
            self._retired.append(self.electors.pop(node))
        if node not in self.notify:
            self.notify[node] = NotifySocket(os.path.join(self.dir, "notify-%s.sock" % node))
        args = ["--hook", self.hook_for(node)] if self.hook else []   # --state-dir: elector_argv
        env = dict(env or {}, NOTIFY_SOCKET=self.notify[node].path)
        t = self.note("start elector-%s" % node)
        proc = spawn("elector-" + node, self.elector_argv(node, addr, args + self.elector_args + list(extra)),
                     self.log("elector-" + node), netns=self.agents[node].netns, cwd=REPO,
                     env=elector_env(env), on_line=on_line)
        self.life[node].append((t, "start"))
        self.electors[node] = proc
        return proc

    def set_hook(self, hook):
        """Run every elector with --hook `hook` from now on (None: none):
        restarted one by one, followers first, so the leadership moves once."""
        self.hook = hook
        leader = self.claimers()
        for node in sorted(self.electors, key=lambda n: n in leader):
            self.stop_elector(node)
            self.start_elector(node)
            wait_for(lambda: self.sessions_of(node), 30, interval=0.1,
                     message="elector-%s to compete again" % node)
        if self.with_vip_manager and not hook:
            for node in self.nodes:
                self.ensure_vip_manager(node)

    def start_electors(self):
        for node in self.nodes:
            self.start_elector(node)

    def stop_elector(self, node, sig=signal.SIGTERM, timeout=15):
        """Planned stop (SIGTERM) or SIGKILL; return (t_signal, t_exit, status)."""
        proc = self.electors[node]
        self._asked.add(id(proc))
        t = self.note("%s elector-%s" % (signal.Signals(sig).name, node))
        if sig == signal.SIGKILL:
            self.life[node].append((t, "exit"))
        if self.agents[node].elector_paused:
            self.resume_elector(node)
        status = proc.stop(timeout=timeout, sig=sig)
        return t, proc.exited_at or time.time(), status

    def pause_elector(self, node):
        self.agents[node].elector_paused = True
        self.electors[node].send(signal.SIGSTOP)
        t = self.note("SIGSTOP elector-%s" % node)
        self.life[node].append((t, "pause"))
        return t

    def resume_elector(self, node):
        self.electors[node].send(signal.SIGCONT)
        t = self.note("SIGCONT elector-%s" % node)
        self.life[node].append((t, "cont"))
        self.agents[node].elector_paused = False
        return t

    def elector_procs(self):
        return list(self._retired) + list(self.electors.values())

    def crashes(self, since=0.0):
        """Electors that exited without being asked to: [(name, status, tail of log)]."""
        out = []
        for proc in self.elector_procs():
            if not proc.alive and id(proc) not in self._asked and (proc.exited_at or time.time()) >= since:
                out.append((proc.name, proc.returncode, proc.tail(15)))
        return out

    def log_errors(self, since=0.0):
        """Elector log lines after `since` (a time.time()) saying `internal error` or
        holding a traceback: (name, line), the first of each elector."""
        out = []
        for proc in self.elector_procs():
            found = proc.find_line(lambda text: INTERNAL_ERROR in text or "Traceback" in text, after=since)
            if found:
                out.append((proc.name, found.text))
        return out

    # claims
    def claim_intervals(self, now=None):
        """{node: [(start, end)]}: when each node's elector claimed leadership."""
        now = now or time.time()
        out = {}
        for node in self.nodes:
            statuses = []
            notify = self.notify.get(node)
            if notify:
                with notify._cond:
                    statuses = [(t, text[len("STATUS="):]) for t, text in notify.messages
                                if text.startswith("STATUS=")]
            life = list(self.life[node])
            for proc in self.elector_procs():
                if proc.name == "elector-" + node and proc.exited_at:
                    life.append((proc.exited_at, "exit"))
            out[node] = claim_intervals(statuses, life, now)
        return out

    def claimers(self, at=None):
        """Nodes whose elector claims leadership now (or at time `at`)."""
        now = time.time()
        at = now if at is None else at
        return sorted(n for n, iv in self.claim_intervals(now).items() if any(a <= at <= b for a, b in iv))

    def claim_overlaps(self, start=0.0, end=None):
        """[(from, to, nodes)] during which two or more electors claimed leadership."""
        end = end or time.time()
        return overlaps(_as_events(self.claim_intervals(end)), start, end)

    def leaderless(self, start, end=None):
        """[(from, to)] within [start, end] during which no elector claimed leadership."""
        end = end or time.time()
        return gaps(self.claim_intervals(end), start, end)

    def sessions_by_name(self):
        return sorted(s["Name"] for s in self.consul.sessions() if s["Name"].startswith("vip-elector-"))

    def orphan_sessions(self):
        """vip-elector sessions beyond one per running elector (stale or duplicate)."""
        running = {"vip-elector-" + self.name(n) for n, p in self.electors.items() if p.alive}
        names = self.sessions_by_name()
        return len(names) - len(running & set(names))

    def steady(self):
        """(leader, "") when the lab is settled, else (None, why not): exactly one
        elector claims, the key names it, one session per running elector, the
        VIP on the leader's node alone."""
        claimers = self.claimers()
        if len(claimers) != 1:
            return None, "electors claiming leadership: %s" % (claimers or "none")
        leader = claimers[0]
        if self.leader() != leader:
            return None, "%s claims but the key is %r" % (leader, self.watcher.current())
        running = sorted("vip-elector-" + self.name(n) for n, p in self.electors.items() if p.alive)
        sessions = self.sessions_by_name()
        if sessions != running:
            return None, "sessions %s, running electors %s" % (sessions, running)
        if self.tracks_vip and self.vip_nodes() != {leader}:
            return None, "VIP on %s, leader %s" % (sorted(self.vip_nodes()) or "no node", leader)
        return leader, ""

    def settle(self, timeout, stable=1.0):
        """Wait for a steady state held for `stable` seconds; return the leader.

        Raises TimeoutError with the last reason when the deadline passes."""
        deadline = time.monotonic() + timeout
        since, leader, why = None, None, ""
        while True:
            try:
                now_leader, why = self.steady()
            except (OSError, ConsulError, http.client.HTTPException, ValueError) as e:
                now_leader, why = None, "Consul: %s" % e
            if now_leader and now_leader == leader:
                if time.monotonic() - since >= stable:
                    return leader
            elif now_leader:
                leader, since = now_leader, time.monotonic()
            else:
                leader = None
            if time.monotonic() > deadline:
                raise TimeoutError("no steady state within %.0fs: %s" % (timeout, why))
            time.sleep(0.1)

    def heal_all(self, timeout=60):
        """Undo whatever a fault left: links up, agents running, electors running, checks passing."""
        for m in list(self.servers.values()) + list(self.agents.values()):
            if not m.link_up:
                self.heal_link(m.key)
            if m.paused:
                self.resume_agent(m.key)
            if m.proc is None or not m.proc.alive:
                self._start_agent(m)
        for m in list(self.servers.values()) + list(self.agents.values()):
            self._wait_ready(m, timeout)
        for node in self.nodes:
            self.pass_check(node)
            if self.agents[node].elector_paused:
                self.resume_elector(node)
            if node not in self.electors or not self.electors[node].alive:
                self.start_elector(node)
            if self.with_vip_manager and not self.hook:   # with the hook, the hook runs it
                self.ensure_vip_manager(node)


@contextmanager
def running_lab(**options):
    """A started, settled ClusterLab with every elector running (skips the test when the
    machine cannot run one), closed at the end: the tests' module fixtures."""
    import pytest
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    lab = ClusterLab(**options)
    try:
        lab.start()
        lab.start_electors()
        lab.settle(60)
        yield lab
    finally:
        lab.close()
